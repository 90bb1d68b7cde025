"""The fused kernels of the fast path, each with a plain-PyTorch fallback that computes the same function.

oneDNN (PyTorch's `mkldnn` ops on x86 CPUs) fuses an activation or a residual add into a linear layer, which saves
a full pass over the activations; the reference MambaOut spends most of its CPU time in such passes. Those
kernels exist only for some devices, dtypes and PyTorch builds (no bf16 inner product on a CPU without AVX-512 or
AVX2-VNNI-2, none at all on GPU or ARM), so `select_kernels` probes them once per (device, dtype) on a tiny input
and falls back to the composed ops when a probe raises or disagrees. Setting `MAMBAOUT_FAST_REFERENCE=1` forces the
fallback everywhere (tests use it to hold both paths to the same numbers).

Whether oneDNN also serves short inputs is measured once per process (`onednn_min_rows`): which GEMM is faster
depends on the CPU. MKL, behind `F.linear`, dispatches by vendor and runs its AVX2 kernels on AMD CPUs even where
they have AVX-512, while oneDNN picks its kernels by instruction set: on an AVX-512 Zen 5 oneDNN is 1.4-2.4× faster
at every femto shape, down to 49 rows (`scripts/cpu_probes.py gemm`); on an AVX2 Zen 3 MKL was faster below ~3k rows.
"""

import functools
import os
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "REFERENCE_ENV",
    "Activation",
    "KernelSet",
    "activation_of",
    "cpu_has_kernels",
    "onednn_min_rows",
    "select_kernels",
]

REFERENCE_ENV = "MAMBAOUT_FAST_REFERENCE"
ONEDNN_MIN_ROWS = 8192
# the short GEMM `onednn_min_rows` times: batch 1's stage-3 fc1 in femto ([196, 192] @ [192, 384])
_SHORT_GEMM = (196, 192, 384)


@dataclass(frozen=True)
class Activation:
    """An elementwise activation the fused linear kernel knows, with its exact PyTorch equivalent.

    Attributes:
        onednn_attr: oneDNN post-op name ("gelu", "swish").
        onednn_algorithm: Post-op algorithm ("none" for exact erf GELU, "tanh" for the approximation), or None.
    """

    onednn_attr: str
    onednn_algorithm: str | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.onednn_attr == "swish":
            return F.silu(x)
        return F.gelu(x, approximate=self.onednn_algorithm or "none")


GELU = Activation("gelu", "none")
GELU_TANH = Activation("gelu", "tanh")
SILU = Activation("swish")


def activation_of(module: nn.Module) -> Activation | None:
    """The `Activation` a module computes, or None when it is not one the fast path can fuse (then it is called)."""
    name = type(module).__name__
    if isinstance(module, nn.GELU):
        return GELU if module.approximate == "none" else GELU_TANH
    if isinstance(module, nn.SiLU) or name in ("SiLU", "Swish"):
        return SILU
    # timm's GELU / GELUTanh are plain modules that call F.gelu; match them by name to avoid importing timm here.
    return {"GELU": GELU, "GELUTanh": GELU_TANH}.get(name)


@dataclass(frozen=True)
class KernelSet:
    """Whether to use oneDNN's linear kernels on one (device, dtype); the methods compute the same function either way.

    oneDNN adds the bias inside the matrix multiply, where `F.linear` on CPU first copies the broadcast bias into
    the output (a full extra pass), and it fuses the gate activation and the residual add. That pays on tall inputs;
    on short ones (batch 1, the last stages) its per-call overhead can cost more than the pass it saves where MKL's
    GEMM behind `F.linear` runs at full width (AVX2 Zen 3: 0.3-0.9× below ~3k rows, 1.0-1.5× above ~8k); where MKL
    does not (AMD with AVX-512) oneDNN wins at every size. `select_kernels` measures which.

    Attributes:
        onednn: Use `torch.ops.mkldnn._linear_pointwise` (plain, unary and binary-add forms) ...
        min_rows: ... for inputs of at least this many rows (pixels), the composed ops below.
    """

    onednn: bool = False
    min_rows: int = ONEDNN_MIN_ROWS

    def _onednn_for(self, x: torch.Tensor) -> bool:
        return self.onednn and x.is_cpu and x.shape[0] >= self.min_rows

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ weight.T + bias` for `x` `[N, K]`, `weight` `[M, K]` -> `[N, M]`."""
        if self._onednn_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
        return F.linear(x, weight, bias)

    def linear_act(
        self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, act: Activation
    ) -> torch.Tensor:
        """`act(x @ weight.T + bias)` for `x` `[N, K]`, `weight` `[M, K]` -> `[N, M]`."""
        if self._onednn_for(x):
            return torch.ops.mkldnn._linear_pointwise(x, weight, bias, act.onednn_attr, [], act.onednn_algorithm)
        return act(F.linear(x, weight, bias))

    def linear_add(
        self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None
    ) -> torch.Tensor:
        """`residual + x @ weight.T + bias` for `x` `[N, K]`, `residual` `[N, M]` -> a new `[N, M]` tensor."""
        if self._onednn_for(x):
            return torch.ops.mkldnn._linear_pointwise.binary(x, residual, weight, bias, "add")
        return F.linear(x, weight, bias).add_(residual)


def _onednn_ops_present() -> bool:
    return (
        torch.backends.mkldnn.is_available()
        and hasattr(torch.ops, "mkldnn")
        and hasattr(torch.ops.mkldnn, "_linear_pointwise")
        and hasattr(torch.ops.mkldnn._linear_pointwise, "binary")
    )


def _probe(dtype: torch.dtype) -> bool:
    """True when every oneDNN kernel runs for `dtype` and agrees with the composed ops on a small odd shape."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(37, 24, generator=gen).to(dtype)
    w = (torch.randn(40, 24, generator=gen) * 0.2).to(dtype)
    b = torch.randn(40, generator=gen).to(dtype)
    r = torch.randn(37, 40, generator=gen).to(dtype)
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    fused, reference = KernelSet(onednn=True, min_rows=0), KernelSet()
    try:
        with torch.inference_mode():
            pairs = [(fused.linear(x, w, b), reference.linear(x, w, b))]
            pairs += [(fused.linear_act(x, w, b, act), reference.linear_act(x, w, b, act)) for act in (GELU, SILU)]
            pairs.append((fused.linear_add(x, r, w, b), reference.linear_add(x, r, w, b)))
    except RuntimeError:  # no oneDNN primitive for this dtype on this CPU
        return False
    return all(torch.allclose(got.float(), want.float(), atol=tol, rtol=tol) for got, want in pairs)


def _best_of(fn, calls: int) -> float:
    best = float("inf")
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


@functools.cache
def onednn_min_rows(dtype: torch.dtype) -> int:
    """The fewest rows for which oneDNN's linear beats `F.linear` here: 0 when it wins on a short input (measured).

    Times both on one batch-1-sized GEMM, interleaved, fastest of several calls each (robust to other load, which
    only slows calls down); oneDNN must be at least as fast to serve every input, else it serves tall inputs only.
    """
    rows, k, m = _SHORT_GEMM
    gen = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(*s, generator=gen).to(dtype) for s in ((rows, k), (m, k), (m,)))
    fused, plain = KernelSet(onednn=True, min_rows=0), KernelSet()
    onednn, mkl = float("inf"), float("inf")
    with torch.inference_mode():
        for _ in range(3):  # first round warms both up (oneDNN creates its primitive)
            onednn = min(onednn, _best_of(lambda: fused.linear(x, w, b), 5))
            mkl = min(mkl, _best_of(lambda: plain.linear(x, w, b), 5))
    return 0 if onednn <= mkl else ONEDNN_MIN_ROWS


@functools.cache
def cpu_has_kernels(dtype: torch.dtype) -> bool:
    """True when this CPU and PyTorch build have oneDNN's fused linear kernels for `dtype` (probed once)."""
    return _onednn_ops_present() and _probe(dtype)


def select_kernels(device: torch.device | str, dtype: torch.dtype) -> KernelSet:
    """The fastest `KernelSet` that works for `device` and `dtype` (all fallbacks off CPU or when forced)."""
    if torch.device(device).type != "cpu" or os.environ.get(REFERENCE_ENV, "") not in ("", "0"):
        return KernelSet()
    if not cpu_has_kernels(dtype):
        return KernelSet()
    return KernelSet(onednn=True, min_rows=onednn_min_rows(dtype))
