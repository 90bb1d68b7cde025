"""Data names: `--data` takes a folder, the name of a dataset the toolkit writes itself on first use, or the name of
classification data read from elsewhere than a folder.

- `pathfinder:SIZE-LENGTH[:TRAIN[/VAL]]`: Pathfinder classification (`mambaout.data.pathfinder`) as an ImageFolder
  tree, `train/{apart,joined}/` and `val/{apart,joined}/` (label 0 `apart`: the markers sit on different snakes;
  1 `joined`), e.g. `pathfinder:32-14`.
- `pathfinder-seg:SIZE-LENGTH[:TRAIN[/VAL]]`: Pathfinder-segmentation in ADE20K's layout, `images/{training,
  validation}/*.png`, `annotations/...` with labels 0 background and distractors, 1 a target snake that does not
  join the markers, 2 the one that does, and `classes.txt`; label 0 is a class (no zero-label reduction).

- `wds:LOCATION`: WebDataset shards, local or http(s), with an `_info.json` beside them (`mambaout.data.shards`).
- `hfds:PATH`: a Hugging Face dataset saved to disk, or parquet files (`mambaout.data.hfds`).

The last two are read by `mambaout train` and `mambaout eval` (`source_splits`, `source_eval_set`) and refused by
the commands that need a folder.

SIZE is 32, 64 or 128, LENGTH the target snakes' paddles (6, 9 or 14 in LRA). Every size has 20,000 training and
2,000 validation images unless TRAIN (and VAL) say otherwise. Training image i is `make_sample(SIZE, LENGTH, i)` and
validation image i `make_sample(SIZE, LENGTH, 10**9 + i)`: the splits never share a sample, and a smaller set is the
start of a larger one. Each tree is written once to `<cache>/pathfinder-v1-...` (or `pathfinder-seg-v1-...`) through
the one tree writer of the embedded datasets (`write_tree_once`) and reused.
"""

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image

from mambaout.data.digits import write_tree_once
from mambaout.data.folder import ImageFiles
from mambaout.data.hfds import eval_hf, hf_splits
from mambaout.data.pathfinder import PathfinderConfig, make_samples
from mambaout.data.shards import ShardDataset, eval_shards, shard_splits
from mambaout.errors import UserError
from mambaout.weights.download import is_url

__all__ = [
    "CLASS_NAMES",
    "SEGMENT_CLASSES",
    "DataName",
    "SourceName",
    "data_label",
    "named_inputs",
    "parse_data_name",
    "parse_source_name",
    "resolve_data",
    "source_eval_set",
    "source_splits",
]

TRAIN_SIZE, VAL_SIZE = 20_000, 2_000
VAL_SEED = 10**9
CLASS_NAMES = ("apart", "joined")  # sorted, so that ImageFolder's index is the label
SEGMENT_CLASSES = ("background", "target_apart", "target_joined")
Kind = Literal["classification", "segmentation", "detection"]
_NAME = re.compile(r"(pathfinder|pathfinder-seg):(\d+)-(\d+)(?::(\d+)(?:/(\d+))?)?")
_FORM = "pathfinder[-seg]:SIZE-LENGTH[:TRAIN[/VAL]], e.g. pathfinder:32-14 or pathfinder-seg:32-6:4000/1000"


@dataclass(frozen=True)
class DataName:
    """A parsed data name; `kind` is the task its tree serves."""

    kind: Kind
    size: int
    contour_length: int
    train: int = TRAIN_SIZE
    val: int = VAL_SIZE

    @property
    def folder(self) -> str:
        prefix = "pathfinder" if self.kind == "classification" else "pathfinder-seg"
        return f"{prefix}-v1-{self.size}-{self.contour_length}-{self.train}-{self.val}"

    def tree(self, root: str | os.PathLike | None = None) -> Path:
        """The tree, written on first use (a minute for 22,000 images at 32²) under `root` (default the cache)."""
        write = _write_classification if self.kind == "classification" else _write_segmentation
        provenance = (
            f"mambaout.data.pathfinder.make_sample({self.size}, {self.contour_length}, seed): train seeds "
            f"0..{self.train - 1}, val seeds {VAL_SEED}..{VAL_SEED + self.val - 1}"
        )
        return write_tree_once(self.folder, root, lambda tree: write(tree, self), provenance)


def parse_data_name(data: str | os.PathLike | None) -> DataName | None:
    """The data name `data` spells, or None for a folder (anything not starting with `pathfinder`).

    Raises:
        UserError: `data` starts like a name but is not a valid one.
    """
    if data is None or not isinstance(data, str) or not data.startswith(("pathfinder:", "pathfinder-seg:")):
        return None
    match = _NAME.fullmatch(data)
    if not match:
        raise UserError(f"--data {data}: not a data name; the form is {_FORM}")
    prefix, size, length, train, val = match.groups()
    name = DataName(
        "classification" if prefix == "pathfinder" else "segmentation",
        int(size),
        int(length),
        int(train) if train else TRAIN_SIZE,
        int(val) if val else VAL_SIZE,
    )
    try:
        PathfinderConfig.for_size(name.size, name.contour_length)
    except ValueError as e:
        raise UserError(f"--data {data}: {e}") from None
    if name.train < 1 or name.val < 1:
        raise UserError(f"--data {data}: TRAIN and VAL must be at least 1")
    return name


@dataclass(frozen=True)
class SourceName:
    """`wds:LOCATION` or `hfds:PATH`: classification data that is no folder tree.

    Attributes:
        scheme: "wds" or "hfds".
        location: What follows the scheme.
        data: The name as given.
    """

    scheme: Literal["wds", "hfds"]
    location: str
    data: str

    @property
    def folder(self) -> str:
        """Where the data is: a shard pattern's folder or URL (where its `_info.json` is), else the location."""
        head, _, tail = self.location.rstrip("/").rpartition("/")
        if self.scheme == "wds" and ("{" in tail or tail.endswith(".tar")):
            return head or "."
        return self.location

    @property
    def validation(self) -> str:
        """The name that evaluation reads the validation split of (a shard pattern names training shards)."""
        return f"{self.scheme}:{self.folder}"

    @property
    def local(self) -> Path | None:
        """The local folder or file it reads (nothing may be written inside), None for a URL."""
        return None if is_url(self.folder) else Path(self.folder).expanduser()


def parse_source_name(data: str | os.PathLike | None) -> SourceName | None:
    """The `wds:` or `hfds:` name `data` spells, or None."""
    if not isinstance(data, str) or not data.startswith(("wds:", "hfds:")):
        return None
    scheme, location = data.split(":", 1)
    return SourceName(scheme, location, data)  # type: ignore[arg-type]


def source_splits(
    name: SourceName, seed: int = 0, rank: int = 0, world_size: int = 1, workers: int = 0
) -> tuple[ShardDataset | ImageFiles, ShardDataset | ImageFiles]:
    """The training and validation sets of a `wds:`/`hfds:` name, each with `classes`, `root`, `transform`, `status`
    and `new_unreadable()`; shards are split over `world_size` processes × `workers` loader workers by themselves.

    Raises:
        UserError: Data that cannot be read (see `mambaout.data.shards.shard_splits`, `mambaout.data.hfds.hf_splits`).
    """
    if name.scheme == "wds":
        return shard_splits(name.location, name.data, seed, rank, world_size, workers)
    return hf_splits(name.location, name.data)


def source_eval_set(name: SourceName, rank: int = 0, world_size: int = 1) -> ShardDataset | ImageFiles:
    """The evaluation set of a `wds:`/`hfds:` name (its val split, or the shards a pattern names), as
    `source_splits`'s, with `relabel(labels)` to match a model's outputs by class name.

    Raises:
        UserError: As `source_splits`.
    """
    if name.scheme == "wds":
        return eval_shards(name.location, name.data, rank, world_size)
    return eval_hf(name.location, name.data)


def resolve_data(data: str | os.PathLike | None, kind: Kind, default: Callable[[], Path]) -> Path:
    """The dataset root `--data` names: a data name's tree (written on first use), a folder, or `default()`.

    Args:
        data: `--data` as given (None: the task's embedded default).
        kind: The task reading it; a name of another task's data is refused.
        default: Writes (or finds) the embedded default.

    Raises:
        UserError: A bad data name, one for another task, or a `wds:`/`hfds:` name (no folder: `source_splits`).
    """
    if data is None or data == "":
        return default()
    if parse_source_name(data) is not None:
        raise UserError(
            f"--data {data}: {str(data).split(':', 1)[0]}: data is read by `mambaout train` and `mambaout eval` "
            "only; this command needs a folder"
        )
    name = parse_data_name(data)
    return Path(data).expanduser() if name is None else _tree_for(name, str(data), kind)


def _tree_for(name: DataName, data: str, kind: Kind) -> Path:
    if name.kind != kind:
        other = "pathfinder" if name.kind == "segmentation" else "pathfinder-seg"
        wanted = {"classification": "mambaout train", "segmentation": "mambaout segment"}[name.kind]
        raise UserError(
            f"--data {data} is {name.kind} data (for `{wanted}`); {kind} "
            + ("has no data name" if kind == "detection" else f"takes {other}:{data.split(':', 1)[1]}")
        )
    return name.tree()


def named_inputs(paths: list[str], kind: Kind) -> list[str]:
    """`predict`'s inputs with each data name replaced by its validation images' folder (the tree written first)."""
    out = []
    for path in paths:
        name = parse_data_name(path)
        if name is None:
            out.append(path)
            continue
        root = _tree_for(name, path, kind)
        out.append(str(root / "val" if kind == "classification" else root / "images" / "validation"))
    return out


def data_label(data: str | os.PathLike) -> str:
    """A file-name-safe label of `--data` for run folders: `pathfinder-32-14-20000-2000`, the folder's name, or
    `wds-<folder>` / `hfds-<folder>` for the folder (or URL path) the data is in."""
    source = parse_source_name(data)
    if source is not None:
        place = source.local.resolve().name if source.local else source.folder.rstrip("/").rsplit("/", 1)[-1]
        return f"{source.scheme}-" + re.sub(r"[^\w.-]+", "-", place).strip("-.")
    name = parse_data_name(data)
    return Path(data).expanduser().resolve().name if name is None else name.folder.replace("-v1", "")


def _write_classification(tree: Path, name: DataName) -> None:
    for split, count, seed in (("train", name.train, 0), ("val", name.val, VAL_SEED)):
        folders = [tree / split / c for c in CLASS_NAMES]
        for folder in folders:
            folder.mkdir(parents=True)
        for i, sample in enumerate(make_samples(name.size, name.contour_length, count, seed)):
            Image.fromarray(sample.image).save(folders[sample.label] / f"{i:06d}.png")


def _write_segmentation(tree: Path, name: DataName) -> None:
    for split, count, seed in (("training", name.train, 0), ("validation", name.val, VAL_SEED)):
        images, labels = tree / "images" / split, tree / "annotations" / split
        images.mkdir(parents=True)
        labels.mkdir(parents=True)
        for i, sample in enumerate(make_samples(name.size, name.contour_length, count, seed)):
            Image.fromarray(sample.image).save(images / f"pf_{i:06d}.png")
            Image.fromarray(sample.mask).save(labels / f"pf_{i:06d}.png")
    (tree / "classes.txt").write_text("".join(f"{c}\n" for c in SEGMENT_CLASSES))
