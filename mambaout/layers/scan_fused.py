"""The fused selective scan on the CPU: a C++ kernel (`scan_fused.cpp` beside this file), built on first use.

One pass over the sequence per (batch, channel) with the N states in registers, Δ's bias and softplus and the
D·u skip inside the pass, vectorised over the states and parallel over batch × channels on `torch.get_num_threads()`
threads; the backward keeps one state per 64 positions and recomputes the rest (see the C++ file). Sequences are
read through their strides and an optional table of positions per group, so a cross-scan's four orders of one map
index that map instead of copying it four times, and `u` may be shared by every group.

The library is compiled with the system's C++ compiler (`$CXX`, else `c++` / `g++`: the one PyTorch's inductor
needs too) for this machine's CPU and kept in `$MAMBAOUT_KERNEL_CACHE` (default `~/.cache/mambaout/kernels`), named
by a hash of the source, the flags, the compiler's version and the CPU's features, so a changed source or machine
builds anew. It is loaded through ctypes: no Python or PyTorch headers, about 2 s to build. Where it cannot be built
or loaded, `kernel()` warns once and returns None, and `selective_scan` uses the chunked scan instead.
"""

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

__all__ = ["kernel", "scan_fused"]

_SOURCE = Path(__file__).with_name("scan_fused.cpp")
_FLAGS = ("-O3", "-fopenmp-simd", "-ffp-contract=fast", "-fno-math-errno", "-fno-trapping-math", "-std=c++17")
_FLAGS += ("-shared", "-fPIC", "-pthread")
_NATIVE = "-march=native"  # dropped, with a second try, for a compiler or CPU that does not know it
_ABI = 1  # mambaout_scan_abi() of a library whose ScanArgs matches the structure below
_SMALL_WORK = 2**16  # state updates below which one thread runs the whole scan (starting threads costs more)
STATE_SIZES = (4, 8, 16, 32, 64)  # the kernel's state sizes (one vector each); others are padded to the next


class _ScanArgs(ctypes.Structure):
    """`ScanArgs` of scan_fused.cpp, field for field."""

    _fields_ = [
        *((name, ctypes.c_int64) for name in ("dtype", "backward", "batch", "channels", "groups", "length", "state")),
        *((name, ctypes.c_int64) for name in ("u_channels", "threads", "splits", "softplus")),
        *(
            field
            for name in ("u", "delta")
            for field in ((name, ctypes.c_void_p), *((f"{name}_s{k}", ctypes.c_int64) for k in "bdl"))
        ),
        ("A", ctypes.c_void_p),
        *(
            field
            for name in ("B", "C")
            for field in ((name, ctypes.c_void_p), *((f"{name}_s{k}", ctypes.c_int64) for k in "bgl"))
        ),
        *((name, ctypes.c_void_p) for name in ("D", "bias", "positions", "dy", "y", "du", "ddelta")),
        *((name, ctypes.c_void_p) for name in ("dA", "dB", "dC", "dD", "dbias")),
    ]


def _cpu_features() -> str:
    """The CPU's model and feature flags (part of the library's name: it is built for this CPU)."""
    try:
        with open("/proc/cpuinfo") as f:
            lines = [line for line in f if line.startswith(("flags", "Features", "model name"))]
        return "".join(sorted(set(lines)))
    except OSError:
        return platform.processor()


def _cache_dir() -> Path:
    configured = os.environ.get("MAMBAOUT_KERNEL_CACHE")
    if configured:
        return Path(configured)
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "mambaout" / "kernels"


def _build() -> Path:
    """Compile the kernel for this machine (or find it compiled); its path. Raises OSError / CalledProcessError."""
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++") or "c++"
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=60, check=True).stdout
    source = _SOURCE.read_bytes()
    cache = _cache_dir()
    for flags in ((_NATIVE, *_FLAGS), _FLAGS):
        machine = (" ".join(flags), version, _cpu_features(), platform.machine())
        key = hashlib.sha256(b"\0".join([source, *(part.encode() for part in machine)])).hexdigest()[:20]
        library = cache / f"scan_fused-{key}.so"
        if library.exists():
            return library
        cache.mkdir(parents=True, exist_ok=True)
        partial = library.with_name(f".{library.name}.{os.getpid()}.tmp")  # another process may build it too
        result = subprocess.run(
            [compiler, *flags, str(_SOURCE), "-o", str(partial)], capture_output=True, text=True, timeout=600
        )
        if result.returncode == 0:
            os.replace(partial, library)
            return library
        partial.unlink(missing_ok=True)
    raise subprocess.CalledProcessError(result.returncode, result.args, result.stdout, result.stderr)


@functools.cache
def kernel() -> ctypes.CDLL | None:
    """The loaded kernel library, built on the first call; None (with one warning) where it cannot be had."""
    try:
        library = ctypes.CDLL(str(_build()))
        library.mambaout_scan_abi.restype = ctypes.c_int64
        if library.mambaout_scan_abi() != _ABI:
            raise OSError(f"the library's argument layout is version {library.mambaout_scan_abi()}, not {_ABI}")
        library.mambaout_scan.argtypes = [ctypes.POINTER(_ScanArgs)]
        library.mambaout_scan.restype = ctypes.c_int64
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", None) or str(e)).strip().splitlines()
        warnings.warn(
            f"the fused selective-scan kernel could not be built ({detail[-1] if detail else type(e).__name__}); "
            "using the chunked scan (slower, same results). A C++ compiler (set $CXX) makes it available.",
            RuntimeWarning,
            stacklevel=2,
        )
        return None
    return library


def _pointer(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def _arguments(u, delta, A, B, C, D, delta_bias, delta_softplus, positions, threads) -> _ScanArgs:
    """The kernel's arguments for these inputs (outputs and `backward` are set by the caller)."""
    batch, channels, length = delta.shape
    args = _ScanArgs(
        dtype=0 if u.dtype == torch.float32 else 1,
        batch=batch,
        channels=channels,
        groups=B.shape[1],
        length=length,
        state=A.shape[1],
        u_channels=u.shape[1],
        threads=threads,
        splits=1,
        softplus=int(delta_softplus),
    )
    args.u, (args.u_sb, args.u_sd, args.u_sl) = u.data_ptr(), u.stride()
    args.delta, (args.delta_sb, args.delta_sd, args.delta_sl) = delta.data_ptr(), delta.stride()
    args.B, (args.B_sb, args.B_sg, _, args.B_sl) = B.data_ptr(), B.stride()
    args.C, (args.C_sb, args.C_sg, _, args.C_sl) = C.data_ptr(), C.stride()
    args.A, args.D, args.bias, args.positions = (_pointer(t) for t in (A, D, delta_bias, positions))
    return args


def _padded(A: torch.Tensor, B: torch.Tensor, C: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A, B and C with zero states added up to the next of `STATE_SIZES` (a zero B keeps them zero; a zero C reads
    nothing from them), B and C with the states adjacent."""
    state = A.shape[1]
    size = next(s for s in STATE_SIZES if s >= state)
    if size == state:
        return A, B, C
    A = F.pad(A, (0, size - state))
    B, C = (F.pad(t.transpose(2, 3), (0, size - state)).transpose(2, 3) for t in (B, C))  # [b, G, size, L]
    return A, B, C


def _threads(delta: torch.Tensor, state: int) -> int:
    return 1 if delta.numel() * state < _SMALL_WORK else max(1, torch.get_num_threads())


def _call(args: _ScanArgs) -> None:
    if kernel().mambaout_scan(ctypes.byref(args)) != 0:
        raise MemoryError("the fused selective-scan kernel could not allocate its working memory")


@torch.library.custom_op("mambaout::selective_scan_fused", mutates_args=())
def scan_fused(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None,
    delta_bias: torch.Tensor | None,
    delta_softplus: bool,
    positions: torch.Tensor | None,
) -> torch.Tensor:
    """The whole scan `y = Σ_n C·h + D·u` on CPU tensors of one dtype (float32 or float64), checked by the caller.

    Args:
        u: `[b, D, L]`, or `[b, D/G, L]` shared by the G groups; any strides.
        delta: Δ before bias and softplus `[b, D, L]`; any strides.
        A: `[D, N]` contiguous.
        B: `[b, G, N, L]` with the states adjacent (stride 1 along N); N at most 64.
        C: As `B`.
        D: `[D]` contiguous, or None.
        delta_bias: `[D]` contiguous, or None.
        delta_softplus: Softplus on Δ + bias.
        positions: `[G, L]` int64, row g the tokens in the order group g visits them, or None (in order). Every
            sequence (u, Δ, B, C and y) is indexed by token.

    Returns:
        `y` `[b, D, L]`, contiguous.
    """
    y = torch.empty(delta.shape, dtype=u.dtype)
    A, B, C = _padded(A, B, C)
    args = _arguments(u, delta, A, B, C, D, delta_bias, delta_softplus, positions, _threads(delta, A.shape[1]))
    args.y = y.data_ptr()
    _call(args)
    return y


@scan_fused.register_fake
def _(u, delta, A, B, C, D, delta_bias, delta_softplus, positions):
    return delta.new_empty(delta.shape, dtype=u.dtype)


def _setup_context(ctx, inputs, output) -> None:
    *tensors, ctx.delta_softplus, positions = inputs
    ctx.save_for_backward(*tensors, positions)  # the inputs only: the backward recomputes the states


def _backward(ctx, dy: torch.Tensor):
    """Every gradient in one call; each worker thread sums its own dA, dD and Δ bias, each split its own dB, dC."""
    u, delta, A, B, C, D, delta_bias, positions = ctx.saved_tensors
    batch, channels, length = delta.shape
    original = A.shape[1]
    A, B, C = _padded(A, B, C)
    groups, state = B.shape[1], A.shape[1]
    threads = _threads(delta, state)
    splits = 1 if (batch * groups) % threads == 0 else threads  # (sample, group, split) items share out evenly
    dy = dy.contiguous()
    du, d_delta = torch.empty_like(dy), torch.empty_like(dy)
    dA = dy.new_zeros(threads, channels, state)
    dB, dC = (dy.new_zeros(splits, batch, groups, length, state) for _ in range(2))
    dD, d_bias = (dy.new_zeros(threads, channels) for _ in range(2))
    args = _arguments(u, delta, A, B, C, D, delta_bias, ctx.delta_softplus, positions, threads)
    args.backward, args.splits, args.dy = 1, splits, dy.data_ptr()
    args.du, args.ddelta, args.dA, args.dB, args.dC, args.dD, args.dbias = (
        t.data_ptr() for t in (du, d_delta, dA, dB, dC, dD, d_bias)
    )
    _call(args)
    if u.shape[1] != channels:  # one u for every group: its gradient sums the groups'
        du = du.view(batch, groups, u.shape[1], length).sum(1)
    dB, dC = (t.sum(0).transpose(-1, -2)[:, :, :original] for t in (dB, dC))  # [b, G, L, N] -> [b, G, N, L]
    return (
        du,
        d_delta,
        dA.sum(0)[:, :original],
        dB,
        dC,
        None if D is None else dD.sum(0),
        None if delta_bias is None else d_bias.sum(0),
        None,
        None,
    )


torch.library.register_autograd("mambaout::selective_scan_fused", _backward, setup_context=_setup_context)
