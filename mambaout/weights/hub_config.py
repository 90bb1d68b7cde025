"""The checks a hub folder's `config.json` passes before anything is built from it.

A config comes from a folder or the Hub, so it is data to check, not to trust: every field this package reads
(the architecture, the classes, the input and its normalisation, the input channels) must have timm's type and a
usable value, or the config is refused in one `UserError` line naming the file and the field. How large a network
the fields describe is checked where it is built (`mambaout.models.capacity`), before anything is allocated.
"""

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from timm.data.transforms import str_to_interp_mode

from mambaout.errors import UserError, one_line
from mambaout.limits import MAX_INPUT_SIZE

__all__ = ["check_hub_config"]

CROP_MODES = ("center", "squash", "border")  # timm's eval transform
INTERPOLATIONS = "nearest, bilinear, bicubic, box, hamming or lanczos"  # the names timm's `str_to_interp_mode` takes


def _refuse(path: Path, field: str, rule: str, value: Any) -> UserError:
    return UserError(f"{path}: {field} must be {rule}, got {one_line(repr(value), 80)}")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)) and math.isfinite(value)


def _check_count(path: Path, field: str, value: Any, least: int) -> None:
    if not (_is_int(value) and value >= least):
        raise _refuse(path, field, f"an integer >= {least}", value)


def _check_input_size(path: Path, field: str, value: Any) -> None:
    valid = isinstance(value, (list, tuple)) and len(value) == 3 and all(_is_int(v) for v in value)
    if not (valid and value[0] >= 1 and all(1 <= side <= MAX_INPUT_SIZE for side in value[1:])):
        raise _refuse(path, field, f"[channels, height, width]: integers >= 1, sides <= {MAX_INPUT_SIZE}", value)


def _check_normalisation(path: Path, field: str, value: Any, channels: int, source: str, positive: bool) -> None:
    numbers = isinstance(value, (list, tuple)) and all(_is_number(v) for v in value)
    if not (numbers and len(value) in (1, channels) and (not positive or min(value) > 0)):
        kind = "positive numbers" if positive else "finite numbers"
        raise _refuse(path, field, f"a list of 1 or {channels} ({source}) {kind}", value)


def check_hub_config(config: Any, path: Path) -> None:
    """Refuse a `config.json` (already parsed) whose fields this package reads are missing, mistyped or unusable.

    Checked: `architecture` (a string); `num_classes` (top level and in `pretrained_cfg`: an integer >= 0, 0 for a
    feature extractor as timm writes it); `model_args` and `pretrained_cfg` (objects); `model_args.in_chans` (an
    integer >= 1); in `pretrained_cfg` (or the old single-object form) `input_size` / `test_input_size` ([C, H, W],
    sides up to `MAX_INPUT_SIZE`), `mean` / `std` (1 or C finite numbers, std positive), `crop_pct` /
    `test_crop_pct` (in (0, 1]), `interpolation` (a name timm's transforms know), `crop_mode` (`CROP_MODES`) and
    `label_names` (one string per class after timm's `label_offset`).

    Args:
        config: The parsed JSON.
        path: The file, named in messages.

    Raises:
        UserError: The first field that fails, named with the file and the value found.
    """
    if not isinstance(config, Mapping) or not isinstance(config.get("architecture"), str):
        raise UserError(f"{path} names no architecture: is it a timm model config?")
    for key in ("pretrained_cfg", "model_args"):
        if key in config and not isinstance(config[key], Mapping):
            raise _refuse(path, key, "an object", config[key])
    # timm's older configs are one object: the pretrained config's keys at the top level
    cfg = config.get("pretrained_cfg", config)
    model_args = config.get("model_args", {})
    for where, values in (("", config), ("pretrained_cfg.", cfg)):
        if "num_classes" in values:
            _check_count(path, f"{where}num_classes", values["num_classes"], 0)
    if "in_chans" in model_args:
        _check_count(path, "model_args.in_chans", model_args["in_chans"], 1)
    prefix = "pretrained_cfg." if "pretrained_cfg" in config else ""
    for key in ("input_size", "test_input_size"):
        if key in cfg and (key == "input_size" or cfg[key] is not None):  # timm: no test size is None
            _check_input_size(path, prefix + key, cfg[key])
    if "in_chans" in model_args:
        channels, source = model_args["in_chans"], "model_args.in_chans"
    else:
        channels, source = cfg.get("input_size", (3,))[0], "the input channels"
    for key in ("mean", "std"):
        if key in cfg:
            _check_normalisation(path, prefix + key, cfg[key], channels, source, positive=key == "std")
    for key in ("crop_pct", "test_crop_pct"):
        value = cfg.get(key)
        if value is not None and not (_is_number(value) and 0 < value <= 1):
            raise _refuse(path, prefix + key, "a number in (0, 1]", value)
    if "interpolation" in cfg:
        try:
            str_to_interp_mode(cfg["interpolation"])
        except (KeyError, TypeError):
            raise _refuse(path, prefix + "interpolation", INTERPOLATIONS, cfg["interpolation"]) from None
    if "crop_mode" in cfg and cfg["crop_mode"] not in CROP_MODES:
        raise _refuse(path, prefix + "crop_mode", " or ".join(CROP_MODES), cfg["crop_mode"])
    names = cfg.get("label_names")
    offset = cfg.get("label_offset") or 0  # timm: outputs before the named classes (a background class)
    classes = config.get("num_classes", cfg.get("num_classes", 1000)) - (offset if _is_int(offset) else 0)
    if names is not None and not (
        isinstance(names, (list, tuple)) and len(names) == classes and all(isinstance(n, str) for n in names)
    ):
        raise _refuse(path, prefix + "label_names", f"a list of {classes} strings, one per class", names)
