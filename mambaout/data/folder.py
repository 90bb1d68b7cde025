"""Datasets of image files that survive bad files: a list of files, and an ImageFolder (`ROOT/<class>/**/<image>`).

Unreadable files are found as they are first read, in the main process or a loader worker: one status byte per sample
in shared memory records them, so every worker skips them from then on and the main process reports each one once.
A training set substitutes the next readable sample (batches keep their size, distributed ranks stay in step); an
evaluation set returns the label -1 instead, which `evaluate` leaves out of every metric. With no readable file left
(the folder moved or deleted mid-run) a read raises `DataLost`, one line like every `DataFailed`.
"""

import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mambaout.data.images import UnreadableImage, load_image, scan_images
from mambaout.errors import UserError, describe

__all__ = [
    "DataFailed",
    "DataLost",
    "ImageFiles",
    "RobustImageFolder",
    "TransformFailed",
    "class_folders",
    "transformed",
]

_OK, _UNREADABLE = 0, 1


class ImageFiles(Dataset):
    """(path, label) samples decoded by `load_image`, with unreadable files skipped and recorded.

    Args:
        samples: (path, label) pairs.
        transform: Applied to each RGB PIL image.
        substitute: On an unreadable file return the next readable sample with its own label (training), rather
            than a readable image with label -1 (evaluation, prediction).
        name: What to call the collection in messages (its folder).

    Raises:
        UserError: No sample is readable.
    """

    def __init__(
        self,
        samples: Sequence[tuple[str, int]],
        transform: Callable | None = None,
        substitute: bool = True,
        name: str = "the given files",
    ):
        self.samples = list(samples)
        self.transform = transform
        self.substitute = substitute
        self.name = name
        # one status byte per sample in shared memory: loader workers (fork or spawn) write, the main process reads
        self.status = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()
        self._reported = torch.zeros(len(self.samples), dtype=torch.bool)
        self._require_one_readable()

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[Any, int]:
        image = self._read(index)
        if image is not None:
            return self._transformed(image, index), self.samples[index][1]
        n = len(self.samples)
        for offset in range(1, n):
            i = (index + offset) % n
            image = self._read(i)
            if image is not None:
                # an evaluation set only borrows the image for the batch's shape; label -1 keeps it out of the metrics
                return self._transformed(image, i), self.samples[i][1] if self.substitute else -1
        raise self._lost()

    def new_unreadable(self) -> list[tuple[str, str]]:
        """(path, reason) of the files found unreadable since the last call; call it in the main process.

        A distributed run merges `status` over its ranks first, so rank 0 can report every file once.
        """
        new = ((self.status != _OK) & ~self._reported).nonzero().flatten().tolist()
        self._reported[new] = True
        return [(self.samples[i][0], self._reason(i)) for i in new]

    def _require_one_readable(self) -> None:
        """Probe files in order until one decodes (one file when the data is fine); none is a `UserError`."""
        for i in range(len(self.samples)):
            if self._read(i) is not None:
                return
        if not self.samples:
            raise UserError(f"no image files in {self.name}")
        raise UserError(
            f"no readable image in {self.name}: all {len(self.samples)} files failed to decode, "
            f"e.g. {self.samples[0][0]} ({self._reason(0)})"
        )

    def _read(self, index: int) -> Image.Image | None:
        if self.status[index] != _OK:
            return None
        try:
            return self._load(index)
        except UnreadableImage:
            self.status[index] = _UNREADABLE
            return None

    def _load(self, index: int) -> Image.Image:
        """Sample `index`'s image, decoded (a subclass may read it from elsewhere than a file)."""
        return load_image(self.samples[index][0])

    def _lost(self) -> "DataLost":
        """The error of a dataset none of whose files reads any more (its folder moved, deleted or unmounted)."""
        return DataLost(
            f"every image in {self.name} became unreadable while in use (moved, deleted or unmounted?), e.g. "
            f"{self.samples[0][0]}: {self._reason(0)}"
        )

    def _reason(self, index: int) -> str:
        try:
            self._load(index)
        except UnreadableImage as e:
            return e.reason
        return "failed once, readable now"

    def _transformed(self, image: Image.Image, index: int) -> Any:
        return transformed(self.transform, image, self.samples[index][0])


def transformed(transform: Callable | None, image: Image.Image, name: str) -> Any:
    """`transform(image)` (`image` without one); a failure is a `TransformFailed` naming the sample and the step.

    Raises:
        TransformFailed: A step of `transform` raised on `image` (sample `name`).
    """
    if transform is None:
        return image
    # a Compose's steps run one by one (as Compose runs them), so that a failure can name its step
    for step in getattr(transform, "transforms", None) or [transform]:
        try:
            image = step(image)
        except Exception as e:
            raise TransformFailed(f"transform {type(step).__name__} failed on {name}: {describe(e, 300)}") from e
    return image


class DataFailed(UserError):
    """Data that failed while in use; the message names the file or folder.

    Raised in a DataLoader worker, it reaches the main process rebuilt from the worker's traceback text; the
    constructor keeps only the original one-line message then.
    """

    def __init__(self, message: str):
        marker = f"{type(self).__name__}: "
        if message.startswith("Caught ") and marker in message:
            message = message.rsplit(marker, 1)[1].strip()
        super().__init__(message)


class TransformFailed(DataFailed):
    """A transform raised on one sample; the message names the file and the transform."""


class DataLost(DataFailed):
    """Every file of a dataset became unreadable while in use: its folder was moved, deleted or unmounted."""


def class_folders(root: Path) -> list[str]:
    """The sorted class folder names under `root` (hidden ones left out); empty when `root` is no folder."""
    if not root.is_dir():
        return []
    return sorted(e.name for e in os.scandir(root) if e.is_dir() and not e.name.startswith("."))


class RobustImageFolder(ImageFiles):
    """torchvision's ImageFolder layout and labels, read by `ImageFiles`; symbolic links followed only where safe.

    Args:
        root: The folder holding one sub-folder per class (hidden folders are ignored).
        transform: Applied to each RGB PIL image.
        classes: Class names in label order (the training set's, for its validation set); default the sorted
            sub-folder names. A sub-folder not in the list is a `UserError`; a listed class may have no folder.
        substitute: See `ImageFiles`; True for training, False for evaluation.
        labels: The label of each class folder, instead of its position in `classes` (evaluation of a model whose
            outputs are matched to folders by name); a sub-folder not in it is a `UserError`.

    Attributes:
        classes: Class names in label order.
        empty_classes: Classes without any image file.
        ignored_files: Files skipped for not having an image extension (hidden files aside).
        skipped_links: (link, reason) of symbolic links not followed: broken, looping, or pointing out of their class
            folder into another part of `root` (see `scan_images`).

    Raises:
        UserError: `root` is missing, has no class folders or image files, has classes outside `classes`, or holds
            no readable image.
    """

    def __init__(
        self,
        root: str | os.PathLike,
        transform: Callable | None = None,
        classes: Sequence[str] | None = None,
        substitute: bool = True,
        labels: Mapping[str, int] | None = None,
    ):
        self.root = Path(root).expanduser()
        layout = f"expected {self.root}/<class>/<images>"
        if not self.root.is_dir():
            raise UserError(f"dataset folder {self.root} does not exist ({layout})")
        found = class_folders(self.root)
        if not found:
            raise UserError(f"no class folders in {self.root} ({layout})")
        self.classes = list(classes) if classes is not None else found
        label_of = dict(labels) if labels is not None else {name: i for i, name in enumerate(self.classes)}
        unknown = sorted(set(found) - set(label_of))
        if unknown:
            shown = ", ".join(unknown[:10]) + (" ..." if len(unknown) > 10 else "")
            raise UserError(
                f"{self.root} has classes the training set lacks: {shown}; the splits need the same classes"
            )
        self.ignored_files: list[str] = []
        self.skipped_links: list[tuple[str, str]] = []
        samples = []
        for name in found:
            scan = scan_images(self.root / name, fence=self.root)
            samples.extend((path, label_of[name]) for path in scan.files)
            self.ignored_files.extend(scan.ignored)
            self.skipped_links.extend(scan.skipped_links)
        if not samples:
            raise UserError(f"no image files in {self.root} ({layout}, e.g. .jpg or .png files)")
        self.empty_classes = sorted(name for name, label in label_of.items() if label not in {t for _, t in samples})
        super().__init__(samples, transform, substitute, name=str(self.root))
