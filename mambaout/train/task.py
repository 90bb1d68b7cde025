"""What one kind of training gives the engine (`Task`: settings, data, model, step, metric) and what a run returns
(`TrainResult`). Classification is `mambaout.train.trainer.Classification`; detection and segmentation are in
`mambaout.dense.tasks`."""

import abc
import dataclasses
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from mambaout.train.config import CONFIG_DIR, RunConfig
from mambaout.train.distributed import DistEnv
from mambaout.train.engine import ForwardBackward, TrainParts

__all__ = ["Task", "TrainResult"]


@dataclasses.dataclass
class TrainResult:
    """Where the run is and how it ended.

    Attributes:
        run_dir: The run folder.
        epochs: Epochs the run was configured for.
        metric: The validation figure that picks `best.pth` (`top1`, `bbox_ap`, `miou`).
        best: Its best value (percent), -inf before any evaluation.
        metrics: The last epoch's record.
    """

    run_dir: Path
    epochs: int
    metric: str
    best: float
    metrics: dict[str, Any]


class Task(abc.ABC):
    """What one kind of training supplies to the engine: its settings, data, model, step and metric.

    The class attributes are used before a run exists (`prepare_run`, the command line); an instance is one run's
    task, built with the run's config and process, and set up by `Runner` in the order of the methods below.

    Attributes:
        name: Saved in checkpoints as `task` ("classification", "detection", "segmentation").
        command: The command that trains it, for messages (`mambaout train`).
        config_class: Its `RunConfig` subclass.
        recipes: The folder of its named recipes.
        frozen_on_resume: Settings a resumed run cannot change: its weights and optimizer state were made under them
            (PyTorch's optimizer restores its saved hyperparameters, so a changed value would be ignored, or crash on
            another optimizer's state). The learning-rate schedule may change: it is recomputed from the config at
            the saved step.
        metric: The validation figure (percent, higher is better) that picks `best.pth`: recorded as `val_<metric>`,
            saved as `best_<metric>`.
        metric_label: How messages name it ("val top-1").
        collate_fn: How the loaders batch samples; None for torch's stacking.
        default_data: The embedded dataset's short name (run folders are `runs/<model>-<data>-<time>`).
        train_set, val_set: Datasets with `root`, and `status` / `new_unreadable()` as `mambaout.data.ImageFiles`.
        class_names: Name per class, in label order.
        data_root: The dataset's folder (or its `wds:`/`hfds:` name), for messages.
    """

    name: ClassVar[str]
    command: ClassVar[str]
    config_class: ClassVar[type[RunConfig]]
    recipes: ClassVar[Path] = CONFIG_DIR
    frozen_on_resume: ClassVar[tuple[str, ...]]
    metric: ClassVar[str]
    metric_label: ClassVar[str]
    collate_fn: ClassVar[Callable[[list[Any]], Any] | None] = None  # how loaders batch samples (None: stacking)
    default_data: ClassVar[str]  # the embedded dataset's name, for default run folders

    train_set: Dataset
    val_set: Dataset
    class_names: list[str]
    data_root: Path | str

    def __init__(self, config: Any, env: DistEnv):
        self.config, self.env = config, env

    @classmethod
    @abc.abstractmethod
    def default_recipe(cls, model: str, data: str | None) -> str | None:
        """The recipe used without --config for `--data` (None: the embedded default), or None for the config
        class's defaults."""

    @abc.abstractmethod
    def build_data(self, checkpoint: dict[str, Any] | None) -> None:
        """Set `train_set`, `val_set`, `class_names` and `data_root`; refuse data a resumed run was not trained on."""

    @abc.abstractmethod
    def build_model(self, pretrained: bool) -> nn.Module:
        """The model on the CPU, with `config.pretrained` weights when `pretrained`; set `self.config` to the config
        with this task's settings resolved (number of classes, sizes) and the datasets' transforms."""

    @abc.abstractmethod
    def forward_backward(self, module: nn.Module, amp_dtype: torch.dtype | None) -> ForwardBackward:
        """The micro-batch step for `module` (the plain model) under `amp_dtype`."""

    @abc.abstractmethod
    def check_memory(self, parts: TrainParts) -> None:
        """Refuse a batch whose activations cannot fit in the device's free memory (`UserError`)."""

    @abc.abstractmethod
    def evaluate(self, model: nn.Module, loader: DataLoader, amp_dtype: torch.dtype | None) -> dict[str, float]:
        """Validation figures over `loader` on every rank (`metric` among them), equal on all ranks."""

    @abc.abstractmethod
    def epoch_summary(self, record: dict[str, Any]) -> str:
        """The validation part of the epoch's line (empty when the epoch was not evaluated)."""

    @abc.abstractmethod
    def describe(self, parts: TrainParts) -> tuple[str, str]:
        """The run's first line after `run DIR: MODEL (N params), ` (classes and data), and its last line after
        `step: ` (how a step runs)."""

    def val_batch_size(self) -> int:
        """Samples per validation batch; default the training batch."""
        return self.config.batch_size

    @abc.abstractmethod
    def warn_about_data(self) -> None:
        """Report, once on rank 0, what the datasets skipped while they were read in."""

    def checkpoint_extras(self) -> dict[str, Any]:
        """What checkpoints keep about the data besides `class_names` (e.g. COCO category ids)."""
        return {}
