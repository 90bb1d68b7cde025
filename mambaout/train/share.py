"""A training run shared as a hub folder in timm's format: `config.json` + `model.safetensors`.

The folder's `pretrained_cfg` carries what the run was trained for: its classes (`num_classes`, `label_names`) and
its evaluation preprocessing (`input_size`, `crop_pct`, `crop_mode`, `interpolation`, `mean`, `std`), so that
`timm.create_model("local-dir:DIR", pretrained=True)` with timm's `resolve_data_config` + `create_transform`,
`mambaout predict --checkpoint local-dir:DIR` and transformers' timm wrapper classify as `mambaout eval` does on
the run's checkpoint, without flags.
"""

import os

from mambaout.models import save_pretrained
from mambaout.train.inference import Classifier, load_classifier

__all__ = ["share_run"]

_STRIDE = 32  # the network's total stride: timm's `pool_size` is the last map's size
_PUBLISHED_ONLY = ("tag", "license")  # what the variant's published weights say of themselves, not of a run


def share_run(
    checkpoint: str | os.PathLike, directory: str | os.PathLike, prefer_ema: bool = False, model_name: str | None = None
) -> Classifier:
    """Write the classifier of `checkpoint` (a `mambaout train` checkpoint, or any `load_classifier` reads) as a hub
    folder with its classes and preprocessing.

    Args:
        checkpoint: The run's `best.pth` / `last.pth`.
        directory: The folder, created if missing.
        prefer_ema: Write the run's EMA weights.
        model_name: The variant, needed only for weights that are not a run's (a run's checkpoint names its own).

    Returns:
        The classifier written (its model, class names and preprocessing).

    Raises:
        UserError: The checkpoint cannot be read or its model cannot be rebuilt by timm (e.g. another token mixer).
    """
    classifier = load_classifier(str(checkpoint), model_name, prefer_ema=prefer_ema)
    model, data = classifier.model.cpu(), classifier.data
    size = tuple(data["input_size"])
    model.pretrained_cfg = {
        **{k: v for k, v in model.pretrained_cfg.items() if k not in _PUBLISHED_ONLY},
        "input_size": size,
        "test_input_size": size,
        "pool_size": (size[1] // _STRIDE, size[2] // _STRIDE),
        "crop_pct": data["crop_pct"],
        "test_crop_pct": data["crop_pct"],
        "crop_mode": data.get("crop_mode", "center"),
        "interpolation": data["interpolation"],
        "mean": tuple(data["mean"]),
        "std": tuple(data["std"]),
        "num_classes": len(classifier.class_names),
        "label_names": list(classifier.class_names),
    }
    save_pretrained(model, directory)
    return classifier
