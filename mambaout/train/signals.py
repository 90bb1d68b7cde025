"""Stopping a run on a signal without losing it: SIGINT and SIGTERM set a flag the fit loop checks after each
optimizer step (the same signal again acts at once); the run then saves a resumable `last.pth` and raises
`TrainingInterrupted`, which says how to continue. Loader workers ignore SIGINT: the training process decides."""

import signal
import threading
from pathlib import Path
from typing import Any

__all__ = ["StopSignals", "TrainingInterrupted", "ignore_sigint"]


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path, where: str, command: str = "mambaout train"):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received {where}: saved {checkpoint}; continue with "
            f"`{command} --output {checkpoint.parent} --resume auto`"
        )


class StopSignals:
    """SIGINT/SIGTERM set `received` instead of killing the process; the same signal again acts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def ignore_sigint(worker_id: int) -> None:
    # a terminal's Ctrl-C reaches loader workers too; the training process alone decides how to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)
