"""Timing, memory and reporting machinery of the benchmark: interleaved repeats, medians, ratios, a Markdown table.

Every path runs in the same process on the same input, in turn within each repeat (the order rotates from one
repeat to the next), so that load from other processes falls on all of them alike; the table reports medians, the
fastest call, each path's share of the machine's matmul peak and ratios to the baseline, and the machine, date and
load average at the time. `busy_processes` adds a known load beside a measurement (`mambaout bench --load N`).
"""

import contextlib
import ctypes
import ctypes.util
import datetime
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch

from mambaout.fast.allocator import cpu_allocator

__all__ = [
    "BenchPath",
    "PathResult",
    "busy_processes",
    "load_average",
    "machine_summary",
    "markdown_table",
    "measure",
    "peak_memory_mib",
    "synchronize",
]


@dataclass
class BenchPath:
    """One way of running the model, timed as a whole call.

    Attributes:
        name: Row label ("timm eager", "mambaout fast", ...).
        run: One call: a forward pass, or a whole training step; returns when the work is done.
        baseline: The row the others are compared with (one per table).
        note: What this path is, for the table's notes.
        params: Parameters of this path's model, when the paths run different models (else the table's).
        macs: Multiply-accumulates per image of this path's model, likewise.
        peer: One of the engines a user would pick instead of ours (timm, or timm's export in ONNX Runtime or
            OpenVINO); the table names the fastest peer and our default path's ratio to it.
        ours_default: Our default path (`optimize_for_inference` as called without options).
    """

    name: str
    run: Callable[[], object]
    baseline: bool = False
    note: str = ""
    params: int | None = None
    macs: int | None = None
    peer: bool = False
    ours_default: bool = False


@dataclass
class PathResult:
    """Measurements of one path.

    Attributes:
        name: The path's name.
        latencies_s: Every timed call, in seconds.
        peak_mib: Peak extra memory of one call in MiB, or None when it could not be measured.
        baseline: Whether this is the baseline row.
        params: The path's own parameter count, or None for the table's.
        macs: The path's own MACs per image, or None for the table's.
        peer: A peer engine (see `BenchPath`).
        ours_default: Our default path.
    """

    name: str
    latencies_s: list[float] = field(default_factory=list)
    peak_mib: float | None = None
    baseline: bool = False
    params: int | None = None
    macs: int | None = None
    peer: bool = False
    ours_default: bool = False

    def quantile_ms(self, q: float) -> float:
        """Latency quantile `q` in [0, 1] in milliseconds (linear interpolation between calls)."""
        xs = sorted(self.latencies_s)
        pos = q * (len(xs) - 1)
        lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
        return 1e3 * (xs[lo] + (xs[hi] - xs[lo]) * (pos - lo))

    def images_per_s(self, batch_size: int) -> float:
        """Throughput from the median call latency."""
        return batch_size / statistics.median(self.latencies_s)

    def best_images_per_s(self, batch_size: int) -> float:
        """Throughput from the fastest call: what the path does when the machine leaves it alone."""
        return batch_size / min(self.latencies_s)


def synchronize(device: str) -> None:
    """Wait for the device's queued work (CUDA); nothing to wait for on the CPU."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def load_average() -> str:
    """The 1/5/15-minute load averages as "a/b/c", or "n/a" where the OS has none."""
    return "/".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"


def measure(
    paths: Sequence[BenchPath], repeats: int, warmup: int = 1, iters: int = 1, device: str = "cpu"
) -> list[PathResult]:
    """Time every path `repeats` × `iters` times, interleaved, after `warmup` untimed calls each.

    Args:
        paths: The paths to time.
        repeats: Rounds; in each round every path runs `iters` timed calls, in an order rotated per round.
        warmup: Untimed calls per path before the first round (compilation, allocator warm-up).
        iters: Timed calls per path per round.
        device: "cpu" or "cuda[:i]" (CUDA calls are synchronized before the clock stops).

    Returns:
        One `PathResult` per path, in the order given (memory not yet measured).
    """
    results = {
        p.name: PathResult(
            p.name, baseline=p.baseline, params=p.params, macs=p.macs, peer=p.peer, ours_default=p.ours_default
        )
        for p in paths
    }
    for p in paths:
        for _ in range(warmup):
            p.run()
        synchronize(device)
    for r in range(repeats):
        k = r % len(paths)
        for p in list(paths[k:]) + list(paths[:k]):
            for _ in range(iters):
                synchronize(device)
                start = time.perf_counter()
                p.run()
                synchronize(device)
                results[p.name].latencies_s.append(time.perf_counter() - start)
    return [results[p.name] for p in paths]


# one busy core: pure Python arithmetic with next to no memory traffic, so what it takes from a measurement is CPU time.
# It dies with the process that started it, however that one ends (killed, hung up): on Linux the kernel sends it
# SIGKILL (prctl PR_SET_PDEATHSIG = 1), and everywhere its stdin, a pipe from the parent, reaches its end, which a
# thread waits for (the arithmetic lets it run: the interpreter hands the GIL over every few milliseconds).
_BUSY_LOOP = """
import ctypes, os, signal, sys, threading
try:
    ctypes.CDLL(None).prctl(1, signal.SIGKILL)
except (AttributeError, OSError, TypeError):
    pass
threading.Thread(target=lambda: (sys.stdin.buffer.read(), os._exit(0)), daemon=True).start()
x = 0
while True:
    x = (x + 1) % 1000003
"""


@contextlib.contextmanager
def busy_processes(count: int) -> Iterator[None]:
    """Within the block, `count` other processes each keep one core busy (the load of `mambaout bench --load`).

    They stand for what shares a real machine: a training run's own data-loader workers, other jobs. They are
    started before the block and killed after it, whatever happens inside, and die with this process if it is
    killed first.
    """
    procs = [
        subprocess.Popen([sys.executable, "-c", _BUSY_LOOP], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        yield
    finally:
        for proc in procs:
            proc.kill()
        for proc in procs:
            proc.wait()
            proc.stdin.close()


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def _trim_heap() -> None:
    # give freed heap pages back to the OS so that the RSS before a call is not inflated by an earlier path's peak
    libc = ctypes.util.find_library("c")
    if libc:
        fn = getattr(ctypes.CDLL(libc), "malloc_trim", None)
        if fn is not None:
            fn(0)


def peak_memory_mib(run: Callable[[], object], device: str = "cpu", interval_s: float = 5e-4) -> float | None:
    """Peak memory one call adds, in MiB.

    On CUDA: the allocator's peak over the call minus what was allocated before. On CPU: the process's resident set
    size sampled every `interval_s` by a thread during the call, minus the RSS before (after trimming the heap);
    this counts every allocator (PyTorch, oneDNN scratch, ONNX Runtime) alike. None where neither is available.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        run()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - before) / 2**20
    _trim_heap()
    before = _rss_bytes()
    if before is None:
        return None
    peak = before
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _rss_bytes() or 0)
            time.sleep(interval_s)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        run()
    finally:
        done.set()
        sampler.join()
    peak = max(peak, _rss_bytes() or 0)
    return (peak - before) / 2**20


def machine_summary(device: str = "cpu") -> dict[str, str]:
    """Machine, CPU allocator, software, threads, date and load average, for the lines above a table."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), cpu)
    except OSError:
        pass
    info = {
        "cpu": f"{cpu}, {os.cpu_count()} cores, {torch.backends.cpu.get_cpu_capability()}",
        "allocator": cpu_allocator(),
        "torch": torch.__version__,
        "threads": str(torch.get_num_threads()),
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "load": load_average(),
    }
    if device.startswith("cuda") and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(torch.device(device))
    return info


def _fmt(x: float | None, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


COLUMNS = (
    "| path | params (M) | GMACs/img | img/s | p50 (ms) | p90 (ms) | best (ms) | peak mem (MiB) | % of matmul peak "
    "| × baseline | × baseline, best call |"
)


def peer_summary(results: Sequence[PathResult], batch_size: int) -> str | None:
    """One line: the fastest peer engine (by median and by best call) and our default path's ratio to it."""
    peers = [r for r in results if r.peer]
    ours = next((r for r in results if r.ours_default), None)
    if not peers or ours is None:
        return None
    by_median = max(peers, key=lambda r: r.images_per_s(batch_size))
    by_best = max(peers, key=lambda r: r.best_images_per_s(batch_size))
    median = ours.images_per_s(batch_size) / by_median.images_per_s(batch_size)
    best = ours.best_images_per_s(batch_size) / by_best.best_images_per_s(batch_size)
    return (
        f"**{ours.name} / best peer: {median:.2f}× by median** (best peer `{by_median.name}`), "
        f"**{best:.2f}× by best call** (best peer `{by_best.name}`)"
    )


def markdown_table(
    title: str,
    command: str,
    results: Sequence[PathResult],
    batch_size: int,
    params: int,
    macs: int,
    machine: dict[str, str],
    load_after: str,
    notes: Sequence[str] = (),
    peak_gflops: float | None = None,
    flops_per_mac: float = 2.0,
) -> str:
    """The benchmark's Markdown section: a heading, how and where it ran, the table, and notes.

    Args:
        title: Heading text.
        command: The command line that reproduces it.
        results: Measured paths; exactly one should be the baseline.
        batch_size: Images per call.
        params: Parameters of the model (rows with their own `params` show theirs).
        macs: Multiply-accumulates per image (likewise).
        machine: `machine_summary()` taken before the run (its load is the load before).
        load_after: Load average after the run.
        notes: Extra lines under the table.
        peak_gflops: The machine's matmul peak, for each path's share of it (median throughput); None: no column.
        flops_per_mac: FLOPs counted per MAC per image (2 for a forward, 6 for a training step).
    """
    base = next((r for r in results if r.baseline), results[0])
    base_ips, base_best = base.images_per_s(batch_size), base.best_images_per_s(batch_size)
    lines = [
        f"### {title}",
        "",
        f"- command: `{command}`",
        f"- machine: {machine['cpu']}{'; ' + machine['gpu'] if 'gpu' in machine else ''}; torch {machine['torch']}, "
        f"{machine['threads']} thread{'' if machine['threads'] == '1' else 's'}; CPU memory: {machine['allocator']}",
        f"- date: {machine['date']}; load average (1/5/15 min) before {machine['load']}, after {load_after}",
        f"- {len(results[0].latencies_s)} timed calls per path, interleaved; medians and the fastest call; "
        f"ratio = img/s over `{base.name}`",
        "",
        COLUMNS,
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ips = r.images_per_s(batch_size)
        share = None if not peak_gflops else 100 * ips * flops_per_mac * (r.macs or macs) / 1e9 / peak_gflops
        lines.append(
            f"| {r.name} | {(r.params or params) / 1e6:.2f} | {(r.macs or macs) / 1e9:.3f} | {ips:.2f} | "
            f"{r.quantile_ms(0.5):.1f} | {r.quantile_ms(0.9):.1f} | {1e3 * min(r.latencies_s):.1f} | "
            f"{_fmt(r.peak_mib)} | {_fmt(share, 0)} | {ips / base_ips:.2f} | "
            f"{r.best_images_per_s(batch_size) / base_best:.2f} |"
        )
    summary = peer_summary(results, batch_size)
    lines += [""] + [f"- {n}" for n in (summary, *notes) if n]
    return "\n".join(lines).rstrip() + "\n"
