"""Writing files without losing any: a full disk, a killed writer, and the output checks every command runs first.

A full disk is simulated with RLIMIT_FSIZE (writes past the limit fail with EFBIG, as past a quota or a full disk,
with no privileges needed); the commands run in a subprocess under that limit, so that a process that aborts (as
torch.jit.save did) shows as its exit status instead of taking the test run down.
"""

import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from train_fixtures import flags, make_tree, write_image

from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.outputs import check_output
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import save_checkpoint
from mambaout.weights.io import atomic_write, remove_stale_temps

LIMIT = 16 * 1024  # bytes a file may reach under the simulated full disk


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("files")
    tree = make_tree(root / "data", train=4, val=2)
    assert main(["train", "--data", str(tree), "--output", str(root / "run"), *flags(epochs=1)]) == 0
    return root / "run"


def _limited() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


def _cli_on_a_full_disk(*argv: str) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "mambaout", *argv]
    return subprocess.run(command, capture_output=True, text=True, timeout=300, preexec_fn=_limited)


@pytest.mark.parametrize("fmt", ["torchscript", "onnx", "exported-program", "convert", "predict", "plot"])
def test_every_writer_on_a_full_disk_says_so_and_keeps_the_old_file(run, tmp_path, fmt):
    out = tmp_path / {"onnx": "m.onnx", "exported-program": "m.pt2", "plot": "c.png"}.get(fmt, "m.out")
    out.write_bytes(b"")  # the file to keep (an empty one: any command may replace it)
    image = write_image(tmp_path / "x.png", 0, size=8)
    argv = {
        "convert": ["convert", str(run / "best.pth"), str(out), "--to", "timm"],
        "predict": ["predict", *[str(image)] * 400, "--checkpoint", str(run / "best.pth"), "--output", str(out)],
        "plot": ["plot", str(run), "--output", str(out)],
    }.get(fmt, ["export", "--model", "mambaout_femto", "--checkpoint", str(run / "best.pth"), "--format", fmt])
    argv += ["--output", str(out), "--img-size", "64"] if argv[0] == "export" else []
    done = _cli_on_a_full_disk(*argv)
    last = done.stderr.strip().splitlines()[-1]
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert last.startswith(f"error: cannot write {out}: File too large") and "free there, the file needs" in last
    assert last.endswith(f"{out} is as it was") and out.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []


def test_a_checkpoint_write_that_fails_leaves_the_previous_one(tmp_path):
    save_checkpoint({"w": torch.zeros(4)}, tmp_path / "last.pth")
    before = (tmp_path / "last.pth").read_bytes()
    script = (
        "import sys, torch\n"
        "from mambaout.train.checkpoint import save_checkpoint\n"
        "from mambaout.errors import UserError\n"
        "try: save_checkpoint({'w': torch.zeros(50_000)}, sys.argv[1])\n"
        "except UserError as e: print(e); sys.exit(2)\n"
    )
    command = [sys.executable, "-c", script, str(tmp_path / "last.pth")]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=_limited)
    assert done.returncode == 2 and "File too large" in done.stdout and "the file needs about 0.2 MiB" in done.stdout
    assert (tmp_path / "last.pth").read_bytes() == before and os.listdir(tmp_path) == ["last.pth"]


def test_too_little_room_is_refused_before_writing(tmp_path, monkeypatch):
    monkeypatch.setattr("shutil.disk_usage", lambda path: _Usage(free=1000))
    with pytest.raises(UserError, match=r"not enough room; .* the file needs about 0\.2 MiB; nothing was written"):
        save_checkpoint({"w": torch.zeros(50_000)}, tmp_path / "last.pth")
    assert os.listdir(tmp_path) == []


class _Usage:
    def __init__(self, free: int):
        self.free, self.total, self.used = free, free, 0


def test_a_killed_writers_temporary_files_are_cleared(tmp_path):
    dead = tmp_path / f".last.{2**22 + 12345}-deadbeef.tmp.pth"  # a pid above Linux's pid_max: never alive
    legacy = tmp_path / ".last.0badcafe.tmp.pth"  # the name before writers put their pid in it
    alive = tmp_path / f".last.{os.getpid()}-0123abcd.tmp.pth"
    other = tmp_path / f".best.{2**22 + 12345}-deadbeef.tmp.pth"
    for path in (dead, legacy, alive, other):
        path.write_bytes(b"partial")
    with atomic_write(tmp_path / "last.pth") as f:
        f.write(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([alive.name, other.name, "last.pth"])
    assert remove_stale_temps(tmp_path) == [other]
    RunDir(tmp_path).create()
    assert alive.exists()


def test_check_output_compares_real_paths(tmp_path):
    image = write_image(tmp_path / "a.png", 0)
    (tmp_path / "sub").mkdir()
    os.link(image, tmp_path / "hard.png")
    for alias in (tmp_path / "sub" / ".." / "a.png", tmp_path / "hard.png"):
        with pytest.raises(UserError, match="is also an input"):
            check_output(alias, "--output", "predictions", inputs=[image])
    assert check_output(tmp_path / "new.json", "--output", "predictions", inputs=[image]) == tmp_path / "new.json"
    (tmp_path / "mine.txt").write_text("notes")
    assert check_output(tmp_path / "mine.txt", "--output", "predictions", force=True) == tmp_path / "mine.txt"
