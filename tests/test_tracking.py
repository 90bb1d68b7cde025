"""Experiment tracking (`--log`): TensorBoard's events and MLflow's run, read back with their own readers, hold what
`metrics.jsonl` holds; a resumed run goes on in the same run without repeating a step, also after a crash; W&B
offline reuses its run id; segmentation logs its mIoU; only rank 0 logs under DDP; a bad, uninstalled or unusable
tracker is refused in one line, and `--log none` resumes without one."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from dense_fixtures import SEGMENT, make_ade
from dense_fixtures import flags as dense_flags
from hostile_fixtures import assert_refused
from train_fixtures import flags, make_tree

from mambaout.cli import build_parser, main
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import config_overrides

# the `track` extra, which `dev` installs
MlflowClient = pytest.importorskip("mlflow.tracking").MlflowClient
EventAccumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator").EventAccumulator

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4  # optimizer steps per epoch: 16 training images in batches of 4


@pytest.fixture(autouse=True)
def _own_tracking_env(monkeypatch, tmp_path):
    """The defaults under test, whatever the machine sets; W&B's caches kept out of the home folder."""
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR"):
        monkeypatch.delenv(name, raising=False)
    for name in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home"))


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"), train=8, val=4)


def _train(tree: Path, run: Path, *extra: str, **settings: str) -> list[str]:
    return ["train", "--data", str(tree), "--output", str(run), *flags(log_interval="1", **settings), *extra]


def _scalars(run: Path, tag: str) -> dict[int, float]:
    """TensorBoard's `tag` by step, as TensorBoard shows it; a step shown twice fails."""
    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    points = events.Scalars(tag)
    steps = [p.step for p in points]
    assert len(steps) == len(set(steps)), f"{tag} shows steps twice: {steps}"
    return {p.step: p.value for p in points}


def _mlflow(run: Path) -> tuple[MlflowClient, list]:
    """The run folder's own MLflow store and the runs of its `mambaout` experiment."""
    client = MlflowClient(tracking_uri=f"sqlite:///{run.resolve() / 'mlflow' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("mambaout")
    return client, client.search_runs([experiment.experiment_id])


def _history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))


def _assert_matches_metrics(run: Path, one_process: bool = True) -> None:
    """TensorBoard has a train loss and lr per step, and `metrics.jsonl`'s val figures and images/s per epoch; on one
    process, the mean of an epoch's step losses is its `train_loss` (under DDP the steps' are rank 0's alone)."""
    records = RunDir(run).read_metrics()
    loss = _scalars(run, "train/loss")
    assert sorted(loss) == list(range(1, len(records) * STEPS + 1))
    for record in records if one_process else ():
        epoch = [loss[s] for s in range(record["step"] - STEPS + 1, record["step"] + 1)]
        assert sum(epoch) / STEPS == pytest.approx(record["train_loss"], rel=1e-5)
    for tag, key in (("val/top1", "val_top1"), ("val/loss", "val_loss"), ("epoch/images_per_sec", "images_per_sec")):
        assert _scalars(run, tag) == pytest.approx({r["step"]: r[key] for r in records}, rel=1e-5), tag
    assert sorted(_scalars(run, "train/lr")) == sorted(loss)


def test_tensorboard_and_mlflow_hold_the_records_and_a_resumed_run_goes_on_in_them(tree, tmp_path):
    run = tmp_path / "run"
    assert main(_train(tree, run, "--log", "tensorboard", "mlflow", epochs="1")) == 0
    shutil.copy(run / "last.pth", tmp_path / "epoch1.pth")
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "2"]) == 0

    records = RunDir(run).read_metrics()
    assert [r["step"] for r in records] == [STEPS, 2 * STEPS]
    _assert_matches_metrics(run)
    client, runs = _mlflow(run)
    assert len(runs) == 1, "the resumed run started another MLflow run"
    (tracked,) = runs
    assert read_checkpoint(run / "last.pth")["tracking"]["mlflow"] == tracked.info.run_id
    assert tracked.info.status == "FINISHED" and tracked.info.run_name == "run"
    top1 = _history(client, tracked.info.run_id, "val/top1")
    assert [s for s, _ in top1] == [r["step"] for r in records]
    assert [v for _, v in top1] == pytest.approx([r["val_top1"] for r in records])
    loss = _history(client, tracked.info.run_id, "train/loss")
    assert [s for s, _ in loss] == list(range(1, 2 * STEPS + 1))
    assert [v for _, v in loss] == pytest.approx([v for _, v in sorted(_scalars(run, "train/loss").items())])
    assert tracked.data.params["epochs"] == "1" and tracked.data.params["log"] == "['tensorboard', 'mlflow']"
    config = Path(client.download_artifacts(tracked.info.run_id, "config.yaml", str(tmp_path)))
    assert "epochs: 2\n" in config.read_text()  # the latest resolved config

    # a process that logged epoch 2 and died before saving it: the run goes on from epoch 1 and logs epoch 2 again
    shutil.copy(tmp_path / "epoch1.pth", run / "last.pth")
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    _assert_matches_metrics(run)  # TensorBoard shows each step once
    client, runs = _mlflow(run)
    assert [r.info.run_id for r in runs] == [tracked.info.run_id]


def test_wandb_offline_resumes_its_run(tree, tmp_path):
    pytest.importorskip("wandb")  # in the dev extra; a user's install may leave it out
    run = tmp_path / "run"
    assert main(_train(tree, run, "--log", "wandb", epochs="1")) == 0
    run_id = read_checkpoint(run / "last.pth")["tracking"]["wandb"]
    assert main(["train", "--output", str(run), "--resume", "auto", "--epochs", "2"]) == 0
    assert read_checkpoint(run / "last.pth")["tracking"]["wandb"] == run_id
    parts = sorted((run / "wandb").glob("offline-run-*"))
    assert [p.name.rsplit("-", 1)[1] for p in parts] == [run_id, run_id]  # one run, written in two sittings
    for part in parts:
        assert b"val/top1" in (part / f"run-{run_id}.wandb").read_bytes()


def test_segmentation_logs_miou_and_resumes_without_a_missing_tracker(tmp_path, capsys, monkeypatch):
    ade, run = make_ade(tmp_path / "ade", train=8, val=2), tmp_path / "run"
    settings = dense_flags(SEGMENT, iters="2", log_interval="1")
    assert main(["segment", "train", "--data", str(ade), "--output", str(run), *settings, "--log", "tensorboard"]) == 0
    (record,) = RunDir(run).read_metrics()
    assert _scalars(run, "val/miou") == pytest.approx({2: record["val_miou"]})
    assert sorted(_scalars(run, "train/loss")) == [1, 2]

    monkeypatch.setitem(sys.modules, "tensorboard", None)  # as if not installed
    resume = ["segment", "train", "--output", str(run), "--resume", "auto"]
    assert_refused(tmp_path, capsys, resume, "--log tensorboard needs the tensorboard package: pip install")
    assert main([*resume, "--log", "none"]) == 0


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (["--log", "bogus"], "--log must be one of tensorboard, mlflow, wandb (got 'bogus')"),
        (["--log", "mlflow", "tensorboard", "mlflow"], "--log names a tracker twice"),
    ],
)
def test_bad_trackers_are_refused(tree, tmp_path, capsys, extra, named):
    assert_refused(tmp_path, capsys, _train(tree, tmp_path / "run", *extra), named)


def test_an_uninstalled_or_unusable_tracker_is_refused_before_anything_is_written(tree, tmp_path, capsys, monkeypatch):
    argv = _train(tree, tmp_path / "run", "--log", "mlflow")
    with monkeypatch.context() as patch:
        patch.setitem(sys.modules, "mlflow", None)
        assert_refused(tmp_path, capsys, argv, "--log mlflow needs the mlflow package: pip install 'mambaout[track]'")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "bogus://nowhere")
    assert_refused(tmp_path, capsys, argv, "--log mlflow: tracking store bogus://nowhere: ")


def test_under_ddp_only_rank_0_logs(tree, tmp_path):
    run, recipe = tmp_path / "ddp", tmp_path / "recipe.yaml"
    # the recipe names the trackers: torchrun's parser takes `--log` for an ambiguous abbreviation of its `--log-dir`
    recipe.write_text("log: [tensorboard, mlflow]\n")
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "mambaout"]
    argv = _train(tree, run, "--config", str(recipe), "--device", "cpu", batch_size="2", epochs="1")
    done = subprocess.run([*launch, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list((run / "tensorboard").glob("events.out.tfevents.*"))) == 1
    _assert_matches_metrics(run, one_process=False)
    _, runs = _mlflow(run)
    assert len(runs) == 1


def test_track_is_log_under_a_name_torchrun_lets_through():
    # torchrun's own parser stops on `--log` (a prefix of its --log-dir) anywhere on its command line
    args = build_parser().parse_args(["train", "--track", "tensorboard", "mlflow"])
    assert config_overrides(args)["log"] == ["tensorboard", "mlflow"]
    torchrun = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1", "-m", "mambaout",
         "train", "--track", "tensorboard", "--help"], capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert torchrun.returncode == 0 and "--track" in torchrun.stdout, torchrun.stderr[-2000:]
