"""Never losing a run: SIGTERM saves and resumes to the very same weights; SIGKILL mid-epoch resumes and finishes."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from train_fixtures import assert_same_weights, flags, make_tree, wait_for

from mambaout.cli import main
from mambaout.train.checkpoint import read_checkpoint

EPOCHS = 12
# the full random recipe (crops, flips, RandAugment, erasing, mixup/cutmix, drop path): a resumed run must draw the
# same random numbers as one that never stopped
RANDOM_RECIPE = {
    "epochs": EPOCHS,
    "scale": ["0.5", "1"],
    "hflip": "0.5",
    "auto_augment": "rand-m9-mstd0.5-inc1",
    "re_prob": "0.25",
    "mixup": "0.8",
    "cutmix": "1.0",
    "drop_path": "0.1",
    "save_interval": "4",  # mid-epoch checkpoints too (6 steps per epoch)
}


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"), classes=("a", "b", "c"), train=8, val=4)


def _start(tree: Path, out: Path) -> subprocess.Popen:
    argv = [sys.executable, "-m", "mambaout", "train", "--data", str(tree), "--output", str(out)]
    return subprocess.Popen([*argv, *flags(**RANDOM_RECIPE)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k not in ("elapsed_s", "images_per_sec")} for r in lines]


def test_sigterm_saves_and_the_resumed_run_ends_with_identical_weights(tree, tmp_path, capsys):
    assert main(["train", "--data", str(tree), "--output", str(tmp_path / "straight"), *flags(**RANDOM_RECIPE)]) == 0

    process = _start(tree, tmp_path / "stopped")
    wait_for(tmp_path / "stopped" / "last.pth", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert "stopped: SIGTERM received" in err and "--resume auto`" in err
    interrupted = read_checkpoint(tmp_path / "stopped" / "last.pth")
    assert (interrupted["epoch"], interrupted["step"]) < (EPOCHS, EPOCHS * 6)

    assert main(["train", "--output", str(tmp_path / "stopped"), "--resume", "auto"]) == 0
    straight = read_checkpoint(tmp_path / "straight" / "last.pth")
    resumed = read_checkpoint(tmp_path / "stopped" / "last.pth")
    assert (resumed["epoch"], resumed["step"]) == (straight["epoch"], straight["step"]) == (EPOCHS, EPOCHS * 6)
    assert_same_weights(resumed["model"], straight["model"])  # the stopped part ran in another process
    assert _records(tmp_path / "stopped") == _records(tmp_path / "straight")


def test_sigkill_mid_epoch_resumes_and_finishes(tree, tmp_path):
    run = tmp_path / "run"
    process = _start(tree, run)
    wait_for(run / "last.pth", process)
    time.sleep(0.05)  # into a later step, possibly while a checkpoint is being written
    process.kill()
    process.wait(timeout=60)
    assert process.returncode == -signal.SIGKILL
    killed_at = read_checkpoint(run / "last.pth")  # whole: the atomic rename never exposes a partial file
    assert killed_at["epoch"] < EPOCHS

    assert main(["train", "--output", str(run), "--resume", "auto"]) == 0
    assert [r["epoch"] for r in _records(run)] == list(range(1, EPOCHS + 1))  # each epoch once
    assert read_checkpoint(run / "last.pth")["epoch"] == EPOCHS
    assert (run / "best.pth").exists() and not [p for p in os.listdir(run) if ".tmp" in p]
