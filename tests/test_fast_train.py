"""The fast training step computes the plain step's update: same loss, same gradients, same new weights."""

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_
from torch import nn

import mambaout
from mambaout.fast.kernels import cpu_has_kernels
from mambaout.fast.train_step import (
    OneDNNLinear,
    SplitLinearGatedCNNBlock,
    TrainStepConfig,
    auto_train_micro_batch,
    fused_adamw,
    make_train_step,
    split_linear_blocks,
)
from mambaout.layers import GatedCNNBlock

pytestmark = pytest.mark.usefixtures("one_thread")


def femto(num_classes: int = 10) -> nn.Module:
    with torch.device("meta"):
        model = mambaout.create_model("mambaout_femto", num_classes=num_classes)
    return randomize_(model.to_empty(device="cpu")).train()


def plain_step(model: nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    # SGD with lr 1: the weight change is the gradient itself, so comparing weights compares gradients
    # (Adam would divide rounding noise in near-zero gradients by their own magnitude)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = nn.functional.cross_entropy(model(images), targets)
    loss.backward()
    optimizer.step()
    return loss.item()


def assert_step_gives_the_plain_update(config: TrainStepConfig, batch: int, size: int) -> None:
    """One step of `make_train_step` with `config` on a random femto changes the weights as the plain step does."""
    torch.manual_seed(0)
    model = femto()
    images, targets = torch.randn(batch, 3, size, size), torch.randint(0, 10, (batch,))
    expected_model = copy.deepcopy(model)
    expected_loss = plain_step(expected_model, images, targets)

    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    loss = make_train_step(model, optimizer, nn.CrossEntropyLoss(), config)(images, targets)
    assert loss == pytest.approx(expected_loss, rel=1e-5)
    for (name, p), q in zip(model.named_parameters(), expected_model.parameters(), strict=True):
        assert (p - q).abs().max().item() <= 1e-5 * max(1.0, q.abs().max().item()), name
        assert p.grad is None  # cleared after the step


@pytest.mark.parametrize("micro_batch", [5, 2, None])
def test_micro_batched_step_gives_the_whole_batch_update(micro_batch):
    assert_step_gives_the_plain_update(TrainStepConfig(micro_batch=micro_batch), batch=5, size=64)


def test_fused_adamw_matches_adamw():
    torch.manual_seed(0)
    params = [nn.Parameter(torch.randn(64, 32)), nn.Parameter(torch.randn(32))]
    twins = [nn.Parameter(p.detach().clone()) for p in params]
    fused = fused_adamw(params, lr=1e-3, weight_decay=0.05)
    plain = torch.optim.AdamW(twins, lr=1e-3, weight_decay=0.05, foreach=False)
    for _ in range(3):
        grads = [torch.randn_like(p) for p in params]
        for p, q, g in zip(params, twins, grads, strict=True):
            p.grad, q.grad = g.clone(), g.clone()
        fused.step()
        plain.step()
    for p, q in zip(params, twins, strict=True):
        assert (p - q).abs().max().item() <= 1e-6


def test_bf16_autocast_step_gives_the_plain_update_to_bf16_precision():
    torch.manual_seed(0)
    model = femto()
    images, targets = torch.randn(4, 3, 64, 64), torch.randint(0, 10, (4,))
    expected_model = copy.deepcopy(model)
    reference = plain_step(expected_model, images, targets)  # fp32, whole batch, SGD lr 1: the update is the gradient
    step = make_train_step(
        model,
        torch.optim.SGD(model.parameters(), lr=1.0),
        nn.CrossEntropyLoss(),
        TrainStepConfig(amp_dtype=torch.bfloat16, micro_batch=2),
    )
    before = copy.deepcopy(model)
    loss = step(images, targets)
    assert abs(loss - reference) <= 0.05 * abs(reference)
    got, want = ([(b - a).flatten() for a, b in zip(before.parameters(), m.parameters(), strict=True)]
                 for m in (model, expected_model))  # fmt: skip
    got, want = torch.cat(list(got)), torch.cat(list(want))
    # bf16 keeps 8 bits of mantissa: the update as a whole within a few percent of fp32's, pointing the same way
    assert (got - want).norm() <= 0.03 * want.norm()  # 0.9% here; half the batch would be 95%
    assert F.cosine_similarity(got, want, dim=0) >= 0.999


def test_auto_micro_batch_and_config_checks():
    model = femto()
    assert auto_train_micro_batch(model, (224, 224), torch.float32) >= 1
    assert auto_train_micro_batch(model, (64, 64), torch.float32) > auto_train_micro_batch(
        model, (224, 224), torch.float32
    )
    with pytest.raises(ValueError, match="micro_batch"):
        TrainStepConfig(micro_batch=0)
    with pytest.raises(ValueError, match="amp_dtype"):
        TrainStepConfig(amp_dtype=torch.float16)


def test_split_linear_blocks_compute_the_same_outputs_and_gradients():
    torch.manual_seed(0)
    model = femto()
    twin = copy.deepcopy(model)
    images = torch.randn(2, 3, 64, 64)
    model(images).square().sum().backward()
    with split_linear_blocks(twin) as split:
        assert type(split.stages[0].blocks[0]) is SplitLinearGatedCNNBlock
        out = twin(images)
        out.square().sum().backward()
    assert type(twin.stages[0].blocks[0]) is GatedCNNBlock  # switched back
    assert list(twin.state_dict()) == list(model.state_dict())
    for (name, p), q in zip(model.named_parameters(), twin.parameters(), strict=True):
        assert (p.grad - q.grad).abs().max().item() <= 1e-5 * max(1.0, p.grad.abs().max().item()), name


def test_split_linear_blocks_switch_back_on_errors():
    model = femto()
    with pytest.raises(RuntimeError), split_linear_blocks(model):
        model(torch.randn(1, 5, 64, 64))  # wrong channel count
    assert all(type(b) is GatedCNNBlock for s in model.stages for b in s.blocks)


def test_onednn_linear_matches_f_linear_with_gradients():
    if not cpu_has_kernels(torch.float32):
        pytest.skip("no oneDNN linear kernels in this PyTorch build")  # then the step uses F.linear throughout
    torch.manual_seed(0)
    x = torch.randn(2, 5, 7, 24, requires_grad=True)
    full = torch.randn(40, 48, requires_grad=True)
    bias = torch.randn(40, requires_grad=True)
    twins = [t.detach().clone().requires_grad_() for t in (x, full, bias)]
    weight = full[:, 8:32]  # a column slice, as fc2's halves: not contiguous
    OneDNNLinear.apply(x, weight.contiguous(), bias).square().sum().backward()
    F.linear(twins[0], twins[1][:, 8:32], twins[2]).square().sum().backward()
    for got, want in zip((x, full, bias), twins, strict=True):
        assert torch.allclose(got.grad, want.grad, rtol=1e-4, atol=1e-4)
