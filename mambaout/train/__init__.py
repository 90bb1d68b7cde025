"""Training: the run config (dataclass + YAML recipes), the engine, checkpoints, distributed set-up, inference.

Example:
    >>> from mambaout.train import prepare_run, train
    >>> config, checkpoint = prepare_run("digits_cpu", {"output": "runs/digits"}, resume="auto")
    >>> result = train(config, checkpoint)
"""

from mambaout.train.config import TrainConfig, build_config, load_config_file
from mambaout.train.engine import NonFiniteLoss, evaluate, train_one_epoch
from mambaout.train.inference import Classifier, evaluate_folder, load_classifier, predict_files
from mambaout.train.trainer import TrainingInterrupted, TrainResult, prepare_run, train

__all__ = [
    "Classifier",
    "NonFiniteLoss",
    "TrainConfig",
    "TrainResult",
    "TrainingInterrupted",
    "build_config",
    "evaluate",
    "evaluate_folder",
    "load_classifier",
    "load_config_file",
    "predict_files",
    "prepare_run",
    "train",
    "train_one_epoch",
]
