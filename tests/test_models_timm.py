"""timm's own model tests (pytorch-image-models tests/test_models.py), as they check a `mambaout_*` model, on ours.

Every check timm's suite makes of its MambaOut is made here of every registered variant: forward (with and without
grad checkpointing), backward (every parameter gets a gradient), the default_cfg keys and the output sizes they
promise (every pretrained tag), features_only extractors, forward_intermediates, fx tracing through torchvision's
`create_feature_extractor` (forward and backward), TorchScript (plain and after fx), and pretrained loading with
`in_chans=1`. Shapes at the configs' full input sizes are checked on the meta device (no memory, no compute);
values on one random-weight model per variant at small inputs.
"""

import copy
import math
from contextlib import contextmanager

import pytest
import torch
from conftest import randomize_
from timm.models import FeatureInfo, adapt_input_conv, get_notrace_functions, get_notrace_modules
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import mambaout
from mambaout.models.features import features_only
from mambaout.weights import convert_state_dict

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = mambaout.list_models()
ALL_TAGS = mambaout.list_models(include_tags=True)
SIZE = (64, 64)  # timm's features/fx tests run at 96-128 px; every stride still leaves a 2x2 map here
BWD_SIZE = (32, 32)
TRACER_KWARGS = dict(
    leaf_modules=get_notrace_modules(), autowrap_functions=get_notrace_functions(), param_shapes_constant=True
)


def meta_model(name: str, **kwargs) -> nn.Module:
    with torch.device("meta"):
        return mambaout.create_model(name, **kwargs)


@pytest.fixture(scope="module")
def model(request) -> nn.Module:
    """One variant with random weights and 42 classes (timm's backward test), built once per module."""
    torch.manual_seed(ALL.index(request.param))
    return randomize_(meta_model(request.param, num_classes=42).to_empty(device="cpu")).eval()


@contextmanager
def grad_checkpointing(model: nn.Module):
    model.set_grad_checkpointing(True)
    try:
        yield
    finally:
        model.set_grad_checkpointing(False)


def images(batch: int = 1, size: tuple[int, int] = SIZE) -> torch.Tensor:
    return torch.randn(batch, 3, *size)


def assert_all_params_have_grads(model: nn.Module) -> None:
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"no gradient for {missing[:3]}"
    assert sum(p.numel() for p in model.parameters()) == sum(p.grad.numel() for p in model.parameters())


def fx_model(model: nn.Module) -> nn.Module:
    """timm's `_create_fx_model`: torchvision's feature extractor returning the model's output, the classifier's."""
    return create_feature_extractor(model, [model.pretrained_cfg["classifier"]], tracer_kwargs=TRACER_KWARGS)


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_forward(model):
    x = images()
    with torch.no_grad():
        out = model(x)
        with grad_checkpointing(model):
            again = model(x)
    assert out.shape == (1, 42) and not out.isnan().any()
    torch.testing.assert_close(again, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_backward(model):
    model.train().zero_grad()
    try:
        out = model(images(2, BWD_SIZE))
        out.mean().backward()
        assert out.shape == (2, 42) and not out.isnan().any()
        assert_all_params_have_grads(model)
    finally:
        model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("name", ALL_TAGS)
def test_model_default_cfgs(name):
    model = meta_model(name)
    cfg = model.default_cfg
    assert cfg is model.pretrained_cfg and cfg["architecture"] == name.split(".")[0]
    assert model.num_classes == cfg["num_classes"] > 0 and model.num_features > 0 and model.head_hidden_size > 0
    x = torch.empty(1, *cfg["input_size"], device="meta")
    feats = model.forward_features(x)
    pre = model.forward_head(feats, pre_logits=True)
    h, w = (1, 2) if model.output_fmt == "NHWC" else (2, 3)
    assert (feats.shape[h], feats.shape[w]) == tuple(cfg["pool_size"])
    assert feats.shape[-1 if model.output_fmt == "NHWC" else 1] == model.num_features
    assert pre.shape == (1, model.head_hidden_size)
    state = model.state_dict()
    assert cfg["classifier"] + ".weight" in state and cfg["first_conv"] + ".weight" in state

    # the head alone after the resets (meta-device ops are slow, and `forward` is `forward_head(forward_features)`)
    model.reset_classifier(0)
    assert model.num_classes == 0 and model.forward_head(feats).shape == pre.shape
    model.reset_classifier(0, "")
    assert model.forward_head(feats).shape[h : w + 1] == tuple(cfg["pool_size"])
    unpooled = meta_model(name, num_classes=0, global_pool="")
    assert unpooled.forward_head(feats).shape[h : w + 1] == tuple(cfg["pool_size"])


@pytest.mark.parametrize("name", ALL)
def test_model_forward_features(name):
    # timm's features test and its getter twin in one: feature_cls "list" and "getter" are the same extractor here
    features = randomize_(features_only(meta_model(name)).to_empty(device="cpu")).eval()
    channels, reductions = features.feature_info.channels(), features.feature_info.reduction()
    assert len(channels) >= 3
    with torch.no_grad():
        outputs = features(images())
    c = 1 if features.output_fmt == "NCHW" else -1
    assert len(outputs) == len(channels)
    for channel, r, o in zip(channels, reductions, outputs, strict=True):
        assert o.shape[c] == channel and o.shape[0] == 1 and not o.isnan().any()
        assert max(o.shape[2:] if c == 1 else o.shape[1:3]) <= math.ceil(SIZE[0] / r) + 1


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_forward_intermediates(model):
    info = FeatureInfo(copy.deepcopy(model.feature_info), len(model.feature_info))
    x = images()
    with torch.no_grad():
        final, inter = model.forward_intermediates(x, output_fmt="NCHW")
        torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
        with grad_checkpointing(model):
            again, _ = model.forward_intermediates(x, output_fmt="NCHW")
    torch.testing.assert_close(again, final, rtol=1e-4, atol=1e-5)
    assert [o.shape[1] for o in inter] == info.channels()
    assert [SIZE[0] // o.shape[2] for o in inter] == info.reduction()


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_forward_fx_and_fx_torchscript(model):
    x = images()
    with torch.inference_mode():
        out = model(x)
        traced = fx_model(model)
        fx_out = torch.cat(tuple(traced(x).values()))
        fx_scripted = torch.cat(tuple(torch.jit.script(traced)(x).values()))
    assert torch.equal(fx_out, out) and not out.isnan().any()
    torch.testing.assert_close(fx_scripted, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_backward_fx(model):
    traced = fx_model(model.train())
    try:
        out = torch.cat(tuple(traced(images(2, BWD_SIZE)).values()))
        out.mean().backward()
        assert out.shape == (2, 42) and not out.isnan().any()
        assert_all_params_have_grads(traced)
    finally:
        model.eval().zero_grad(set_to_none=True)


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_forward_torchscript(model):
    x = images()
    with torch.inference_mode():
        scripted = torch.jit.script(model)(x)
        out = model(x)
    torch.testing.assert_close(scripted, out, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("model", ALL, indirect=True)
def test_model_load_pretrained_in_chans_1(model):
    """timm's pretrained test (in_chans=1, num_classes 5 and 0, features_only), from weights in memory."""
    weights = convert_state_dict(model.state_dict(), to="timm")
    overlay = dict(state_dict=weights)
    name = model.pretrained_cfg["architecture"]
    one = meta_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=5)
    stem = weights["stem.conv1.weight"]
    torch.testing.assert_close(one.stem.conv1.weight, stem.sum(1, keepdim=True))
    torch.testing.assert_close(one.stem.conv1.weight, adapt_input_conv(1, stem))
    assert one.get_classifier().out_features == 5
    pooled = meta_model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1, num_classes=0)
    assert pooled.num_classes == 0 and isinstance(pooled.get_classifier(), nn.Identity)
    features = meta_model(name, pretrained=True, pretrained_cfg_overlay=overlay, features_only=True)
    last = f"stages.3.blocks.{len(model.stages[3].blocks) - 1}.fc2.weight"
    assert torch.equal(features.stages[3].blocks[-1].fc2.weight, weights[last])
