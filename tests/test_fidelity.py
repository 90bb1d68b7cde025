"""Fidelity to timm: every variant computes timm's logits from the same weights, through files and conversions.

All weights are random (norm affines and LayerScales included, see `conftest.randomize_`), so a wrong key mapping
cannot hide behind an init value. Models are built on the meta device and materialised without their slow init;
each variant is built once and shared by the tests of that variant.
"""

from dataclasses import dataclass

import pytest
import safetensors.torch
import timm
import timm.models.mambaout as timm_mambaout
import torch
from conftest import randomize_
from torch import nn

import mambaout
from mambaout.models import get_spec
from mambaout.weights import convert_state_dict, load_checkpoint, save_state_dict

ALL = mambaout.list_models()
PAPER = [name for name in ALL if get_spec(name).family == "paper"]
SIZES = ((224, 224), (160, 192))
ATOL = 1e-5


@dataclass
class Pair:
    name: str
    timm: nn.Module
    ours: nn.Module


@pytest.fixture(scope="module")
def pair(request) -> Pair:
    """timm's and our model of one variant, fp32, eval mode, weights uninitialised (every test randomises them)."""
    with torch.device("meta"):
        theirs = timm.create_model(request.param)
        ours = mambaout.create_model(request.param)
    return Pair(request.param, theirs.to_empty(device="cpu").eval(), ours.to_empty(device="cpu").eval())


def assert_same_logits(a: nn.Module, b: nn.Module, size: tuple[int, int]) -> None:
    images = torch.randn(1, 3, *size)
    with torch.inference_mode():
        expected, actual = a(images), b(images)
    assert actual.shape == expected.shape == (1, 1000)
    error = (actual - expected).abs().max().item()
    assert error <= ATOL, f"max |logits difference| {error:.3g} at {size}"


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_timm_checkpoint_file_gives_timm_logits(pair, tmp_path):
    randomize_(pair.timm)
    weights = pair.timm.state_dict()
    if ALL.index(pair.name) % 2:
        path = tmp_path / "timm.safetensors"
        safetensors.torch.save_file(weights, path)
    else:
        path = tmp_path / "timm.pth"
        torch.save(weights, path)
    load_checkpoint(pair.ours, path)
    for size in SIZES:
        assert_same_logits(pair.timm, pair.ours, size)


@pytest.mark.parametrize("pair", ALL, indirect=True)
def test_our_weights_converted_to_timm_give_our_logits(pair):
    randomize_(pair.ours)
    pair.timm.load_state_dict(convert_state_dict(pair.ours.state_dict(), to="timm"), strict=True)
    assert_same_logits(pair.ours, pair.timm, SIZES[1])


@pytest.mark.parametrize("pair", PAPER, indirect=True)
def test_official_layout_round_trip(pair, tmp_path):
    weights = randomize_(pair.ours).state_dict()
    official = convert_state_dict(weights, to="official")
    back = convert_state_dict(official, to="mambaout")
    assert list(back) == list(weights)
    assert all(torch.equal(back[k], weights[k]) for k in weights)
    # timm reads the official layout with its own filter: an independent check of our official key names
    pair.timm.load_state_dict(timm_mambaout.checkpoint_filter_fn(official, pair.timm), strict=True)
    path = save_state_dict(official, tmp_path / f"{pair.name}.pth")
    randomize_(pair.ours)  # only the file can bring the weights back now
    load_checkpoint(pair.ours, path)
    assert_same_logits(pair.timm, pair.ours, SIZES[1])
