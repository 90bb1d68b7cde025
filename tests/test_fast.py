"""The fused inference path computes the reference function: logits, features, every variant, both kernel sets.

Weights are random (norm affines and LayerScales included) and inputs fresh and small (non-square, batch 1 and 3),
so a wrong fold or layout shows. Each variant is built once (meta device, no slow init) and shared by its tests.
"""

import contextlib
import dataclasses
from dataclasses import dataclass

import numpy as np
import pytest
import skimage.data
import torch
import torch.nn.functional as F
from conftest import randomize_

import mambaout
from mambaout.fast import (
    REFERENCE_ENV,
    FastMambaOut,
    FusedGatedCNNBlock,
    auto_micro_batch,
    micro_batches,
    optimize_for_inference,
    select_kernels,
)
from mambaout.fast.kernels import ONEDNN_MIN_ROWS, onednn_min_rows
from mambaout.layers import TOKEN_MIXERS, DepthwiseConvMixer, GatedCNNBlock
from mambaout.models import MambaOut

ALL = mambaout.list_models()
ATOL = 1e-4
PHOTOS = ("astronaut", "chelsea", "coffee", "rocket", "immunohistochemistry", "hubble_deep_field")


pytestmark = pytest.mark.usefixtures("one_thread")


@dataclass
class Built:
    name: str
    ref: MambaOut
    fast: FastMambaOut


@pytest.fixture(scope="module")
def built(request) -> Built:
    """A variant with random weights (seeded) and its fast path, fp32, built once per module."""
    torch.manual_seed(ALL.index(request.param))
    with torch.device("meta"):
        ref = mambaout.create_model(request.param)
    ref = randomize_(ref.to_empty(device="cpu")).eval()
    # oneDNN's kernels on every input, so that the small test images exercise them (by default: tall inputs only)
    onednn_everywhere = dataclasses.replace(select_kernels("cpu", torch.float32), min_rows=0)
    return Built(request.param, ref, optimize_for_inference(ref, kernels=onednn_everywhere))


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@pytest.mark.parametrize("built", ALL, indirect=True)
def test_logits_features_and_head_match_reference(built):
    images, single = torch.randn(2, 3, 64, 96), torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        feats = built.ref.forward_features(images)
        assert max_diff(built.fast.forward_features(images), feats) <= ATOL
        assert max_diff(built.fast(images), built.ref.forward_head(feats)) <= ATOL
        assert max_diff(built.fast.forward_head(feats, pre_logits=True), built.ref.forward_head(feats, True)) <= ATOL
        assert max_diff(built.fast(single), built.ref(single)) <= ATOL


@pytest.mark.parametrize("built", [ALL[0], "mambaout_small_rw"], indirect=True)
@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"indices": 2, "norm": True, "output_fmt": "NHWC"},
        {"indices": [0, -2], "stop_early": True},
        {"indices": [1], "intermediates_only": True},
    ],
)
def test_intermediates_match_reference(built, kwargs):
    images = torch.randn(2, 3, 64, 96)
    with torch.inference_mode():
        expected = built.ref.forward_intermediates(images, **kwargs)
        actual = built.fast.forward_intermediates(images, **kwargs)
    if not kwargs.get("intermediates_only"):
        assert max_diff(actual[0], expected[0]) <= ATOL
        expected, actual = expected[1], actual[1]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        assert a.is_contiguous() == e.is_contiguous()
        assert max_diff(a, e) <= ATOL


@pytest.mark.parametrize("built", [ALL[0], "mambaout_base_wide_rw"], indirect=True)
def test_fallback_kernels_give_the_same_results(built, monkeypatch):
    images = torch.randn(2, 3, 64, 64)
    monkeypatch.setenv(REFERENCE_ENV, "1")
    assert not select_kernels("cpu", torch.float32).onednn
    plain = optimize_for_inference(built.ref, backend="torch")
    assert not plain.kernels.onednn
    with torch.inference_mode():
        assert max_diff(plain(images), built.fast(images)) <= 1e-5
        assert max_diff(plain(images), built.ref(images)) <= ATOL


@pytest.mark.parametrize("built", ALL[:1], indirect=True)
def test_onednn_kernels_serve_tall_inputs_and_composed_ops_short_ones(built):
    default = optimize_for_inference(built.ref, backend="torch")
    if not default.kernels.onednn:
        pytest.skip("no oneDNN kernels on this machine")  # the composed ops are what every other test then checks
    # oneDNN serves short inputs too where it measured faster on them than MKL (AVX-512 on AMD), else tall ones only
    assert default.kernels.min_rows in (0, ONEDNN_MIN_ROWS)
    assert default.kernels.min_rows == onednn_min_rows(torch.float32)
    tall = dataclasses.replace(default.kernels, min_rows=ONEDNN_MIN_ROWS)
    assert tall._onednn_for(torch.empty(ONEDNN_MIN_ROWS, 8))
    assert not tall._onednn_for(torch.empty(ONEDNN_MIN_ROWS - 1, 8))
    images = torch.randn(1, 3, 384, 352)  # stage 1 has 96 x 88 = 8448 pixels: oneDNN there, composed ops later
    with torch.inference_mode():
        assert max_diff(optimize_for_inference(built.ref, kernels=tall)(images), built.ref(images)) <= ATOL
        assert max_diff(default(images), built.ref(images)) <= ATOL


@pytest.mark.parametrize("built", ALL[:1], indirect=True)
def test_micro_batches_give_the_whole_batch_result(built):
    images = torch.randn(3, 3, 64, 96)
    with torch.inference_mode():
        whole = optimize_for_inference(built.ref, micro_batch=3)(images)
        assert max_diff(optimize_for_inference(built.ref, micro_batch=2)(images), whole) <= 1e-5
        assert max_diff(built.fast(images), whole) <= 1e-5


def test_micro_batches_are_even_views():
    x = torch.arange(32.0)
    assert [len(p) for p in micro_batches(x, 31)] == [16, 16]
    assert [len(p) for p in micro_batches(x, 7)] == [7, 7, 6, 6, 6]
    assert [len(p) for p in micro_batches(x, 64)] == [32]
    assert torch.equal(torch.cat(micro_batches(x, 5)), x) and micro_batches(x, 5)[1].data_ptr() == x[5:].data_ptr()


@pytest.mark.parametrize("built", ALL[:1], indirect=True)
def test_conv_weights_are_channels_last(built):
    # oneDNN's NHWC convolution would otherwise reorder the stem's and downsamplers' weights on every call (the
    # depthwise [C, 1, k, k] weights are channels-last either way)
    convs = [m for m in built.fast.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(m.weight.is_contiguous(memory_format=torch.channels_last) for m in convs)
    assert not all(m.weight.is_contiguous() for m in convs)


def test_auto_micro_batches_grow_with_depth():
    ref = MambaOut(depths=(1, 1, 1, 1), dims=(48, 96, 192, 288))
    sizes = auto_micro_batch(ref, (224, 224), torch.float32)
    assert len(sizes) == 4 and sizes == sorted(sizes) and sizes[0] >= 1
    assert auto_micro_batch(ref, (224, 224), torch.bfloat16)[0] >= sizes[0]


@pytest.mark.parametrize("built", ALL[:1], indirect=True)
def test_inputs_and_reference_are_left_untouched(built):
    images = torch.randn(2, 3, 64, 64)
    before_images = images.clone()
    before_weights = {k: v.clone() for k, v in built.ref.state_dict().items()}
    with torch.no_grad():
        built.fast(images)
        built.fast.forward_intermediates(images)
    assert torch.equal(images, before_images)
    assert all(torch.equal(v, before_weights[k]) for k, v in built.ref.state_dict().items())
    assert built.ref.stages[0].blocks[0].__class__ is GatedCNNBlock


def test_every_block_is_fused_with_any_mixer():
    class ScaledConv(DepthwiseConvMixer):
        def forward(self, x):
            return 2 * super().forward(x)

    torch.manual_seed(0)
    ref = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=10)).eval()
    fast = optimize_for_inference(ref)
    assert sum(isinstance(m, FusedGatedCNNBlock) for m in fast.modules()) == 2
    other = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=10, token_mixer=ScaledConv)).eval()
    fast_other = optimize_for_inference(other, backend="torch")
    fused = [m for m in fast_other.modules() if isinstance(m, FusedGatedCNNBlock)]
    assert len(fused) == 2 and all(isinstance(m.mixer, ScaledConv) for m in fused)  # the subclass kept as a module
    images = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert max_diff(fast_other(images), other(images)) <= ATOL


@pytest.mark.parametrize("mixer", [name for name in TOKEN_MIXERS if name != "conv"])
def test_other_token_mixers_are_fused_and_match_the_reference(mixer):
    torch.manual_seed(0)
    ref = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=10, token_mixer=mixer)).eval()
    fast = optimize_for_inference(ref, micro_batch=2)  # micro-batches of 2 out of 3 images: each image alone
    assert sum(isinstance(m, FusedGatedCNNBlock) and m.mixer is not None for m in fast.modules()) == 2
    images = torch.randn(3, 3, 40, 72)
    with torch.inference_mode():
        assert max_diff(fast(images), ref(images)) <= ATOL
        feats = fast.forward_intermediates(images, intermediates_only=True)
        want = ref.forward_intermediates(images, intermediates_only=True)
        assert all(max_diff(f, w) <= ATOL for f, w in zip(feats, want, strict=True))


def test_compiled_path_matches_reference():
    torch.manual_seed(0)
    ref = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=10)).eval()
    fast = optimize_for_inference(ref, compile=True)
    images = torch.randn(3, 3, 64, 64)
    with torch.inference_mode():
        assert max_diff(fast(images), ref(images)) <= ATOL


def test_bad_arguments_raise():
    ref = MambaOut(depths=(1,), dims=(16,), num_classes=4)
    with pytest.raises(ValueError, match="dtype"):
        optimize_for_inference(ref, dtype=torch.float16)
    with pytest.raises(ValueError, match="micro_batch"):
        optimize_for_inference(ref, micro_batch=0)


def photo_batch(size: int = 128) -> torch.Tensor:
    """The bundled scikit-image photos, resized to `size`², ImageNet-normalised: `[P, 3, size, size]`."""
    images = []
    for name in PHOTOS:
        img = torch.from_numpy(np.ascontiguousarray(getattr(skimage.data, name)()[..., :3])).permute(2, 0, 1)
        img = F.interpolate(img[None].float() / 255, size=(size, size), mode="bilinear", antialias=True)
        images.append(img[0])
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    return (torch.stack(images) - mean[:, None, None]) / std[:, None, None]


def photo_classifier() -> MambaOut:
    """femto with random weights and a classifier fitted to tell the photos apart (class k = photo k).

    Random weights alone give near-tied logits, whose top-1 is noise; a least-squares classifier on the fp32
    pre-logits features makes the predictions meaningful, so bf16 must reproduce real decisions.
    """
    with torch.device("meta"):
        model = mambaout.create_model("mambaout_femto", num_classes=len(PHOTOS))
    model = randomize_(model.to_empty(device="cpu")).eval()
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(photo_batch()), pre_logits=True)  # [P, F]
        feats = torch.cat([feats, torch.ones(len(PHOTOS), 1)], 1)
        solution = torch.linalg.lstsq(feats, 4 * torch.eye(len(PHOTOS))).solution  # [F + 1, P]
        model.head.fc.weight.copy_(solution[:-1].T)
        model.head.fc.bias.copy_(solution[-1])
    return model


def test_bf16_agrees_with_fp32_on_photos():
    torch.manual_seed(0)
    ref = photo_classifier()
    photos = photo_batch()
    views = torch.cat([photos, photos.flip(-1), F.interpolate(photos[..., 8:-8, 8:-8], size=(128, 128))])
    truth = torch.arange(len(PHOTOS)).repeat(3)
    # CPUs without bf16 matrix units are warned that bf16 is slow there; the results must agree all the same
    slow = not select_kernels("cpu", torch.bfloat16).onednn
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="bf16") if slow else contextlib.nullcontext():
        fp32 = optimize_for_inference(ref, backend="torch")(views)
        bf16 = optimize_for_inference(ref, dtype=torch.bfloat16)(views)
        assert max_diff(fp32, ref(views)) <= ATOL
    assert bf16.dtype == torch.float32  # outputs come back in the input's dtype
    assert torch.equal(fp32[: len(PHOTOS)].argmax(1), truth[: len(PHOTOS)])  # the classifier is meaningful
    assert torch.equal(bf16.argmax(1), fp32.argmax(1))  # and bf16 makes the same decisions on every view
    # and the logits as a whole: per view, bf16's logits correlate with fp32's almost perfectly
    centred32, centred16 = fp32 - fp32.mean(1, keepdim=True), bf16 - bf16.mean(1, keepdim=True)
    assert F.cosine_similarity(centred32, centred16).min().item() > 0.99
