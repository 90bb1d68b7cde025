"""`create_model` as timm's: tagged names and their configs, the creation arguments, features_only extractors.

timm 1.0's registry is the oracle for the tags and their pretrained configs. Big variants are built on the meta
device; weights are loaded from small files and dicts written here.
"""

import pytest
import timm
import torch
from conftest import randomize_
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, adapt_input_conv
from torch import nn

import mambaout
from mambaout.errors import UserError
from mambaout.models import MambaOut, MambaOutFeatures, ModelSpec, PretrainedCfg, WeightSource, get_spec, registry
from mambaout.weights import convert_state_dict, save_state_dict

TINY = dict(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32))
TEST_MODEL = "mambaout_test_tiny"


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return mambaout.create_model(name, **kwargs)


@pytest.fixture
def tagged(tmp_path, monkeypatch) -> dict[str, dict[str, torch.Tensor]]:
    """A tiny registered variant with two tags, "a" (5 classes) and "b" (3 classes), published as file:// URLs."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    weights, tags = {}, []
    for tag, classes in (("a", 5), ("b", 3)):
        weights[tag] = randomize_(MambaOut(**TINY, num_classes=classes)).state_dict()
        path = save_state_dict(convert_state_dict(weights[tag], to="timm"), tmp_path / f"{tag}.safetensors")
        tags.append(PretrainedCfg(tag=tag, num_classes=classes, sources=(WeightSource("timm", path.as_uri()),)))
    monkeypatch.setitem(registry._REGISTRY, TEST_MODEL, ModelSpec(TEST_MODEL, TINY, tags[0], "paper", (tags[1],)))
    return weights


def assert_weights(model: nn.Module, weights: dict[str, torch.Tensor]) -> None:
    state = model.state_dict()
    assert sorted(state) == sorted(weights)
    for k, v in weights.items():
        torch.testing.assert_close(state[k], v, rtol=0, atol=0, msg=k)


# --- names, tags and their configs ------------------------------------------------------------------------------------


def test_every_tag_timm_publishes_is_registered():
    assert sorted(mambaout.list_models(pretrained=True)) == sorted(timm.list_models("mambaout*", pretrained=True))
    assert mambaout.list_pretrained() == mambaout.list_models(pretrained=True)
    assert sorted(mambaout.list_models()) == timm.list_models("mambaout*")


@pytest.mark.parametrize("name", mambaout.list_models() + mambaout.list_models(include_tags=True))
def test_pretrained_cfg_is_timms(name):
    """The config attached to a model is timm's registry entry for the name (a bare name: the default tag)."""
    model, theirs = meta_model(name), timm.models.get_pretrained_cfg(name).to_dict()
    ours = model.pretrained_cfg
    assert model.default_cfg is ours
    url = ours.pop("url", None)
    assert url is None or url.startswith("https://github.com/yuweihao/MambaOut/")  # the official release
    assert theirs.pop("url") == ""
    assert ours == theirs


def test_list_models_filters_as_timm():
    assert mambaout.list_models("*_rw", exclude_filters="*base*") == ["mambaout_small_rw"]
    assert mambaout.list_models(["*femto", "*kobe"]) == ["mambaout_femto", "mambaout_kobe"]
    plus = mambaout.list_models("mambaout_base_plus*", include_tags=True)
    assert plus == [
        f"mambaout_base_plus_rw.{t}" for t in ("sw_e150_in12k_ft_in1k", "sw_e150_r384_in12k_ft_in1k", "sw_e150_in12k")
    ]


def test_a_tag_sets_classes_and_input():
    in12k = meta_model("mambaout_base_plus_rw.sw_e150_in12k")
    assert in12k.num_classes == 11821 and in12k.get_classifier().out_features == 11821
    r384 = meta_model("mambaout_base_plus_rw", pretrained_cfg="sw_e150_r384_in12k_ft_in1k")
    assert r384.pretrained_cfg["input_size"] == (3, 384, 384) and r384.pretrained_cfg["pool_size"] == (12, 12)
    assert meta_model("mambaout_base_plus_rw").pretrained_cfg["tag"] == "sw_e150_in12k_ft_in1k"  # the default


def test_unknown_tag_lists_the_tags():
    with pytest.raises(UserError, match=r"no pretrained tag 'in22k': its tags are 'mambaout_tiny\.in1k'"):
        mambaout.create_model("mambaout_tiny.in22k")
    with pytest.raises(UserError, match="did you mean 'mambaout_tiny'"):
        get_spec("mambaout_tiy.in1k")


def test_pretrained_loads_the_tags_weights(tagged):
    assert_weights(mambaout.create_model(f"{TEST_MODEL}.b", pretrained=True), tagged["b"])
    assert_weights(mambaout.create_model(TEST_MODEL, pretrained=True), tagged["a"])  # the default tag
    assert mambaout.list_models("*test*", pretrained=True) == [f"{TEST_MODEL}.a", f"{TEST_MODEL}.b"]


# --- timm's creation arguments ----------------------------------------------------------------------------------------


def test_pretrained_cfg_overlay_file_and_dict(tmp_path):
    weights = randomize_(MambaOut(**TINY, num_classes=5)).state_dict()
    path = save_state_dict(weights, tmp_path / "mine.pth")
    spec = ModelSpec(TEST_MODEL, TINY, PretrainedCfg(num_classes=5), "paper")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, TEST_MODEL, spec)
        model = mambaout.create_model(
            TEST_MODEL, pretrained=True, pretrained_cfg_overlay=dict(file=str(path), mean=(0.5,) * 3)
        )
        assert_weights(model, weights)
        assert model.pretrained_cfg["file"] == str(path) and model.pretrained_cfg["mean"] == (0.5,) * 3
        given = mambaout.create_model(TEST_MODEL, pretrained=True, pretrained_cfg=dict(file=str(path), num_classes=5))
        assert_weights(given, weights)
        # a whole config is completed with timm's defaults, as timm completes it
        timms = timm.models.PretrainedCfg(file=str(path), num_classes=5, architecture=TEST_MODEL).to_dict()
        assert given.pretrained_cfg == timms and given.pretrained_cfg["crop_pct"] == 0.875
        with pytest.raises(UserError, match="pretrained_cfg has keys timm does not know: 'crops'"):
            mambaout.create_model(TEST_MODEL, pretrained_cfg=dict(crops=1))


def test_checkpoint_path_prefers_ema_as_timm(tmp_path):
    plain, ema = (randomize_(MambaOut(**TINY, num_classes=5)).state_dict() for _ in range(2))
    spec = ModelSpec(TEST_MODEL, TINY, PretrainedCfg(num_classes=5), "paper")
    with pytest.MonkeyPatch.context() as patch:
        patch.setitem(registry._REGISTRY, TEST_MODEL, spec)
        torch.save({"model": plain, "model_ema": ema, "epoch": 3}, tmp_path / "train.pth")
        assert_weights(mambaout.create_model(TEST_MODEL, checkpoint_path=tmp_path / "train.pth"), ema)
        torch.save({"state_dict": convert_state_dict(plain, to="timm")}, tmp_path / "timm.pth")
        assert_weights(mambaout.create_model(TEST_MODEL, checkpoint_path=tmp_path / "timm.pth"), plain)
        with pytest.raises(UserError, match="no such file"):
            mambaout.create_model(TEST_MODEL, checkpoint_path=tmp_path / "absent.pth")


def test_in_chans_adapts_the_first_conv_as_timm():
    weights = randomize_(MambaOut(**TINY, num_classes=5)).state_dict()
    for chans in (1, 2, 4):
        model = MambaOut(**TINY, num_classes=5, in_chans=chans)
        mambaout.load_checkpoint(model, weights)
        expected = adapt_input_conv(chans, weights["stem.conv1.weight"])
        torch.testing.assert_close(model.stem.conv1.weight, expected, rtol=0, atol=0)
        assert model(torch.randn(1, chans, 32, 32)).shape == (1, 5)


@pytest.mark.parametrize("pool", ["avg", "max", "avgmax", ""])
def test_global_pool(pool):
    model = MambaOut(**TINY, num_classes=5, global_pool=pool).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        feats = model.forward_features(x)
        pooled = {"avg": feats.mean((1, 2)), "max": feats.amax((1, 2)), "avgmax": None, "": feats}[pool]
        if pool == "avgmax":
            pooled = 0.5 * (feats.mean((1, 2)) + feats.amax((1, 2)))
        head = model.head
        expected = head.fc(head.hidden_norm(head.act(head.fc1(head.norm(pooled)))))
        torch.testing.assert_close(model(x), expected)
    with pytest.raises(ValueError, match="global_pool"):
        MambaOut(**TINY, global_pool="token")


def test_creation_arguments_pass_through_and_none_is_ignored():
    model = meta_model("mambaout_femto", drop_rate=0.3, drop_path_rate=0.1, num_classes=0, global_pool=None)
    assert model.head.drop.p == 0.3 and model.stages[-1].blocks[-1].drop_path.drop_prob == pytest.approx(0.1)
    assert model.num_classes == 0 and model.head.pool_type == "avg"
    scripted = meta_model("mambaout_femto", scriptable=True, exportable=True, no_jit=True)
    assert isinstance(scripted, MambaOut)
    placed = mambaout.create_model("mambaout_base", device="meta", dtype=torch.bfloat16)
    assert all(p.is_meta and p.dtype == torch.bfloat16 for p in placed.parameters())
    assert "device" not in placed.model_args


def test_reset_classifier_as_timm():
    model = MambaOut(**TINY, num_classes=5).eval()
    x = torch.randn(1, 3, 32, 32)
    model.reset_classifier(7, global_pool="max")
    assert model(x).shape == (1, 7) and model.head.pool_type == "max" and model.num_classes == 7
    model.reset_classifier(0, "", reset_other=True)
    assert model.head_hidden_size == model.num_features == 32
    torch.testing.assert_close(model(x), model.forward_features(x))


# --- features_only ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("out_indices", "taken"), [((0, 1, 2, 3), [0, 1, 2, 3]), ((1, -1), [1, 3]), (2, [2, 3])])
def test_features_only_is_a_lean_nchw_backbone(out_indices, taken):
    features = meta_model("mambaout_femto", features_only=True, out_indices=out_indices)
    assert isinstance(features, MambaOutFeatures) and features.output_fmt == "NCHW"
    dims, strides = (48, 96, 192, 288), (4, 8, 16, 32)
    assert features.feature_info.channels() == [dims[i] for i in taken]
    assert features.feature_info.reduction() == [strides[i] for i in taken]
    assert not any(name.startswith("head") for name, _ in features.named_parameters())
    assert len(features.stages) == max(taken) + 1
    assert "num_classes" not in features.pretrained_cfg and features.default_cfg is features.pretrained_cfg
    maps = features(torch.empty(1, 3, 64, 64, device="meta"))
    assert [m.shape for m in maps] == [(1, dims[i], 64 // strides[i], 64 // strides[i]) for i in taken]
    assert all(m.is_contiguous() for m in maps)


@pytest.mark.parametrize(
    ("feature_cls", "wrapper"), [("dict", FeatureDictNet), ("hook", FeatureHookNet), ("fx", FeatureGraphNet)]
)
def test_features_only_with_timms_wrappers(feature_cls, wrapper):
    features = meta_model("mambaout_femto", features_only=True, feature_cls=feature_cls, out_indices=(1, 3))
    with torch.device("meta"):
        theirs = timm.create_model("mambaout_femto", features_only=True, feature_cls=feature_cls, out_indices=(1, 3))
    assert isinstance(features, wrapper) and features.output_fmt == theirs.output_fmt == "NHWC"
    assert features.feature_info.channels() == theirs.feature_info.channels() == [96, 288]
    out = features(torch.empty(1, 3, 64, 64, device="meta"))
    maps = list(out.values()) if isinstance(out, dict) else out
    assert [m.shape for m in maps] == [(1, 8, 8, 96), (1, 2, 2, 288)]


def test_features_only_options_and_mistakes():
    nhwc = meta_model("mambaout_femto", features_only=True, feature_cfg=dict(output_fmt="NHWC"))
    assert nhwc(torch.empty(1, 3, 32, 32, device="meta"))[0].shape == (1, 8, 8, 48)
    assert type(meta_model("mambaout_femto", features_only=True, feature_cls="getter")) is MambaOutFeatures
    with pytest.raises(UserError, match="unknown feature_cls 'tree'"):
        meta_model("mambaout_femto", features_only=True, feature_cls="tree")
    with pytest.raises(ValueError, match="indices"):
        meta_model("mambaout_femto", features_only=True, out_indices=(4,))
