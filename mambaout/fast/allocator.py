"""glibc's malloc and large CPU tensors: keep freed memory for reuse instead of handing it back to the OS.

PyTorch allocates CPU tensors with the C library's malloc. glibc serves a block above its mmap threshold (128 KiB at
start, raised as such blocks are freed, to at most 32 MiB) with fresh pages from `mmap` and unmaps it on `free`, and
it returns the top of its heap to the OS above a trim threshold. A MambaOut forward at batch 32 and 224² makes
intermediates of ~100 MiB, so with the defaults every call page-faults them in again (the kernel zeroes each page).
Measured on the 2-core dev machine (BENCHMARKS.md, "The allocator"): timm's femto runs 1.3-1.8× faster at batch 32
(inference and training step) once glibc keeps its memory; our fused path, whose micro-batches keep activations
small, gains little. jemalloc and tcmalloc (`LD_PRELOAD`) keep memory by design.

The cost: memory freed by PyTorch stays in the process (its resident size does not shrink after a peak) until
`malloc_trim` or exit. `mambaout train/eval/predict/bench` tune it on by default (`--malloc system` leaves it alone).
"""

import ctypes
import ctypes.util
import functools
import os
import platform

__all__ = ["MALLOC_MODES", "cpu_allocator", "tune_cpu_allocator"]

MALLOC_MODES = ("tuned", "system")
# mallopt(3) parameters (malloc.h)
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_PRELOADED = ("jemalloc", "tcmalloc", "mimalloc")

_tuned_bytes: int | None = None


@functools.cache
def _glibc() -> ctypes.CDLL | None:
    if platform.libc_ver()[0] != "glibc":
        return None
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    return libc if libc is not None and hasattr(libc, "mallopt") else None


def _preloaded_allocator() -> str | None:
    """The name of a replacement malloc mapped into this process (jemalloc, tcmalloc, mimalloc), or None."""
    try:
        with open("/proc/self/maps") as f:
            maps = f.read()
    except OSError:
        maps = os.environ.get("LD_PRELOAD", "")
    return next((name for name in _PRELOADED if f"lib{name}" in maps), None)


def tune_cpu_allocator(threshold_bytes: int = 2**30) -> bool:
    """Make glibc's malloc keep freed blocks of up to `threshold_bytes` for reuse (process-wide, for good).

    Raises glibc's mmap threshold (blocks below it come from the heap, whose freed memory is reused without page
    faults) and its trim threshold (the heap top is not returned to the OS below it). Safe to call more than once.

    Args:
        threshold_bytes: Both thresholds, in bytes (1 GiB by default: every activation of a MambaOut step fits).

    Returns:
        True when glibc's malloc was tuned; False when this process has no glibc or uses another allocator
        (jemalloc, tcmalloc, mimalloc), which already keeps freed memory.
    """
    global _tuned_bytes
    if threshold_bytes < 1:
        raise ValueError(f"threshold_bytes must be positive, got {threshold_bytes}")
    value = ctypes.c_int(min(threshold_bytes, 2**31 - 1))
    if _tuned_bytes == value.value:  # already tuned so (the CLI and run_benchmark may both ask)
        return True
    libc = _glibc()
    if libc is None or _preloaded_allocator() is not None:
        return False
    if not (libc.mallopt(_M_MMAP_THRESHOLD, value) and libc.mallopt(_M_TRIM_THRESHOLD, value)):
        return False
    _tuned_bytes = value.value
    return True


def cpu_allocator() -> str:
    """What serves CPU tensors in this process, in words (for benchmark tables)."""
    preloaded = _preloaded_allocator()
    if preloaded is not None:
        return f"{preloaded} (preloaded)"
    if _glibc() is None:
        return "the C library's malloc"
    if _tuned_bytes is not None:
        return f"glibc malloc, mmap/trim thresholds {_tuned_bytes / 2**20:.0f} MiB (tune_cpu_allocator)"
    tunables = os.environ.get("GLIBC_TUNABLES", "")
    if "malloc" in tunables:
        return f"glibc malloc, GLIBC_TUNABLES={tunables}"
    return "glibc malloc, default thresholds"
