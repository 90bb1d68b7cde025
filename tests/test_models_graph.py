"""Every graph tool takes the model and the features_only extractor, grad checkpointing on or off, and computes
eager's forward and backward: torch.fx (and torchvision's `create_feature_extractor`), TorchScript, torch.export and
`torch.compile(fullgraph=True)`.

What a graph tool can trip on is code, not size, so each registered variant is tested as its twin: the same
constructor flags (stem, downsampling, LayerScale, head, activation, conv ratio) with one block per stage and narrow
stages. The full-size variants go through fx and TorchScript in `test_models_timm.py`. `torch.compile` runs
"aot_eager", which captures the forward and backward graphs as inductor would and runs them without generating code.
"""

import pytest
import torch
from conftest import randomize_
from torch import nn
from torchvision.models.feature_extraction import create_feature_extractor

import mambaout
from mambaout.models import MambaOut, get_spec
from mambaout.models.features import features_only

pytestmark = pytest.mark.usefixtures("one_thread")

ALL = mambaout.list_models()
TOOLS = ("fx", "torchscript", "export", "compile")


def twin(name: str, num_classes: int = 5) -> MambaOut:
    """`name`'s constructor flags with one block per stage and narrow stages, random weights."""
    torch.manual_seed(ALL.index(name))
    return randomize_(get_spec(name).build(depths=(1, 1, 1, 1), dims=(16, 32, 48, 64), num_classes=num_classes))


def graph(model: nn.Module, tool: str, x: torch.Tensor) -> nn.Module:
    if tool == "fx":
        return torch.fx.symbolic_trace(model)
    if tool == "torchscript":
        return torch.jit.script(model)
    if tool == "export":
        return torch.export.export(model, (x,)).module()
    torch._dynamo.reset()
    return torch.compile(model, fullgraph=True, backend="aot_eager")


def outputs(y: torch.Tensor | list[torch.Tensor]) -> list[torch.Tensor]:
    return list(y) if isinstance(y, (list, tuple)) else [y]


def assert_graph_matches_eager(model: nn.Module, tool: str, checkpointing: bool) -> None:
    """Forward values and parameter gradients of the tool's graph equal eager's (train mode, so both run)."""
    model.train().set_grad_checkpointing(checkpointing)
    x = torch.randn(2, 3, 32, 32)
    expected = outputs(model(x))
    sum(y.square().sum() for y in expected).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    actual = outputs(graph(model, tool, x)(x))
    sum(y.square().sum() for y in actual).backward()
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    for n, p in model.named_parameters():
        assert p.grad is not None, n
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-4, atol=1e-6, msg=n)


# compiling is the slow tool, so it takes two variants that have every flag between them (paper and rw stem,
# downsampling and head; no LayerScale and LayerScale; GELU and SiLU; full and partial conv ratio), one plain and
# one checkpointed; the other tools take every variant both ways
CASES = [
    *[(name, tool, checkpointing) for name in ALL for tool in TOOLS[:-1] for checkpointing in (False, True)],
    (ALL[0], "compile", False),
    (ALL[-1], "compile", True),
]


@pytest.mark.parametrize(("name", "tool", "checkpointing"), CASES)
def test_model_graphs_match_eager(name, tool, checkpointing):
    assert_graph_matches_eager(twin(name), tool, checkpointing)


@pytest.mark.parametrize("checkpointing", [False, True], ids=["plain", "checkpointed"])
@pytest.mark.parametrize("tool", TOOLS)
def test_features_only_graphs_match_eager(tool, checkpointing):
    assert_graph_matches_eager(features_only(twin(ALL[-1]), out_indices=(0, 2, 3)), tool, checkpointing)


def test_torchvision_feature_extractor_gives_the_stage_maps():
    model = twin(ALL[0]).eval()
    nodes = {f"stages.{i}": str(i) for i in range(4)} | {"head.fc": "logits"}
    extractor = create_feature_extractor(model, return_nodes=nodes)
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        got = extractor(x)
        final, stages = model.forward_intermediates(x, output_fmt="NHWC")
        logits = model(x)
    for i, stage in enumerate(stages):
        torch.testing.assert_close(got[str(i)], stage, rtol=0, atol=0)
    torch.testing.assert_close(got["logits"], logits, rtol=0, atol=0)
    torch.testing.assert_close(got["3"], final, rtol=0, atol=0)
