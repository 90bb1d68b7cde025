"""A run directory: `config.yaml`, `metrics.jsonl`, `last.pth` and `best.pth`, written so that nothing is lost.

`config.yaml` and the checkpoints are replaced atomically (temporary file, fsync, rename); `metrics.jsonl` grows one
flushed and fsynced JSON line per epoch. A new run refuses a directory that already holds one, and one writer at a time
holds the directory (`lock`): a second process training into it, a new run or a resumed one, is refused.
"""

import contextlib
import fcntl
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

from mambaout.errors import UserError
from mambaout.weights.io import atomic_write, remove_stale_temps

__all__ = ["RunDir"]


class RunDir:
    """The files of one training run under `path`."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path).expanduser()
        self.config = self.path / "config.yaml"
        self.metrics = self.path / "metrics.jsonl"
        self.last = self.path / "last.pth"
        self.best = self.path / "best.pth"
        self.lock_file = self.path / ".lock"  # not one of `files`: it says who writes, not what was trained
        self.damaged_lines = 0

    @property
    def files(self) -> tuple[Path, ...]:
        """The run's own files (config, metrics, checkpoints), whether they exist yet or not."""
        return self.config, self.metrics, self.last, self.best

    def holds_run(self) -> bool:
        """Whether any file of a run is already there."""
        return any(p.exists() for p in self.files)

    @contextlib.contextmanager
    def lock(self) -> Iterator[None]:
        """Hold the directory (made if missing) for this process while the block runs; refused while another holds it.

        The lock is an `flock` on `.lock`, which the kernel lets go of when its holder exits or dies: a killed run never
        blocks its own resumption. `.lock` holds the holder's PID for the refusal; leaving the block removes it, and
        the folders the lock made if nothing was written in them.

        Raises:
            UserError: The directory cannot be made or written in, or another process holds it.
        """
        made = [p for p in (self.path, *self.path.parents) if not p.exists()]  # deepest first
        try:
            self._make()
            fd = self._acquire()
        except BaseException:
            _remove_empty(made)
            raise
        try:
            yield
        finally:
            self.lock_file.unlink(missing_ok=True)  # while still held: a process that opened it sees it gone, retries
            os.close(fd)
            _remove_empty(made)

    def _acquire(self) -> int:
        """The descriptor of `.lock`, locked and holding this process's PID."""
        while True:
            try:
                fd = os.open(self.lock_file, os.O_RDWR | os.O_CREAT, 0o644)
            except OSError as e:
                raise UserError(f"--output: cannot write in {self.path}: {e.strerror or e}") from None
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = _holder(fd)
                os.close(fd)
                raise UserError(
                    f"--output {self.path} is in use by another training run{holder}: wait for it to end or stop it, "
                    "or pick another --output"
                ) from None
            try:
                current = os.stat(self.lock_file)
            except FileNotFoundError:
                current = None
            held = os.fstat(fd)
            if current is not None and (current.st_dev, current.st_ino) == (held.st_dev, held.st_ino):
                break
            os.close(fd)  # locked the file its last holder was removing: lock the one now in its place
        with contextlib.suppress(OSError):  # the PID only names the holder; a full disk fails the run's first write
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def create(self) -> None:
        """Make the directory and clear temporary files that a killed writer left behind."""
        self._make()
        remove_stale_temps(self.path)

    def _make(self) -> None:
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output: cannot create {self.path}: {e.strerror or e}") from None

    def write_config(self, config: dict[str, Any], header: str) -> None:
        """Save the resolved config as YAML, `header` as leading comment lines."""
        comment = "".join(f"# {line}\n" for line in header.splitlines())
        with atomic_write(self.config) as f:
            f.write((comment + yaml.safe_dump(config, sort_keys=False)).encode())

    def read_metrics(self) -> list[dict[str, Any]]:
        """Every intact line of `metrics.jsonl`; `damaged_lines` counts the others (cut short by a crash, or not
        UTF-8 JSON), which are skipped."""
        self.damaged_lines = 0
        if not self.metrics.exists():
            return []
        records = []
        for line in self.metrics.read_bytes().splitlines():
            try:
                record = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                record = None
            if isinstance(record, dict):
                records.append(record)
            elif line.strip():
                self.damaged_lines += 1
        return records

    def append_metrics(self, record: dict[str, Any]) -> None:
        """Append one JSON line and force it to disk."""
        with self.metrics.open("a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())

    def keep_metrics_until(self, epoch: int) -> None:
        """Drop lines of epochs after `epoch` (written before a crash the checkpoint did not see) and broken lines."""
        if not self.metrics.exists():
            return
        kept = [r for r in self.read_metrics() if r.get("epoch", 0) <= epoch]
        text = "".join(json.dumps(r) + "\n" for r in kept).encode()
        if text != self.metrics.read_bytes():
            with atomic_write(self.metrics) as f:
                f.write(text)


def _holder(fd: int) -> str:
    """` (PID n)` of the process whose PID the lock file `fd` holds, saying when it has ended (its forked data loader
    processes still hold the lock for the few seconds they take to notice)."""
    text = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
    if not text.isdigit():
        return ""
    try:
        os.kill(int(text), 0)
    except ProcessLookupError:
        return f" (PID {text}, which has ended: its data loader processes are exiting, try again in a few seconds)"
    except (PermissionError, OverflowError):
        pass
    return f" (PID {text})"


def _remove_empty(folders: list[Path]) -> None:
    """Remove those of `folders` (deepest first) that are empty; a folder that failed to be made is skipped."""
    for folder in folders:
        with contextlib.suppress(OSError):
            folder.rmdir()
