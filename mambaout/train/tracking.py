"""Experiment tracking (`--log tensorboard mlflow wandb`): a run's training loss and learning rate per step, its epoch
records (the lines of `metrics.jsonl`: validation figures, images/s, ...) and its resolved config, sent to
TensorBoard, MLflow or Weights & Biases.

Names: `train/loss` (the mean loss of the steps since the last point, on rank 0's share of each batch) and `train/lr`
every `log_interval` optimizer steps; at each epoch end `val/<figure>` for a record's `val_<figure>` and `epoch/<key>`
for its other keys, at the run's step. Only rank 0 tracks.

A resumed run goes on in the same tracked run, at the checkpoint's step: TensorBoard writes on in `RUN/tensorboard/`
and drops the events a crashed process logged after that step (`purge_step`); MLflow and W&B reopen the run whose id
`last.pth` keeps (`Tracking.ids`). MLflow cannot drop points, so a run killed without saving shows the steps after
its last checkpoint twice there; W&B ignores steps below its last one.

Where the records go: TensorBoard to `RUN/tensorboard/`; MLflow to `MLFLOW_TRACKING_URI` when set, else a SQLite
store in `RUN/mlflow/` (MLflow 3 refuses its plain-folder `file:` store unless `MLFLOW_ALLOW_FILE_STORE` is set),
experiment `MLFLOW_EXPERIMENT_NAME` or `mambaout`; W&B to `RUN/wandb/`, offline unless `WANDB_MODE` says otherwise,
project `WANDB_PROJECT` or `mambaout`. The packages are optional (`pip install 'mambaout[track]'`, W&B
`pip install wandb`); each is imported only by its tracker.
"""

import importlib.util
import os
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, Protocol

import yaml

from mambaout.errors import UserError, one_line
from mambaout.train.notices import warn
from mambaout.train.signals import TrainingInterrupted

__all__ = ["TRACKERS", "Tracker", "Tracking"]

TRACKERS = ("tensorboard", "mlflow", "wandb")  # each the name of its package too
_INSTALL = {
    "tensorboard": "pip install 'mambaout[track]'",
    "mlflow": "pip install 'mambaout[track]'",
    "wandb": "pip install wandb",
}
_MLFLOW_STATUS = {"finished": "FINISHED", "interrupted": "KILLED", "failed": "FAILED"}
_MLFLOW_BATCH = 100  # the most params one MLflow `log_batch` takes


class Tracker(Protocol):
    """One backend's view of a run.

    Attributes:
        run_id: After `start`, the id a resumed run reopens (None: the backend has no run ids).
        where: After `start`, one line saying where the records go and how to look at them.
    """

    run_id: str | None
    where: str

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        """Open the run that `run_id` names (a new one when None), continuing after optimizer step `step` (0 for a
        new run), and record `config`."""

    def log_step(self, step: int, values: dict[str, float]) -> None:
        """Record `values` at optimizer step `step`."""

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        """Record an epoch's `values` at optimizer step `step`, and make all records so far readable."""

    def finish(self, status: str) -> None:
        """Close the run: "finished", "interrupted" (saved, to be resumed) or "failed"."""


class TensorBoardTracker:
    """Event files in `RUN/tensorboard/`, through `torch.utils.tensorboard` (which needs the `tensorboard` package)."""

    run_id = None

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        from torch.utils.tensorboard import SummaryWriter

        folder = run_dir / "tensorboard"
        # events after the checkpoint's step were logged by a process that died before saving: hidden on reading
        self.writer = SummaryWriter(str(folder), purge_step=step + 1 if step else None)
        text = yaml.safe_dump(config, sort_keys=False)
        self.writer.add_text("config", "".join(f"    {line}\n" for line in text.splitlines()), step)  # a code block
        self.where = f"tensorboard: {folder} (tensorboard --logdir {folder})"

    def log_step(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self.writer.add_scalar(tag, value, step)

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.log_step(step, values)
        self.writer.flush()

    def finish(self, status: str) -> None:
        self.writer.close()


class MlflowTracker:
    """An MLflow run, through `MlflowClient` (no global active run): its params are the config the run started with,
    its artifact `config.yaml` the latest resolved config."""

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        from mlflow.entities import Param
        from mlflow.exceptions import MlflowException
        from mlflow.tracking import MlflowClient

        local = run_dir.resolve() / "mlflow"
        uri, artifacts = os.environ.get("MLFLOW_TRACKING_URI"), None
        if not uri:  # the run's own store, its artifacts beside it
            local.mkdir(exist_ok=True)
            uri, artifacts = f"sqlite:///{local / 'mlflow.db'}", (local / "artifacts").as_uri()
        try:
            self.client = client = MlflowClient(tracking_uri=uri)
            run = self._reopened(run_id, uri) if run_id else None
            if run is None:
                run = client.create_run(
                    self._experiment(artifacts),
                    run_name=run_dir.name,
                    tags={"mambaout.run_dir": str(run_dir.resolve())},
                )
            self.run_id = run.info.run_id
            logged = run.data.params
            params = [Param(k, str(v)) for k, v in config.items() if k not in logged]
            for first in range(0, len(params), _MLFLOW_BATCH):
                client.log_batch(self.run_id, params=params[first : first + _MLFLOW_BATCH])
            client.log_text(self.run_id, yaml.safe_dump(config, sort_keys=False), "config.yaml")
        except MlflowException as e:
            raise UserError(f"--log mlflow: tracking store {uri}: {one_line(e.message)}") from None
        self.where = f"mlflow: run {self.run_id} in {uri} (mlflow ui --backend-store-uri {uri})"

    def _reopened(self, run_id: str, uri: str) -> Any:
        """The saved run, running again; None (after a warning) when this tracking store does not hold it."""
        from mlflow.exceptions import MlflowException

        try:
            run = self.client.get_run(run_id)
        except MlflowException as e:
            if e.error_code != "RESOURCE_DOES_NOT_EXIST":
                raise
            warn(f"--log mlflow: {uri} holds no run {run_id} (the run's earlier records): starting a new MLflow run")
            return None
        self.client.update_run(run_id, status="RUNNING")
        return run

    def _experiment(self, artifacts: str | None) -> str:
        """The id of experiment `MLFLOW_EXPERIMENT_NAME` (default `mambaout`), made with `artifacts` if missing."""
        name = os.environ.get("MLFLOW_EXPERIMENT_NAME") or "mambaout"
        experiment = self.client.get_experiment_by_name(name)
        if experiment is not None:
            return experiment.experiment_id
        return self.client.create_experiment(name, artifact_location=artifacts)

    def log_step(self, step: int, values: dict[str, float]) -> None:
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in values.items()])

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.log_step(step, values)

    def finish(self, status: str) -> None:
        self.client.set_terminated(self.run_id, _MLFLOW_STATUS[status])


class WandbTracker:
    """A Weights & Biases run in `RUN/wandb/`, offline unless `WANDB_MODE` is set (`wandb sync` uploads it later)."""

    def start(self, run_dir: Path, config: dict[str, Any], run_id: str | None, step: int) -> None:
        import wandb

        mode = os.environ.get("WANDB_MODE") or "offline"
        try:
            self.run = wandb.init(
                dir=str(run_dir),
                id=run_id,
                resume="allow",
                mode=mode,
                project=os.environ.get("WANDB_PROJECT") or "mambaout",
                name=run_dir.name,
                settings=wandb.Settings(console="off", silent=True),  # the run's own output stays as it is
            )
        except wandb.errors.Error as e:
            raise UserError(f"--log wandb: {one_line(str(e))}") from None
        self.run.config.update(config, allow_val_change=True)  # a resumed run's changed settings replace the old
        self.run_id = self.run.id
        self.where = f"wandb: run {self.run_id} ({mode}) in {run_dir / 'wandb'}"

    def log_step(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def log_epoch(self, step: int, values: dict[str, float]) -> None:
        self.run.log(values, step=step)

    def finish(self, status: str) -> None:
        self.run.finish(exit_code=0 if status == "finished" else 1)


_BACKENDS = {"tensorboard": TensorBoardTracker, "mlflow": MlflowTracker, "wandb": WandbTracker}


class Tracking:
    """The trackers of one run: started by rank 0 once the run folder exists (on other ranks, never started, every
    call does nothing), finished with the run's outcome when the `with` block around the run ends.

    Args:
        names: `--log`'s trackers (checked against `TRACKERS` by the config).
        interval: Optimizer steps between `train/loss` points.
        ids: The run ids a resumed run's checkpoint saved, by tracker.

    Raises:
        UserError: A tracker's package is not installed.
    """

    def __init__(self, names: Sequence[str], interval: int, ids: dict[str, str] | None):
        for name in names:
            if importlib.util.find_spec(name) is None:
                raise UserError(
                    f"--log {name} needs the {name} package: {_INSTALL[name]}, or leave {name} out of --log"
                )
        self.names = tuple(names)
        # kept for trackers left out of --log: adding one back continues its run
        self.ids = {str(k): str(v) for k, v in ids.items()} if isinstance(ids, dict) else {}
        self.interval = interval
        self.started: list[Tracker] = []
        self._loss_sum, self._steps = 0.0, 0

    @property
    def lines(self) -> list[str]:
        """One line per started tracker: where its records go."""
        return [tracker.where for tracker in self.started]

    def start(self, run_dir: Path, config: dict[str, Any], step: int) -> None:
        """Open every tracker's run in `run_dir`, after optimizer step `step`, recording `config`.

        Raises:
            UserError: A tracking store or service refused the run.
        """
        for name in self.names:
            tracker = _BACKENDS[name]()
            tracker.start(run_dir, config, self.ids.get(name), step)
            self.started.append(tracker)
            if tracker.run_id is not None:
                self.ids[name] = tracker.run_id

    def log_step(self, step: int, loss: float, lr: float) -> None:
        """Count step `step`'s loss; every `interval` steps, record the mean loss since the last point and `lr`."""
        self._loss_sum, self._steps = self._loss_sum + loss, self._steps + 1
        if step % self.interval:
            return
        values = {"train/loss": self._loss_sum / self._steps, "train/lr": lr}
        self._loss_sum, self._steps = 0.0, 0
        for tracker in self.started:
            tracker.log_step(step, values)

    def log_epoch(self, record: dict[str, Any]) -> None:
        """Record an epoch's `metrics.jsonl` line at its step."""
        values = {
            f"val/{key.removeprefix('val_')}" if key.startswith("val_") else f"epoch/{key}": float(value)
            for key, value in record.items()
            if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool)
        }
        for tracker in self.started:
            tracker.log_epoch(record["step"], values)

    def __enter__(self) -> "Tracking":
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        if kind is None:
            status = "finished"
        elif issubclass(kind, (TrainingInterrupted, KeyboardInterrupt)):
            status = "interrupted"
        else:
            status = "failed"
        for tracker in self.started:
            tracker.finish(status)
