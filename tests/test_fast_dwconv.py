"""The depthwise conv's compiled backward gives PyTorch's gradients, and steps aside where it cannot compile."""

import copy
import warnings

import pytest
import torch
from test_fast_train import assert_step_gives_the_plain_update, femto

from mambaout.fast import dwconv
from mambaout.fast.train_step import TrainStepConfig, split_linear_blocks
from mambaout.layers import DepthwiseConvMixer

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def fresh_kernels():
    """Empty caches of compiled kernels and warnings before and after (a test may patch the compiler)."""
    dwconv.compiled_weight_grad.cache_clear()
    dwconv._warn_once.cache_clear()
    yield
    dwconv.compiled_weight_grad.cache_clear()
    dwconv._warn_once.cache_clear()


def conv_and_input(kernel: int, shape=(3, 9, 11, 16)) -> tuple[DepthwiseConvMixer, torch.Tensor]:
    torch.manual_seed(0)
    mixer = DepthwiseConvMixer(shape[-1], kernel)
    with torch.no_grad():
        mixer.conv.bias.uniform_(-0.5, 0.5)
    return mixer, torch.randn(shape)


def reference_grads(mixer: DepthwiseConvMixer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    mixer = copy.deepcopy(mixer)
    x = x.clone().requires_grad_(True)
    out = mixer(x)
    out.backward(grad)
    return [out.detach(), x.grad, mixer.conv.weight.grad, mixer.conv.bias.grad]


def fast_grads(mixer: DepthwiseConvMixer, x: torch.Tensor, grad: torch.Tensor) -> list[torch.Tensor]:
    mixer = copy.deepcopy(mixer)
    x = x.clone().requires_grad_(True)
    out = dwconv.depthwise_conv(mixer.conv, x)
    out.backward(grad)
    return [out.detach(), x.grad, mixer.conv.weight.grad, mixer.conv.bias.grad]


def assert_close(got: list[torch.Tensor], expected: list[torch.Tensor], names=("output", "input grad", "weight grad",
                 "bias grad")) -> None:  # fmt: skip
    for name, a, b in zip(names, got, expected, strict=True):
        assert a.shape == b.shape, name
        assert (a - b).abs().max().item() <= 1e-5 * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("kernel", [7, 3])
def test_weight_grad_is_the_convs_weight_and_bias_gradient(kernel):
    mixer, x = conv_and_input(kernel)
    grad = torch.randn_like(x)
    _, _, weight, bias = reference_grads(mixer, x, grad)
    taps, bias_grad = dwconv.weight_grad(x, grad, kernel)
    assert_close([taps.permute(2, 0, 1).unsqueeze(1), bias_grad], [weight, bias], ("weight grad", "bias grad"))


@pytest.mark.usefixtures("fresh_kernels")
@pytest.mark.parametrize(("kernel", "piece_images"), [(7, 3), (3, 3), (7, 2)])
def test_compiled_backward_gives_pytorchs_gradients(kernel, piece_images, monkeypatch):
    monkeypatch.setattr(dwconv, "MIN_WORK", 0)
    mixer, x = conv_and_input(kernel)  # 3 images
    monkeypatch.setattr(dwconv, "PIECE_BYTES", piece_images * 2 * x[0].numel() * 4)  # 2: pieces of 2 and 1
    grad = torch.randn_like(x)
    got = fast_grads(mixer, x, grad)
    sizes = [3] if piece_images == 3 else [2, 1]
    for size in sizes:
        assert dwconv.compiled_weight_grad((size, *x.shape[1:]), kernel, torch.get_num_threads()) is not None
    assert dwconv.compiled_weight_grad.cache_info().currsize == len(sizes)  # the forward compiled just these
    assert_close(got, reference_grads(mixer, x, grad))


@pytest.mark.usefixtures("fresh_kernels")
def test_small_maps_and_no_grad_keep_pytorchs_backward(monkeypatch):
    def refuse(*args):
        raise AssertionError("compiled for a call that should keep PyTorch's backward")

    monkeypatch.setattr(dwconv, "compiled_weight_grad", refuse)
    mixer, x = conv_and_input(7)
    assert x.numel() < dwconv.MIN_WORK
    grad = torch.randn_like(x)
    assert_close(fast_grads(mixer, x, grad), reference_grads(mixer, x, grad))
    monkeypatch.setattr(dwconv, "MIN_WORK", 0)
    with torch.no_grad():
        assert torch.equal(dwconv.depthwise_conv(mixer.conv, x), mixer(x))
    monkeypatch.setenv("MAMBAOUT_FAST_REFERENCE", "1")
    assert_close(fast_grads(mixer, x, grad), reference_grads(mixer, x, grad))


@pytest.mark.usefixtures("fresh_kernels")
def test_a_failed_compile_warns_once_and_keeps_pytorchs_backward(monkeypatch):
    def no_compiler(*args, **kwargs):
        raise RuntimeError("no C++ compiler\nsecond line")

    monkeypatch.setattr(dwconv, "MIN_WORK", 0)
    monkeypatch.setattr(torch._inductor, "compile", no_compiler)
    mixer, x = conv_and_input(7)
    grad = torch.randn_like(x)
    with pytest.warns(RuntimeWarning, match=r"compiled weight gradient is unavailable \(RuntimeError: no C\+\+ com"):
        got = fast_grads(mixer, x, grad)
    assert_close(got, reference_grads(mixer, x, grad))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        fast_grads(mixer, x[:2], grad[:2])  # another shape: no second warning


@pytest.mark.usefixtures("fresh_kernels")
def test_step_with_the_compiled_conv_gradient_gives_the_plain_update(monkeypatch):
    monkeypatch.setattr(dwconv, "MIN_WORK", 0)  # femto at 48² in one piece: four stage shapes, each compiled
    assert_step_gives_the_plain_update(TrainStepConfig(micro_batch=3, split_linears=True), batch=3, size=48)
    assert dwconv.compiled_weight_grad.cache_info().currsize == 4


def test_split_blocks_can_keep_pytorchs_conv_backward(monkeypatch):
    def refuse(*args):
        raise AssertionError("the compiled conv ran with compiled_conv_grad=False")

    monkeypatch.setattr(dwconv, "MIN_WORK", 0)
    monkeypatch.setattr("mambaout.fast.train_step.depthwise_conv", refuse)
    model = femto()
    with split_linear_blocks(model, compiled_conv_grad=False):
        model(torch.randn(1, 3, 32, 32)).sum().backward()
    assert all("compiled_conv_grad" not in vars(b) for s in model.stages for b in s.blocks)
