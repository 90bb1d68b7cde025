"""Hugging Face datasets on disk (`--data hfds:PATH`): classification data read through the `datasets` package.

PATH is a folder written by `datasets.Dataset.save_to_disk` or `DatasetDict.save_to_disk`, a folder of parquet files,
or one parquet file. A parquet file's split is the first of train / validation / val / test that appears in its path
below PATH as a word (`train-00000-of-00004.parquet`, `data/validation-0.parquet`, `val/part-0.parquet`); parquet is
turned into `datasets`' Arrow files once, under `<mambaout cache>/hf-datasets`. Training reads the `train` split and
validates on `validation` (or `val`); evaluation reads `validation` (or `val`), or the one dataset a folder or file
holds.

The image column is the one of `datasets.Image` type (else one named image or img holding bytes), the label column
`label` or `cls`; a `ClassLabel` label column names the classes, plain integers make them `0`..`K-1` (K one more than
the largest training label). Images are decoded here, as files are (`mambaout.data.images.decode_image`), so a row
whose image does not decode or whose label is no class is skipped and counted as the folder datasets do
(`mambaout.data.folder.ImageFiles`).
"""

import importlib
import io
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

from PIL import Image

from mambaout.data.digits import cache_dir
from mambaout.data.folder import ImageFiles
from mambaout.data.images import UnreadableImage, decode_image, load_image
from mambaout.errors import UserError, one_line

__all__ = ["HFImages", "eval_hf", "hf_splits"]

LABEL_COLUMNS = ("label", "cls")
IMAGE_COLUMNS = ("image", "img")
VAL_SPLITS = ("validation", "val")
_SPLIT_WORDS = ("train", "validation", "val", "test")


def _datasets() -> ModuleType:
    try:
        return importlib.import_module("datasets")
    except ImportError:
        raise UserError("hfds: data needs the datasets package: pip install 'mambaout[data]'") from None


class HFImages(ImageFiles):
    """One split of a Hugging Face dataset as `ImageFiles`: rows decoded from the image column, bad ones skipped.

    Args:
        table: The split (a `datasets.Dataset`).
        split: Its name, for messages (`train[17]`).
        classes: Class names in label order.
        name: The data as given, for messages.
        substitute: See `ImageFiles`; True for training.

    Raises:
        UserError: No image or label column, or no row is usable.
    """

    def __init__(self, table: Any, split: str, classes: Sequence[str], name: str, substitute: bool):
        image, label = _image_column(table, name), _label_column(table, name)
        if isinstance(table.features[image], _datasets().Image):  # decoded here, so that a bad image is counted
            table = table.cast_column(image, _datasets().Image(decode=False))
        self.table, self.column, self.classes, self.root = table.select_columns([image]), image, list(classes), name
        labels = table.data.column(label).to_pylist()
        samples = [
            (f"{split}[{i}]", y if isinstance(y, int) and 0 <= y < len(self.classes) else -1)
            for i, y in enumerate(labels)
        ]
        super().__init__(samples, None, substitute, name=f"{name} ({split})")

    def relabel(self, labels: Mapping[str, int]) -> None:
        """Label each row `labels[class name]` instead (a model's outputs matched to classes by name)."""
        self.samples = [(row, labels[self.classes[y]] if y >= 0 else y) for row, y in self.samples]

    def _load(self, index: int) -> Image.Image:
        row, label = self.samples[index]
        if label < 0:
            raise UnreadableImage(row, f"its label is not a class (0..{len(self.classes) - 1})")
        value = self.table[index][self.column]
        data = value.get("bytes") if isinstance(value, dict) else value
        if isinstance(data, bytes):
            return decode_image(io.BytesIO(data), row)
        path = value.get("path") if isinstance(value, dict) else None
        if path:
            return load_image(path)
        raise UnreadableImage(row, "no image in the row")


def _image_column(table: Any, name: str) -> str:
    features = table.features
    typed = [c for c, f in features.items() if isinstance(f, _datasets().Image)]
    found = typed or [c for c in IMAGE_COLUMNS if c in features]
    if not found:
        raise UserError(f"--data {name}: no image column (of type datasets.Image, or named image): {_columns(table)}")
    return found[0]


def _label_column(table: Any, name: str) -> str:
    found = next((c for c in LABEL_COLUMNS if c in table.features), None)
    if found is None:
        raise UserError(f"--data {name}: no label column (label or cls): {_columns(table)}")
    return found


def _columns(table: Any) -> str:
    return one_line("it has " + ", ".join(table.features), 200)


def _classes(train: Any, name: str) -> list[str]:
    column = _label_column(train, name)
    feature = train.features[column]
    if isinstance(feature, _datasets().ClassLabel):
        return list(feature.names)
    labels = [y for y in train.data.column(column).to_pylist() if isinstance(y, int) and y >= 0]
    if not labels:
        raise UserError(f"--data {name}: the {column} column holds no class index")
    return [str(i) for i in range(max(labels) + 1)]


def _load(path: Path, data: str) -> dict[str, Any]:
    """The splits at `path` by name; a lone dataset (or parquet files of no split) is the split "rows"."""
    datasets = _datasets()
    if not path.exists():
        raise UserError(f"--data {data}: no such file or folder: {path}")
    if path.is_dir() and ((path / "dataset_dict.json").is_file() or (path / "state.json").is_file()):
        try:
            loaded = datasets.load_from_disk(str(path))
        except (OSError, ValueError, KeyError, TypeError, datasets.exceptions.DatasetsError) as e:
            reason = one_line(str(e), 200)
            raise UserError(f"--data {data}: {path} does not load as a saved dataset ({reason})") from None
        return dict(loaded) if isinstance(loaded, datasets.DatasetDict) else {"rows": loaded}
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or any(f.suffix != ".parquet" for f in files):
        raise UserError(
            f"--data {data}: {path} is neither a saved dataset (save_to_disk) nor parquet files (*.parquet)"
        )
    by_split: dict[str, list[str]] = {}
    for file in files:
        split = _split_of(file.relative_to(path) if path.is_dir() else Path(file.name))
        if split is None and path.is_dir():
            raise UserError(
                f"--data {data}: cannot tell the split of {file}: name it train-*.parquet or validation-*.parquet "
                "(or put it in train/ or validation/)"
            )
        by_split.setdefault(split or "rows", []).append(str(file))
    try:
        loaded = datasets.load_dataset("parquet", data_files=by_split, cache_dir=str(cache_dir() / "hf-datasets"))
    except (OSError, ValueError, TypeError, datasets.exceptions.DatasetsError) as e:  # pyarrow's: Value/OSError
        raise UserError(f"--data {data}: {path} does not read as parquet ({one_line(str(e), 200)})") from None
    return dict(loaded)


def _split_of(relative: Path) -> str | None:
    words = re.split(r"[/\\._-]", relative.as_posix().lower())
    word = next((w for w in words if w in _SPLIT_WORDS), None)
    return "validation" if word == "val" else word


def _pick(splits: dict[str, Any], wanted: Sequence[str], data: str) -> tuple[str, Any]:
    name = next((s for s in wanted if s in splits), None)
    if name is None:
        raise UserError(f"--data {data}: no {' or '.join(wanted)} split (it has {', '.join(splits)})")
    return name, splits[name]


def hf_splits(location: str, data: str) -> tuple[HFImages, HFImages]:
    """The training and validation splits `hfds:PATH` names (see the module).

    Raises:
        UserError: No datasets package, PATH is no saved dataset or parquet, a split or column is missing, or no row
            of a split is usable.
    """
    splits = _load(Path(os.path.expanduser(location)), data)
    _, train = _pick(splits, ("train",), data)
    val_name, val = _pick(splits, VAL_SPLITS, data)
    classes = _classes(train, data)
    return HFImages(train, "train", classes, data, True), HFImages(val, val_name, classes, data, False)


def eval_hf(location: str, data: str) -> HFImages:
    """The split `hfds:PATH` names for evaluation: validation (or val), or the one dataset it holds.

    Raises:
        UserError: As `hf_splits`.
    """
    splits = _load(Path(os.path.expanduser(location)), data)
    name, table = next(iter(splits.items())) if len(splits) == 1 else _pick(splits, VAL_SPLITS, data)
    return HFImages(table, name, _classes(table, data), data, False)
