"""The model family: exact sizes, the timm-style model API, and the paper's architectural details."""

import re

import pytest
import torch
from torch import nn

import mambaout
from mambaout.errors import UserError
from mambaout.layers import DepthwiseConvMixer, GatedCNNBlock
from mambaout.models import MambaOut, get_spec, model_complexity

# The reference table (paper / timm, counted with FlopCounterMode): params, GMACs at 224.
REFERENCE = {
    "mambaout_femto": (7.305, 1.148),
    "mambaout_kobe": (9.141, 1.506),
    "mambaout_tiny": (26.545, 4.470),
    "mambaout_small": (48.488, 8.936),
    "mambaout_base": (84.813, 15.794),
    "mambaout_small_rw": (48.50, None),
    "mambaout_base_short_rw": (88.83, None),
    "mambaout_base_tall_rw": (86.48, None),
    "mambaout_base_wide_rw": (94.45, None),
    "mambaout_base_plus_rw": (101.66, None),
}
ALL = mambaout.list_models()


def tiny_model(**kw) -> MambaOut:
    return MambaOut(depths=(1, 2, 1, 1), dims=(8, 16, 24, 32), num_classes=5, **kw)


def test_registry_lists_every_variant_of_the_reference():
    assert sorted(ALL) == sorted(REFERENCE)


@pytest.mark.parametrize("name", ALL)
def test_params_and_macs_match_reference(name):
    params, macs = model_complexity(name)
    ref_params, ref_gmacs = REFERENCE[name]
    digits = 3 if ref_params * 1000 % 10 else 2
    assert round(params / 1e6, digits) == pytest.approx(ref_params)
    if ref_gmacs is not None:
        assert round(macs / 1e9, 3) == pytest.approx(ref_gmacs)


@pytest.mark.parametrize("name", ALL)
def test_every_variant_runs_with_the_full_api(name):
    model = mambaout.create_model(name, num_classes=7).eval()
    dims = get_spec(name).arch["dims"]
    x = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        feats, inter = model.forward_intermediates(x)
        logits = model.forward_head(feats)
        pre = model.forward_head(feats, pre_logits=True)
        torch.testing.assert_close(model(x[:1]), logits[:1], rtol=1e-4, atol=1e-5)
    assert logits.shape == (2, 7)
    assert feats.shape == (2, 2, 3, dims[-1])  # channels-last, stride 32
    assert pre.shape == (2, 4 * dims[-1])
    assert [f.shape for f in inter] == [(2, d, 64 // s, 96 // s) for d, s in zip(dims, (4, 8, 16, 32), strict=True)]
    assert [i["num_chs"] for i in model.feature_info] == list(dims)
    assert [i["reduction"] for i in model.feature_info] == [4, 8, 16, 32]
    assert model.pretrained_cfg["num_classes"] == 7 and model.pretrained_cfg["interpolation"] == "bicubic"
    assert model.pretrained_cfg["mean"] == (0.485, 0.456, 0.406) and model.pretrained_cfg["crop_pct"] <= 1.0


def test_block_is_the_papers_gated_cnn():
    block = GatedCNNBlock(48).eval()
    hidden = int(8 / 3 * 48)
    assert block.fc1.out_features == 2 * hidden and block.fc2.in_features == hidden
    assert block.split_sizes == (hidden, hidden - 48, 48)
    conv = block.mixer.conv
    assert conv.kernel_size == (7, 7) and conv.groups == 48 and conv.padding == (3, 3)
    assert block.norm.eps == 1e-6 and block.act.approximate == "none"
    x = torch.randn(2, 5, 6, 48)
    g, i, c = torch.split(block.fc1(block.norm(x)), block.split_sizes, dim=-1)
    mixed = conv(c.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
    expected = x + block.fc2(nn.functional.gelu(g) * torch.cat((i, mixed), -1))
    torch.testing.assert_close(block(x), expected)


def test_partial_conv_ratio_splits_channels():
    block = GatedCNNBlock(64, expansion_ratio=3.0, conv_ratio=1.25)
    assert block.split_sizes == (192, 112, 80)
    assert block(torch.randn(1, 4, 4, 64)).shape == (1, 4, 4, 64)


def test_token_mixer_is_replaceable():
    calls = []

    class Recording(DepthwiseConvMixer):
        def forward(self, x):
            calls.append(x.shape)
            return super().forward(x)

    model = tiny_model(token_mixer=Recording)
    model(torch.randn(1, 3, 32, 32))
    assert len(calls) == 5 and calls[0] == (1, 8, 8, 8)


def test_every_layernorm_has_eps_1e6_and_init_is_truncated_normal():
    model = mambaout.create_model("mambaout_femto")
    norms = [m for m in model.modules() if isinstance(m, nn.LayerNorm)]
    assert norms and all(m.eps == 1e-6 for m in norms)
    for m in model.modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight.numel() > 10_000:
            assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
            assert torch.all(m.bias == 0)


def test_drop_path_rises_linearly_over_all_blocks():
    model = mambaout.create_model("mambaout_femto", drop_path_rate=0.3)
    blocks = [b for stage in model.stages for b in stage.blocks]
    rates = [getattr(b.drop_path, "drop_prob", 0.0) for b in blocks]
    torch.testing.assert_close(torch.tensor(rates), torch.linspace(0, 0.3, 18), check_dtype=False)


def test_rw_variants_have_their_timm_structure():
    model = mambaout.create_model("mambaout_base_wide_rw", num_classes=3)
    assert model.stem.norm1 is None and model.stages[1].downsample.norm_first
    assert isinstance(model.head.hidden_norm, nn.Identity) and isinstance(model.head.act, nn.GELU)
    assert isinstance(model.stages[0].blocks[0].act, nn.SiLU)
    assert torch.all(model.stages[0].blocks[0].ls.gamma == 1e-6)


def test_grad_checkpointing_computes_the_same_values_and_grads():
    model = tiny_model()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).sum().backward()
    for a, p in zip(grads, model.parameters(), strict=True):
        torch.testing.assert_close(a, p.grad)


def test_reset_classifier():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 32, 32)
    model.reset_classifier(11)
    assert model(x).shape == (1, 11) and model.num_classes == 11
    model.reset_classifier(0)
    assert model(x).shape == (1, 128) and isinstance(model.get_classifier(), nn.Identity)


def test_no_weight_decay_covers_norms_biases_and_layerscale_only():
    model = tiny_model(ls_init_value=1e-6)
    skip = model.no_weight_decay()
    assert "stages.0.blocks.0.ls.gamma" in skip and "head.norm.weight" in skip and "stem.conv1.bias" in skip
    assert "stages.0.blocks.0.fc1.weight" not in skip and "stages.0.blocks.0.mixer.conv.weight" not in skip
    decay, no_decay = model.param_groups(0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert all(p.ndim > 1 for p in decay["params"]) and all(p.ndim <= 1 for p in no_decay["params"])


def test_group_matcher_matches_every_parameter():
    model = tiny_model()
    matcher = model.group_matcher()
    patterns = [matcher["stem"]] + [p for p, _ in matcher["blocks"]]
    unmatched = [n for n, _ in model.named_parameters() if not any(re.match(p, n) for p in patterns)]
    assert all(n.startswith("head.") for n in unmatched)


def test_forward_intermediates_options():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        final, all_feats = model.forward_intermediates(x)
        torch.testing.assert_close(final, model.forward_features(x))
        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        picked = model.forward_intermediates(x, indices=(0, -1), output_fmt="NHWC", intermediates_only=True)
        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        normed = model.forward_intermediates(x, indices=[3], norm=True, intermediates_only=True)
        final_normed = model.head.norm(final).permute(0, 3, 1, 2)
    torch.testing.assert_close(last_two, all_feats[2:])
    torch.testing.assert_close(picked[1], final)
    assert picked[0].shape == (1, 16, 16, 8) and early[0].shape == (1, 16, 8, 8)
    torch.testing.assert_close(normed[0], final_normed)
    for bad in ((4,), 0, (-5,)):
        with pytest.raises(ValueError, match="indices"):
            model.forward_intermediates(x, indices=bad)
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NLC")


def test_prune_intermediate_layers_keeps_a_lean_backbone():
    model = tiny_model().eval()
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        want = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        assert model.prune_intermediate_layers((0, 1)) == [0, 1]
        got = model.forward_intermediates(x, indices=(0, 1), intermediates_only=True)
        out = model(x)
    assert len(model.stages) == 2 and len(model.feature_info) == 2
    torch.testing.assert_close(got, want)
    assert out.shape == (1, 8, 8, 16)  # the head went with the pruned stages


def test_unknown_model_name_suggests_the_closest():
    with pytest.raises(UserError, match="did you mean 'mambaout_tiny'"):
        mambaout.create_model("mambaout_tiy")
    with pytest.raises(UserError, match="mambaout models"):
        mambaout.create_model("resnet50")


def test_mismatched_depths_and_dims_are_rejected():
    with pytest.raises(ValueError, match="same length"):
        MambaOut(depths=(1, 1), dims=(8, 16, 32))


@pytest.mark.parametrize("stride", [4, 2, 1])
def test_stem_stride_keeps_more_tokens_with_the_same_parameters(stride):
    kwargs = {"depths": (1, 1, 1, 1), "dims": (8, 16, 24, 32), "num_classes": 2}
    model = MambaOut(stem_stride=stride, **kwargs).eval()
    paper = MambaOut(**kwargs)
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in paper.parameters())
    assert [f["reduction"] for f in model.feature_info] == [stride, 2 * stride, 4 * stride, 8 * stride]
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_intermediates(x, intermediates_only=True)
    assert [f.shape[-1] for f in feats] == [32 // stride, 16 // stride, 8 // stride, 4 // stride]
    assert model(x).shape == (2, 2)
    # one stage is the isotropic layout: every block on the stem's map (Pathfinder-32: 1,024 tokens)
    iso = MambaOut(depths=(2,), dims=(8,), stem_stride=stride, num_classes=2)
    assert iso.forward_features(x).shape == (2, 32 // stride, 32 // stride, 8)


def test_a_stem_stride_other_than_4_2_1_is_refused():
    with pytest.raises(ValueError, match=r"stem stride must be one of \(4, 2, 1\), got 3"):
        MambaOut(depths=(1,), dims=(8,), stem_stride=3)
