"""Intra-op threads fitted to the cores other processes leave free, so that OpenMP never waits on a taken core.

Why our CPU path collapsed under load (BENCHMARKS.md, issue 14; `scripts/cpu_probes.py contention`): PyTorch's
OpenMP splits every operator evenly over its threads and waits at the end of it for the last one. With another
process busy on one of two cores, one of our two threads shares its core and runs at a fraction of the speed, and
every operator waits for it; meanwhile the thread that finished first spins at the barrier (libgomp's default wait
policy), taking the CPU time its sibling needs. A forward has hundreds of such operators (thousands with
micro-batches), each a few hundred microseconds, against a scheduler time slice of milliseconds: most of them stall.
One thread per free core has no barrier to wait at and runs at the speed of the core it has.

`ThreadFitter` measures, between calls, how many cores the rest of the machine kept busy (from `/proc/stat` minus
this process's own CPU time) and runs each call with `min(threads, free cores)` threads. Where `/proc/stat` cannot be
read (not Linux) it leaves the thread count alone.
"""

import contextlib
import os
import threading
import time
from collections.abc import Iterator

import torch

__all__ = ["ThreadFitter", "busy_cores_elsewhere"]

# a window shorter than this is too coarse for /proc/stat's 10 ms ticks: the last estimate is kept instead
MIN_WINDOW_S = 0.2
# cores the rest of the machine must keep busy before one of ours is given up (hysteresis against tick noise)
BUSY_CORE = 0.6
_TICK_S = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01


def _machine_busy_s() -> float | None:
    """CPU seconds all cores have spent busy since boot (everything but idle and iowait), or None off Linux."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return (sum(fields[:8]) - idle) * _TICK_S


def _own_busy_s() -> float:
    times = os.times()
    return times.user + times.system


def busy_cores_elsewhere(window_s: float = 0.25) -> float | None:
    """Cores the rest of the machine keeps busy, measured over `window_s` (blocks for it); None off Linux."""
    start, own = _machine_busy_s(), _own_busy_s()
    began = time.perf_counter()
    time.sleep(window_s)
    end = _machine_busy_s()
    if start is None or end is None:
        return None
    return max(0.0, (end - start) - (_own_busy_s() - own)) / (time.perf_counter() - began)


class ThreadFitter:
    """Runs blocks of work with as many intra-op threads as there are cores other processes leave free.

    The estimate comes from the window since the previous estimate (at least `MIN_WINDOW_S`), so it costs two
    small file reads per call and reacts within a call or two when load comes or goes.

    Args:
        threads: The most threads to use; default PyTorch's count as each block starts.
        fit: False leaves the thread count alone (to measure what fitting gives).
    """

    def __init__(self, threads: int | None = None, fit: bool = True):
        self.threads = threads
        self.fit = fit
        self._lock = threading.Lock()
        self._mark: tuple[float, float, float] | None = None  # (wall, machine busy, own busy) at the window start
        self._free: int | None = None

    def _cores(self) -> int:
        try:
            return len(os.sched_getaffinity(0))
        except (AttributeError, OSError):
            return os.cpu_count() or 1

    def free_cores(self) -> int | None:
        """Cores left free by other processes over the last window (None before one was measured or off Linux)."""
        machine = _machine_busy_s()
        if machine is None:
            return None
        now, own = time.perf_counter(), _own_busy_s()
        with self._lock:
            if self._mark is None:
                self._mark = (now, machine, own)
            elif now - self._mark[0] >= MIN_WINDOW_S:
                wall, machine0, own0 = self._mark
                others = max(0.0, (machine - machine0) - (own - own0)) / (now - wall)
                whole, part = divmod(others, 1.0)
                self._free = max(1, self._cores() - int(whole) - (part >= BUSY_CORE))
                self._mark = (now, machine, own)
            return self._free

    def fitted(self) -> int:
        """The thread count a block started now gets."""
        wanted = self.threads or torch.get_num_threads()
        free = self.free_cores() if self.fit else None
        return wanted if free is None else max(1, min(wanted, free))

    @contextlib.contextmanager
    def __call__(self) -> Iterator[int]:
        """Within the block PyTorch runs `fitted()` threads (yielded); the count before is restored after it."""
        before = torch.get_num_threads()
        count = self.fitted()
        if count != before:
            torch.set_num_threads(count)
        try:
            yield count
        finally:
            if count != before:
                torch.set_num_threads(before)
