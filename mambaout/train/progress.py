"""Progress display on rank 0: a tqdm bar on a terminal, plain log lines every few steps otherwise."""

import sys
import time

from tqdm import tqdm

__all__ = ["Progress", "format_duration"]


def format_duration(seconds: float) -> str:
    """`h:mm:ss` (or `m:ss` under an hour)."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


class Progress:
    """One epoch's progress: loss, learning rate, images/s and ETA.

    Args:
        total: Optimizer steps in the epoch.
        initial: Steps already done (a resumed epoch).
        desc: Leading text, e.g. "epoch 3/300".
        enabled: False on ranks other than 0.
        log_interval: Steps between plain lines when stderr is not a terminal.
    """

    def __init__(self, total: int, initial: int, desc: str, enabled: bool = True, log_interval: int = 50):
        self.total, self.done, self.desc = total, initial, desc
        self.enabled = enabled
        self.log_interval = log_interval
        self.start, self.start_done = time.perf_counter(), initial
        self.bar = None
        if enabled and sys.stderr.isatty():
            self.bar = tqdm(total=total, initial=initial, desc=desc, leave=False, dynamic_ncols=True, unit="step")

    def update(self, loss: float, lr: float, images_per_sec: float) -> None:
        """Record one finished optimizer step with the running loss, current lr and throughput."""
        self.done += 1
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.set_postfix_str(f"loss {loss:.4f} lr {lr:.2e} {images_per_sec:.0f} img/s", refresh=False)
            self.bar.update()
        elif self.done % self.log_interval == 0 or self.done == self.total:
            rate = (self.done - self.start_done) / max(time.perf_counter() - self.start, 1e-9)
            eta = format_duration((self.total - self.done) / max(rate, 1e-9))
            print(
                f"{self.desc} step {self.done}/{self.total} loss {loss:.4f} lr {lr:.2e} "
                f"{images_per_sec:.0f} img/s eta {eta}",
                flush=True,
            )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
