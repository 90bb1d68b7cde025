"""Training runs under faults and rival writers (issue 22), for `train`, `detect train` and `segment train` alike.

One writer per run folder: a second process training into a folder another holds (a new run or `--resume auto`) is
refused in one line naming the folder and the holder's PID, and the holder's files stay as they were; a killed
holder's lock goes with it. A run killed mid-save, or stopped by a full disk or by its data folder vanishing, ends in
one line (or a signal) with its last good checkpoint whole, and `--resume auto` finishes it. An explicit length or
warm-up flag is never silently overridden by a recipe's: `--epochs` clears a recipe's `--iters`, and both together
are refused.
"""

import dataclasses
import os
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from dense_fixtures import DETECT, SEGMENT, make_ade, make_coco
from dense_fixtures import flags as dense_flags
from hostile_fixtures import assert_refused, snapshot
from train_fixtures import flags, make_tree, wait_for

from mambaout.cli import main
from mambaout.dense.tasks import Detection, Segmentation
from mambaout.errors import UserError
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint
from mambaout.train.prepare import prepare_run
from mambaout.train.runner import run_training
from mambaout.train.trainer import Classification

TASKS = ("train", "detect", "segment")
COMMANDS = {"train": ["train"], "detect": ["detect", "train"], "segment": ["segment", "train"]}
LIMIT = 16 * 1024  # bytes a file may reach under the simulated full disk: a config fits, a checkpoint does not


def _make_data(task: str, root: Path) -> Path:
    """The task's tiny dataset, the same files every time: 4 training images (one step of the classifier, two of
    the dense tasks)."""
    if task == "train":
        return make_tree(root, train=2, val=1)  # two classes
    return (make_coco if task == "detect" else make_ade)(root, train=4, val=1)


def _argv(task: str, data: Path, output: Path, **settings: object) -> list[str]:
    """A fast run of `task` on `data` into `output`: one epoch (two steps for segmentation), `settings` on top."""
    if task == "train":
        given = flags(**{"epochs": 1, **settings})
    elif task == "detect":
        given = dense_flags(DETECT, **{"epochs": 1, **settings})
    else:
        given = dense_flags(SEGMENT, **{"iters": 2, **settings})
    return [*COMMANDS[task], "--data", str(data), "--output", str(output), *given]


def _resume(task: str, run: Path) -> list[str]:
    return [*COMMANDS[task], "--output", str(run), "--resume", "auto"]


@dataclasses.dataclass
class Workspace:
    root: Path
    data: dict[str, Path]
    runs: dict[str, Path]  # a finished run of each task


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("runs")
    data = {task: _make_data(task, root / f"{task}-data") for task in TASKS}
    runs = {task: root / f"{task}-run" for task in TASKS}
    for task in TASKS:
        assert main(_argv(task, data[task], runs[task])) == 0
    return Workspace(root, data, runs)


def _length_cases(ws: Workspace) -> list[tuple[list[str], str]]:
    """(argv, what the line must name): a length or warm-up given both in epochs and in optimizer steps."""
    both = "both set the run's length, and --iters would win: pass only one"
    warmup = "both set the warm-up, and --warmup-iters would win: pass only one"
    d, r = ws.data, ws.root

    def new(task: str, **settings: object) -> list[str]:
        return _argv(task, d[task], r / f"new-{task}", **settings)

    return [
        (new("train", iters=5), f"--epochs 1 and --iters 5 {both}"),
        (new("detect", iters=5), f"--epochs 1 and --iters 5 {both}"),
        (new("segment", epochs=1), f"--epochs 1 and --iters 2 {both}"),
        (new("train", warmup_iters=3), f"--warmup-epochs 0 and --warmup-iters 3 {warmup}"),
        (new("detect", warmup_epochs=0.5), f"--warmup-epochs 0.5 and --warmup-iters 0 {warmup}"),
        (new("segment", warmup_epochs=0.5), f"--warmup-epochs 0.5 and --warmup-iters 0 {warmup}"),
        (
            [*_resume("segment", ws.runs["segment"]), "--epochs", "3", "--iters", "5"],
            f"--epochs 3 and --iters 5 {both}",
        ),
    ]


def test_a_length_given_both_in_epochs_and_in_steps_is_refused(ws, capsys):
    for argv, named in _length_cases(ws):
        assert_refused(ws.root, capsys, argv, named)


@pytest.mark.parametrize("task", TASKS)
def test_a_held_run_folder_refuses_every_second_writer_and_the_lock_leaves_no_trace(ws, capsys, task):
    run, fresh = ws.runs[task], ws.root / f"held-{task}" / "deep"
    data, named = ws.data[task], f"is in use by another training run (PID {os.getpid()})"
    with RunDir(run).lock(), RunDir(fresh).lock():
        assert (run / ".lock").read_text() == f"{os.getpid()}\n" and (fresh / ".lock").exists()
        for argv, folder in (
            (_argv(task, data, run), run),
            (_resume(task, run), run),
            (_argv(task, data, fresh), fresh),
        ):
            line = assert_refused(ws.root, capsys, argv, named)
            assert line.startswith(f"error: --output {folder} is in use")
    # the lock file goes with the lock, and so do the folders it made for a run that never wrote
    assert not (run / ".lock").exists() and not (ws.root / f"held-{task}").exists()
    # as when the run folder cannot be made: nothing of its path is left
    assert_refused(ws.root, capsys, _argv(task, data, ws.root / "made" / ("x" * 300)), "--output: cannot create")


def test_a_dead_holders_lock_is_taken_over_once_its_loader_processes_are_gone(tmp_path):
    run = RunDir(tmp_path / "run")
    read_end, write_end = os.pipe()
    holder = os.fork()
    if holder == 0:  # a run that takes the lock, forks a process (as a DataLoader worker) and dies without cleaning up
        try:
            held = run.lock()
            held.__enter__()  # never left: the process ends first
            loader = os.fork()
            if loader == 0:
                time.sleep(60)
                os._exit(0)
            os.write(write_end, str(loader).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(holder, 0)
    loader = int(os.read(read_end, 32))
    os.close(read_end)
    try:
        with pytest.raises(UserError, match=rf"\(PID {holder}, which has ended: its data loader processes are exiting"):
            run.lock().__enter__()
    finally:
        os.kill(loader, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while True:  # the kernel lets go of the lock as the last process holding it exits
        try:
            with run.lock():
                assert run.lock_file.read_text() == f"{os.getpid()}\n"
            break
        except UserError:
            assert time.monotonic() < deadline, "the lock outlived every process that held it"
            time.sleep(0.05)
    assert os.listdir(run.path) == []


def test_a_checkpoint_replaced_after_it_was_read_is_not_continued(ws, tmp_path):
    run = Path(shutil.copytree(ws.runs["train"], tmp_path / "run"))
    config, checkpoint = prepare_run(Classification, None, {"output": str(run), "epochs": "2"}, "auto")
    # meanwhile another run, holding the folder, saved a newer last.pth and let go of the folder
    newer = read_checkpoint(run / "last.pth")
    save_checkpoint({**newer, "step": newer["step"] + 1}, run / "last.pth")
    before = snapshot(run)
    with pytest.raises(UserError) as refused:
        run_training(Classification, config, checkpoint)
    assert str(refused.value) == (
        f"--resume: {run}/last.pth was replaced by another process after this run read it: run the command again to "
        "continue from the new one"
    )
    assert snapshot(run) == before  # not continued from the older state, nothing overwritten, the lock let go of

    config, checkpoint = prepare_run(Classification, None, {"output": str(run), "epochs": "2"}, "auto")
    assert run_training(Classification, config, checkpoint) is not None  # read again, it goes on from the new one
    assert read_checkpoint(run / "last.pth")["step"] == newer["step"] + 2


def _kill_mid_save(run: Path, process: subprocess.Popen, timeout: float = 120) -> None:
    """SIGKILL `process` as soon as a temporary checkpoint file shows in `run` (it saves after every step)."""
    deadline = time.monotonic() + timeout
    while not any(".tmp" in name for name in os.listdir(run)):
        assert process.poll() is None, "the run ended before it could be killed mid-save"
        assert time.monotonic() < deadline, "no checkpoint was being written"
        time.sleep(0.001)
    process.kill()
    process.communicate(timeout=60)
    assert process.returncode == -signal.SIGKILL


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_second_writer_is_refused_and_a_run_killed_mid_save_resumes_to_its_end(ws, tmp_path, capsys, task):
    run = tmp_path / "run"
    length = {"detect": {"epochs": 6}, "segment": {"iters": 12}}[task]  # 6 epochs of 2 steps
    argv = _argv(task, ws.data[task], run, save_interval=1, **length)
    first = subprocess.Popen(
        [sys.executable, "-m", "mambaout", *argv], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(run / "last.pth", first, timeout=180)
        first.send_signal(signal.SIGSTOP)  # paused mid-run, holding the folder
        before = snapshot(run)
        for second in (argv, _resume(task, run)):
            capsys.readouterr()
            assert main(second) == 2
            err = capsys.readouterr().err.strip().splitlines()
            assert err == [
                f"error: --output {run} is in use by another training run (PID {first.pid}): wait for it to end or "
                "stop it, or pick another --output"
            ]
        assert snapshot(run) == before  # the first writer's files as it left them, its lock among them
        first.send_signal(signal.SIGCONT)
        _kill_mid_save(run, first)
    finally:
        if first.poll() is None:
            first.kill()
            first.communicate()
    killed_at = read_checkpoint(run / "last.pth")  # whole: the atomic rename never shows a partial file
    assert killed_at["epoch"] < 6 and (run / ".lock").exists()  # the dead writer's lock file; its lock went with it

    assert main(_resume(task, run)) == 0
    records = RunDir(run).read_metrics()
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5, 6]  # each epoch once
    assert (read_checkpoint(run / "last.pth")["epoch"], records[-1]["step"]) == (6, 12)
    assert sorted(os.listdir(run)) == ["best.pth", "config.yaml", "last.pth", "metrics.jsonl"]  # no temp, no lock


def _limited() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_a_full_disk_ends_the_run_in_one_line_and_keeps_its_checkpoint(ws, tmp_path, task):
    run = Path(shutil.copytree(ws.runs[task], tmp_path / "run"))
    before = (run / "last.pth").read_bytes()
    longer = {"detect": ["--epochs", "2"], "segment": ["--iters", "4"]}[task]
    argv = [sys.executable, "-m", "mambaout", *_resume(task, run), *longer]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, preexec_fn=_limited)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert re.fullmatch(
        rf"error: cannot write {run}/(best|last)\.pth: File too large; .* free there, the file needs about .*; "
        rf"{run}/(best|last)\.pth is as it was",
        done.stderr.strip().splitlines()[-1],
    ), done.stderr
    assert (run / "last.pth").read_bytes() == before
    assert sorted(os.listdir(run)) == ["best.pth", "config.yaml", "last.pth", "metrics.jsonl"]  # no temp, no lock

    assert main([*_resume(task, run), *longer]) == 0  # with room again, it goes on from the checkpoint it kept
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


@pytest.mark.parametrize("task", TASKS)
def test_a_data_folder_deleted_mid_run_ends_in_one_line_that_says_how_to_go_on(tmp_path, capsys, monkeypatch, task):
    data, run = _make_data(task, tmp_path / "data"), tmp_path / "run"
    append = RunDir.append_metrics

    def delete_the_data_after_a_record(self: RunDir, record: dict) -> None:
        append(self, record)
        shutil.rmtree(data)

    monkeypatch.setattr(RunDir, "append_metrics", delete_the_data_after_a_record)
    longer = {"iters": 4} if task == "segment" else {"epochs": 2}
    capsys.readouterr()
    assert main(_argv(task, data, run, **longer)) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err + captured.out, captured.err
    assert re.fullmatch(
        rf"error: every image in {data}/\S+ became unreadable while in use \(moved, deleted or unmounted\?\), e\.g\. "
        rf"{data}/\S+: cannot open it: No such file or directory; {run}/last\.pth holds the last good state: fix the "
        r"cause, then continue with --resume auto",
        lines[0],
    ), lines[0]
    assert read_checkpoint(run / "last.pth")["epoch"] == 1 and not (run / ".lock").exists()

    monkeypatch.undo()
    _make_data(task, data)  # the folder back, as it was
    assert main(_resume(task, run)) == 0
    assert [r["epoch"] for r in RunDir(run).read_metrics()] == [1, 2]


def test_an_explicit_epochs_wins_over_the_ade_recipes_160k_steps(ws, tmp_path, capsys):
    run = tmp_path / "run"
    settings = {k: v for k, v in SEGMENT.items() if k not in ("iters", "warmup_iters")}
    recipe = ["--config", "upernet_tiny_ade20k", "--num-classes", "3", "--pretrained", "none"]
    argv = ["segment", "train", "--data", str(ws.data["segment"]), "--output", str(run), *recipe]
    # checked before training: without the rule the run below would take 160,000 steps
    assert prepare_run(Segmentation, "upernet_tiny_ade20k", {"epochs": "1"}, None)[0].iters is None
    capsys.readouterr()
    assert main([*argv, *dense_flags(settings, epochs=1)]) == 0
    out = capsys.readouterr().out
    assert "--iters none: the recipe's 160000 steps give way to --epochs 1 (pass --iters to count in steps)" in out
    assert (
        "--warmup-epochs 0.00937: the recipe's 1500 of 160000 iters, kept in proportion for --epochs 1 (pass "
        "--warmup-epochs to choose)"
    ) in out
    saved = read_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["step"]) == (1, 2)  # 4 images, 2 a step: one epoch, not 80,000
    assert (saved["config"]["iters"], saved["config"]["warmup_iters"]) == (None, None)
    assert saved["config"]["warmup_epochs"] == pytest.approx(1500 / 160000)


def test_an_explicit_epochs_wins_over_the_resumed_runs_steps(ws, tmp_path, capsys):
    run = Path(shutil.copytree(ws.runs["segment"], tmp_path / "run"))  # trained for --iters 2: one epoch
    capsys.readouterr()
    assert main([*_resume("segment", run), "--epochs", "2"]) == 0
    assert "--iters none: the run's 2 steps give way to --epochs 2" in capsys.readouterr().out
    saved = read_checkpoint(run / "last.pth")
    assert (saved["epoch"], saved["step"], saved["config"]["iters"]) == (2, 4, None)


def test_an_explicit_warmup_in_epochs_wins_over_the_recipes_steps(capsys):
    config, _ = prepare_run(Detection, "mask_rcnn_tiny_coco", {"warmup_epochs": "1"}, None)
    assert (config.warmup_epochs, config.warmup_iters, config.epochs) == (1, None, 12)
    assert "--warmup-iters none: the recipe's 500 steps give way to --warmup-epochs 1" in capsys.readouterr().out
    # `--iters none` with `--epochs` says the same as `--epochs` alone
    config, _ = prepare_run(Segmentation, "upernet_tiny_ade20k", {"epochs": "3", "iters": "none"}, None)
    assert (config.epochs, config.iters, config.warmup_iters) == (3, None, None)
    assert config.warmup_epochs == pytest.approx(3 * 1500 / 160000)
