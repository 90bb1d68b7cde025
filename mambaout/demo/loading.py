"""Which model the demo serves: a checkpoint, published weights, or the newest run of the embedded default."""

from pathlib import Path

import torch
import yaml

from mambaout.errors import UserError
from mambaout.train.inference import Classifier, load_classifier

__all__ = ["latest_default_run", "load_demo_classifier"]

NO_RUN = (
    "no checkpoint to serve: `bash scripts/main.sh` trains the embedded default into runs/ "
    "(or pass --checkpoint PATH, or --model NAME [--pretrained SOURCE])"
)


def latest_default_run(runs: Path = Path("runs")) -> Path | None:
    """The newest `best.pth` under `runs/*/` of a run on the embedded default's data (the bundled digits: its
    `config.yaml` has no `data`), or None."""
    found = []
    for best in runs.glob("*/best.pth"):
        try:
            config = yaml.safe_load((best.parent / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue  # not a run folder, or one being written
        # a classification run on the embedded default's data (detection configs have a `kind`, segmentation's a
        # `crop_size`: their embedded defaults have no `data` either)
        if isinstance(config, dict) and not config.get("data") and not {"kind", "crop_size"} & config.keys():
            found.append((best.stat().st_mtime, best))
    return max(found)[1] if found else None


def load_demo_classifier(
    checkpoint: str | None,
    model_name: str | None,
    pretrained: str | None,
    prefer_ema: bool,
    device: torch.device,
    runs: Path = Path("runs"),
) -> Classifier:
    """The classifier that `mambaout demo`'s flags name.

    Args:
        checkpoint: `--checkpoint`: a `mambaout train` checkpoint or any weights file (with `model_name`).
        model_name: `--model`: a registered variant.
        pretrained: `--pretrained`: a weights source for `model_name` ("official", "timm", a path or URL).
        prefer_ema: Use a checkpoint's EMA weights.
        device: Where the model runs.
        runs: Where to look for the embedded default's runs when nothing is named.

    Raises:
        UserError: Conflicting flags, an unreadable checkpoint, or nothing named and no run to serve.
    """
    if checkpoint and pretrained:
        raise UserError("--checkpoint and --pretrained both name weights: give one of them")
    if pretrained and not model_name:
        raise UserError(f"--pretrained {pretrained} needs --model NAME (the variant the weights are for)")
    if not checkpoint and not model_name:
        latest = latest_default_run(runs)
        if latest is None:
            raise UserError(NO_RUN)
        checkpoint = str(latest)
    return load_classifier(checkpoint or pretrained, model_name, prefer_ema, device)
