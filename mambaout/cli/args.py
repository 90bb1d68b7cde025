"""Flag types for the subcommands: numbers checked as argparse reads them, so a bad value is one line naming the flag.

argparse reports an `ArgumentTypeError` as `argument --flag: <message>`, which the CLI's parser prints as one
`error:` line with exit status 2, before any work is done.
"""

import argparse
import math
from collections.abc import Callable

import yaml

from mambaout.errors import one_line
from mambaout.fast.allocator import MALLOC_MODES
from mambaout.limits import MAX_INPUT_SIZE, MIN_INPUT_SIZE

__all__ = ["add_force", "add_malloc", "class_map", "image_size", "integer", "number", "yaml_mapping"]


def integer(low: int | None = None, high: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer within [low, high] (either bound may be None)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects an integer, got {one_line(repr(text), 60)}") from None
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"must be {_bounds(low, high)}, got {one_line(text, 60)}")
        return value

    return parse


def number(
    low: float | None = None, high: float | None = None, low_open: bool = False, high_open: bool = False
) -> Callable[[str], float]:
    """An argparse type: a finite number within the bounds (`low_open`: above `low`, not equal to it)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expects a number, got {one_line(repr(text), 60)}") from None
        below = low is not None and (value <= low if low_open else value < low)
        above = high is not None and (value >= high if high_open else value > high)
        if not math.isfinite(value) or below or above:
            rule = _bounds(low, high, low_open, high_open) if low is not None or high is not None else "finite"
            raise argparse.ArgumentTypeError(f"must be {rule}, got {one_line(text, 60)}")
        return value

    return parse


image_size = integer(MIN_INPUT_SIZE, MAX_INPUT_SIZE)
"""An argparse type: a square input side the models take, in pixels."""


def names(text: str) -> tuple[str, ...]:
    """A comma-separated list of names (`conv, conv_ssm`) as a tuple, in order, blanks dropped."""
    return tuple(item.strip() for item in text.split(",") if item.strip())


def class_map(text: str) -> dict[str, str]:
    """An argparse type: `FOLDER=CLASS[,FOLDER=CLASS...]`, how evaluation folders are named among a model's classes."""
    pairs = [item.split("=", 1) for item in text.split(",") if item.strip()]
    if not pairs or any(len(pair) != 2 or not pair[0].strip() or not pair[1].strip() for pair in pairs):
        raise argparse.ArgumentTypeError(f"expects FOLDER=CLASS[,FOLDER=CLASS...], got {one_line(repr(text), 60)}")
    return {folder.strip(): name.strip() for folder, name in pairs}


def add_force(parser: argparse.ArgumentParser, output: str, kind: str) -> None:
    """The `--force` flag of a writer: replace an existing `output` that is not of the kind the command writes."""
    parser.add_argument(
        "--force",
        action="store_true",
        help=f"replace an existing {output} that is not {kind} (an input or a run's own file never is)",
    )


def add_malloc(parser: argparse.ArgumentParser) -> None:
    """The `--malloc` flag of a command that runs models (the CLI tunes glibc's malloc unless it says `system`)."""
    parser.add_argument(
        "--malloc",
        choices=MALLOC_MODES,
        default=MALLOC_MODES[0],
        help="tuned (default): glibc's malloc keeps freed memory for reuse, which saves page faults on large "
        "CPU batches (resident memory then does not shrink after a peak); system: leave it alone",
    )


def _bounds(low: float | None, high: float | None, low_open: bool = False, high_open: bool = False) -> str:
    if low is not None and high is not None:
        return f"within {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    return f"{'<' if high_open else '<='} {high:g}"


def yaml_mapping(text: str) -> dict:
    """An argparse type: a YAML mapping, such as `--model-kwargs '{depths: [1, 1, 1, 1]}'`."""
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        value = None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expects a YAML mapping, got {one_line(repr(text), 60)}")
    return value
