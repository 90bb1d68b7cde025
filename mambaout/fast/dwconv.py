"""The depthwise conv's backward for the CPU training step: its weight gradient as one compiled reduction.

PyTorch's CPU backward of MambaOut's 7×7 depthwise conv on channels-last maps gives the weight gradient to oneDNN's
generic convolution kernel (`jit:avx512_core`/`jit:avx2` `backward_weights`; oneDNN's depthwise kernel wants a
blocked layout): at femto's stage 1 (16 images of 56×56×48) it takes 17 ms against the forward's 1.1 ms, and all
the block convs' backward passes together were a fifth of the CPU training step on the dev machines
(`python scripts/cpu_probes.py train-profile`; timm's step pays the same). Here the backward is two cheaper parts:

- the input gradient is the depthwise conv of the output gradient with the kernel flipped (oneDNN's fast depthwise
  forward kernel);
- the weight and bias gradients, `grad_w[i, j, c] = Σ_{b,h,w} x[b, h+i-p, w+j-p, c] · g[b, h, w, c]` and
  `grad_b[c] = Σ g`, are one reduction that inductor compiles into a single vectorised loop for each input shape
  (`torch._inductor.compile` on the traced graph: one compile per shape, no dynamo recompile limit), run over
  pieces of the batch whose maps fit in a core's L2 cache (`PIECE_BYTES`) and summed: 3-20× faster than oneDNN's
  generic kernel at femto's shapes on the dev machine (stage 1: 0.2 ms per image in pieces of one, against
  0.6 ms in pieces of 16 and 1.1 ms through oneDNN).

Compilation takes a few seconds per shape and thread count (inductor sizes its per-thread buffers when it compiles,
so a step that drops to one thread when another process takes a core builds its kernels again, once), so only convs
with at least `MIN_WORK` elements per call use it (the step's large-map micro-batches; small maps, as in the digits
default, keep PyTorch's backward), and where it cannot compile (no C++ compiler, an unsupported PyTorch) the weight
gradient falls back to PyTorch's, with one warning. `MAMBAOUT_FAST_REFERENCE=1` keeps PyTorch's backward everywhere.
"""

import functools
import os
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.fast.kernels import REFERENCE_ENV
from mambaout.fast.optimize import micro_batches

__all__ = ["MIN_WORK", "PIECE_BYTES", "compiled_weight_grad", "depthwise_conv", "weight_grad"]

# elements (batch × height × width × channels) from which a conv's weight gradient is compiled: femto's blocks at
# 224² in micro-batches of 16 have 0.2-2.4M; the digits default at 32² has at most 0.1M
MIN_WORK = 2**17
# bytes of input and gradient one call of the compiled kernel reduces (pieces of at least one image)
PIECE_BYTES = 2**20


def weight_grad(x: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The weight and bias gradients of a same-padded depthwise k×k conv, written as the reduction inductor compiles.

    Args:
        x: The conv's input, `[B, H, W, C]`.
        grad: The gradient of its output, `[B, H, W, C]`.
        kernel_size: k (odd; padding k // 2).

    Returns:
        `[k, k, C]` weight gradient (tap-major) and `[C]` bias gradient.
    """
    _, height, width, channels = x.shape
    pad = kernel_size // 2
    padded = F.pad(x, (0, 0, pad, pad, pad, pad))  # [B, H + 2p, W + 2p, C]
    taps = [
        (padded[:, i : i + height, j : j + width] * grad).sum((0, 1, 2))
        for i in range(kernel_size)
        for j in range(kernel_size)
    ]
    return torch.stack(taps).view(kernel_size, kernel_size, channels), grad.sum((0, 1, 2))


@functools.lru_cache(maxsize=64)
def compiled_weight_grad(shape: tuple[int, ...], kernel_size: int, threads: int):
    """`weight_grad` compiled by inductor for fp32 `[B, H, W, C]` inputs of `shape` (contiguous), or None where it
    cannot be compiled here (warned once). `threads` is part of the key: inductor sizes its kernels' per-thread
    reduction buffers when it compiles them, and the training step fits its threads to the free cores."""
    from torch.fx.experimental.proxy_tensor import make_fx

    examples = [torch.zeros(shape), torch.zeros(shape)]
    try:
        graph = make_fx(functools.partial(weight_grad, kernel_size=kernel_size))(*examples)
        compiled = torch._inductor.compile(graph, examples)
        compiled(*examples)  # a kernel that fails to build or load fails here, not inside a backward pass
    except Exception as e:  # a missing compiler or headers, a PyTorch without this API: PyTorch's backward instead
        _warn_once(f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return None
    return compiled


@functools.cache
def _warn_once(reason: str) -> None:
    warnings.warn(
        f"the depthwise conv's compiled weight gradient is unavailable ({reason}); the training step uses PyTorch's "
        "(slower on the CPU)",
        RuntimeWarning,
        stacklevel=4,
    )


def _piece_kernels(shape: tuple[int, ...], kernel_size: int) -> tuple[int, dict] | None:
    """Images per piece for `[B, H, W, C]` maps of `shape`, and the compiled kernel of each piece shape (one or two:
    the pieces are as even as possible); None where they cannot be compiled here."""
    per_image = 2 * shape[1] * shape[2] * shape[3] * 4  # input and gradient, fp32
    piece = min(shape[0], max(1, PIECE_BYTES // per_image))
    sizes = {len(p) for p in micro_batches(torch.empty(shape[0], 0), piece)}
    threads = torch.get_num_threads()
    kernels = {size: compiled_weight_grad((size, *shape[1:]), kernel_size, threads) for size in sizes}
    return None if None in kernels.values() else (piece, kernels)


class _DepthwiseConv(torch.autograd.Function):
    """Same-padded depthwise conv of a channels-last `[B, C, H, W]` map with the backward described above."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, kernels) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.kernels, ctx.has_bias = kernels, bias is not None
        return F.conv2d(x, weight, bias, padding=weight.shape[-1] // 2, groups=weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        grad = grad.contiguous(memory_format=torch.channels_last)
        kernel, channels = weight.shape[-1], weight.shape[0]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # a stride-1 same-padded conv's transpose is the conv with the kernel flipped
            grad_x = F.conv2d(grad, weight.flip(-1, -2), None, padding=kernel // 2, groups=channels)
        if ctx.needs_input_grad[1] or (ctx.has_bias and ctx.needs_input_grad[2]):
            # [B, C, H, W] in channels-last memory -> the contiguous [B, H, W, C] the kernels were compiled for
            piece, kernels = ctx.kernels
            x_parts = micro_batches(x.permute(0, 2, 3, 1), piece)
            grad_parts = micro_batches(grad.permute(0, 2, 3, 1), piece)
            sums = [kernels[len(xs)](xs, gs) for xs, gs in zip(x_parts, grad_parts, strict=True)]
            taps, grad_b = (torch.stack(parts).sum(0) for parts in zip(*sums, strict=True))
            grad_w = taps.permute(2, 0, 1).unsqueeze(1)  # [k, k, C] -> [C, 1, k, k]
        return grad_x, grad_w, grad_b if ctx.has_bias else None, None


def depthwise_conv(conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """`conv(x)` for a same-padded depthwise conv on a channels-last map, with the compiled weight gradient where it
    applies (fp32 on the CPU outside autocast and `torch.compile`, gradients wanted, at least `MIN_WORK` elements,
    and compiled here).

    Args:
        conv: A depthwise `nn.Conv2d` (groups = channels, odd square kernel, padding k // 2, stride 1).
        x: `[B, H, W, C]`.

    Returns:
        `[B, H, W, C]`.
    """
    x = x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W] (channels-last memory)
    kernels = None
    if (
        torch.is_grad_enabled()
        and conv.weight.requires_grad
        and x.is_cpu
        and x.dtype == torch.float32
        and not torch.is_autocast_enabled("cpu")
        and not torch.compiler.is_compiling()
        and x.numel() >= MIN_WORK
        and os.environ.get(REFERENCE_ENV) != "1"
    ):
        kernels = _piece_kernels((x.shape[0], x.shape[2], x.shape[3], x.shape[1]), conv.kernel_size[0])
    if kernels is None:
        out = conv(x)
    else:
        out = _DepthwiseConv.apply(x.contiguous(memory_format=torch.channels_last), conv.weight, conv.bias, kernels)
    return out.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
