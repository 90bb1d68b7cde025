"""A run directory: `config.yaml`, `metrics.jsonl`, `last.pth` and `best.pth`, written so that nothing is lost.

`config.yaml` and the checkpoints are replaced atomically (temporary file, fsync, rename); `metrics.jsonl` grows one
flushed and fsynced JSON line per epoch. A new run refuses a directory that already holds one.
"""

import json
import os
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
        self.damaged_lines = 0

    @property
    def files(self) -> tuple[Path, ...]:
        """The run's own files (config, metrics, checkpoints), whether they exist yet or not."""
        return self.config, self.metrics, self.last, self.best

    def holds_run(self) -> bool:
        """Whether any file of a run is already there."""
        return any(p.exists() for p in self.files)

    def create(self) -> None:
        """Make the directory and clear temporary files that a killed writer left behind."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"--output: cannot create {self.path}: {e.strerror or e}") from None
        remove_stale_temps(self.path)

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
