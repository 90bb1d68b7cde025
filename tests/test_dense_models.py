"""mambaout.dense models: the backbone adapter, Mask/Faster R-CNN, UperNet, weights and complexity."""

import pytest
import torch
from dense_fixtures import TINY_MODEL

import mambaout
from mambaout.cli import main
from mambaout.dense import create_backbone, create_detector, create_segmenter, dense_complexity
from mambaout.dense.backbone import DROP_PATH
from mambaout.dense.config import DETECT_RECIPES, SEGMENT_RECIPES, DetectConfig, SegmentConfig
from mambaout.train.config import build_config, load_config_file, load_yaml
from mambaout.weights import convert_state_dict, save_state_dict

TINY = load_yaml(TINY_MODEL)
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("name", mambaout.list_models())
def test_the_backbone_gives_four_normed_nchw_stages(name):
    with torch.device("meta"):
        backbone = create_backbone(name)
        feats = backbone(torch.empty(2, 3, 64, 96))
    assert list(feats) == ["0", "1", "2", "3"] and backbone.strides == [4, 8, 16, 32]
    for (key, f), channels, stride in zip(feats.items(), backbone.channels, backbone.strides, strict=True):
        assert f.shape == (2, channels, 64 // stride, 96 // stride), key
    assert len(backbone.norms) == 4 and all(
        n.normalized_shape == (c,) for n, c in zip(backbone.norms, backbone.channels, strict=True)
    )
    assert not any(k.startswith("trunk.head") for k in backbone.state_dict())  # no classifier left


def test_the_stage_norms_are_applied_and_drop_path_follows_the_paper():
    backbone = create_backbone("mambaout_femto", model_kwargs=TINY).eval()
    x = torch.randn(1, 3, 64, 64)
    raw = backbone.trunk.forward_intermediates(x, output_fmt="NCHW", intermediates_only=True)
    with torch.no_grad():
        for norm in backbone.norms:
            norm.weight.fill_(2.0)
        out = list(backbone(x).values())
    for r, o, norm in zip(raw, out, backbone.norms, strict=True):
        expected = torch.nn.functional.layer_norm(r.permute(0, 2, 3, 1), norm.normalized_shape, eps=1e-6) * 2.0
        torch.testing.assert_close(o, expected.permute(0, 3, 1, 2) + norm.bias[:, None, None])
    assert DROP_PATH == {"mambaout_tiny": 0.3, "mambaout_small": 0.3, "mambaout_base": 0.6}
    with torch.device("meta"):
        tiny = create_backbone("mambaout_tiny")
    last = tiny.trunk.stages[-1].blocks[-1].drop_path
    assert last.drop_prob == pytest.approx(0.3)


def test_imagenet_weights_load_through_the_loader_and_the_classifier_is_reported(tmp_path):
    classifier = mambaout.create_model("mambaout_femto", **TINY)
    official = tmp_path / "official.pth"
    save_state_dict(convert_state_dict(classifier.state_dict(), to="official"), official)
    with pytest.warns(UserWarning, match=r"skipped \d+ keys the backbone does not use \(the classifier: head\."):
        backbone = create_backbone("mambaout_femto", pretrained=str(official), model_kwargs=TINY)
    for key, value in backbone.trunk.state_dict().items():
        assert torch.equal(value, classifier.state_dict()[key]), key
    wrong = mambaout.create_model("mambaout_femto", depths=[1, 1, 2, 1], dims=[8, 16, 24, 32])
    save_state_dict(wrong.state_dict(), tmp_path / "wrong.pth")
    with pytest.raises(mambaout.UserError, match=r"--pretrained .*wrong\.pth.*does not fit"):
        create_backbone("mambaout_femto", pretrained=str(tmp_path / "wrong.pth"), model_kwargs=TINY)


@pytest.mark.parametrize("kind", ["mask_rcnn", "faster_rcnn"])
def test_the_detector_trains_and_predicts_in_torchvisions_format(kind):
    model = create_detector(
        "mambaout_femto", 3, kind, model_kwargs=TINY, min_size=64, max_size=96, fpn_channels=16, box_head_dim=32
    )
    images = [torch.rand(3, 64, 80), torch.rand(3, 70, 64)]
    masks = torch.zeros(1, 64, 80, dtype=torch.uint8)
    masks[0, 10:30, 20:50] = 1
    targets = [
        {"boxes": torch.tensor([[20.0, 10, 50, 30]]), "labels": torch.tensor([2]), "masks": masks},
        {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "masks": torch.zeros(0, 70, 64)},
    ]
    losses = model(images, targets)
    expected = {"loss_classifier", "loss_box_reg", "loss_objectness", "loss_rpn_box_reg"}
    assert set(losses) == expected | ({"loss_mask"} if kind == "mask_rcnn" else set())
    sum(losses.values()).backward()
    assert model.backbone.body.norms[0].weight.grad is not None
    model.eval()
    with torch.no_grad():
        outputs = model(images)
    assert model.roi_heads.box_predictor.cls_score.out_features == 4  # 3 classes and the background
    for output, image in zip(outputs, images, strict=True):
        n = len(output["boxes"])
        assert output["boxes"].shape == (n, 4) and output["scores"].shape == output["labels"].shape == (n,)
        if kind == "mask_rcnn":
            assert output["masks"].shape == (n, 1, *image.shape[1:])  # at the image's own size


def test_the_segmenter_scores_every_pixel_with_an_auxiliary_head_in_training():
    model = create_segmenter("mambaout_femto", 5, model_kwargs=TINY, channels=16, aux_channels=8, norm="group")
    out = model(torch.randn(2, 3, 64, 96))
    assert set(out) == {"out", "aux"} and out["out"].shape == out["aux"].shape == (2, 5, 64, 96)
    assert [m.output_size for m in (p[0] for p in model.decode_head.pools)] == [1, 2, 3, 6]
    assert model.aux_head.conv[0].in_channels == 24  # stage 3's channels
    assert set(model.eval()(torch.randn(1, 3, 32, 32))) == {"out"}
    assert create_segmenter("mambaout_femto", 5, model_kwargs=TINY, channels=16, aux_channels=None).aux_head is None


@pytest.mark.parametrize(("task", "params", "gmacs"), [("detection", 43.1, 262), ("segmentation", 54.1, 938)])
def test_tiny_matches_the_papers_params_and_macs(task, params, gmacs):
    c = dense_complexity("mambaout_tiny", task)
    assert c.paper is not None and c.params / 1e6 == pytest.approx(params, abs=0.05)
    assert c.macs / 1e9 == pytest.approx(gmacs, abs=1) and c.macs / 1e9 == pytest.approx(c.paper[1], rel=0.01)


def test_models_dense_prints_ours_beside_the_papers(capsys):
    assert main(["models", "mambaout_tiny", "--dense"]) == 0
    assert "| mambaout_tiny | 43.1 | 43 | 262 | 262 | 54.1 | 54 | 938 | 938 |" in capsys.readouterr().out


def test_every_dense_recipe_loads_and_the_papers_keep_its_settings():
    for folder, cls, prefix in (
        (DETECT_RECIPES, DetectConfig, "mask_rcnn"),
        (SEGMENT_RECIPES, SegmentConfig, "upernet"),
    ):
        names = sorted(p.stem for p in folder.glob("*.yaml"))
        assert len([n for n in names if n.startswith(prefix)]) == 3 and ("coins_cpu" in names or "ihc_cpu" in names)
        for name in names:
            config = build_config(None, load_config_file(name, cls, folder), cls=cls)
            if name.startswith(prefix):
                assert config.drop_path == DROP_PATH[config.model] and config.pretrained == "official"
                assert (config.opt, config.base_lr, config.lr_batch, config.batch_size) == ("adamw", 1e-4, 16, 2)
    mask_rcnn = build_config(
        None, load_config_file("mask_rcnn_tiny_coco", DetectConfig, DETECT_RECIPES), cls=DetectConfig
    )
    assert (mask_rcnn.epochs, mask_rcnn.decay_milestones, mask_rcnn.warmup_iters, mask_rcnn.weight_decay) == (
        12, (8.0, 11.0), 500, 0.05
    )  # fmt: skip
    upernet = build_config(
        None, load_config_file("upernet_tiny_ade20k", SegmentConfig, SEGMENT_RECIPES), cls=SegmentConfig
    )
    assert (upernet.iters, upernet.warmup_iters, upernet.sched, upernet.decay_rate, upernet.weight_decay) == (
        160_000, 1500, "poly", 1.0, 0.01
    )  # fmt: skip
    assert (upernet.crop_size, upernet.head_channels, upernet.aux_weight, upernet.num_classes) == (512, 512, 0.4, 150)
