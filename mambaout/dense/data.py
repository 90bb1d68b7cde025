"""Dense-prediction datasets that survive bad input: COCO-format instances and ADE20K-style semantic labels.

Both keep the classification datasets' contract (`mambaout.data.ImageFiles`): an unreadable image is found as it is
first read, recorded in shared memory, reported once, and replaced by the next readable sample in training (left out
of the metrics in evaluation). Bad annotations are found when the dataset is built, before any training, skipped,
counted by reason and reported once (`problems`, `problem_report`): every field pycocotools would misread
(`mambaout.dense.annotations`), boxes of zero area or out of the image, unknown category ids, images whose file is
missing, images without a label map. A label map whose size differs from its image, or one holding labels past the
classes, is an `AnnotationError` naming both files: the data is wrong, not one sample. Two images (or label maps) of
one name but different extensions are a `UserError`: which label map belongs to which image is unknown.

Samples are `torchvision.tv_tensors` (`Image`, `BoundingBoxes`, `Mask`), so the `torchvision.transforms.v2`
pipelines of `mambaout.dense.transforms` keep boxes, instance masks and label maps consistent with their image.
"""

import os
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as coco_mask
from torchvision import tv_tensors

from mambaout.data import ImageFiles, TransformFailed
from mambaout.data.images import has_image_extension
from mambaout.dense.annotations import read_coco
from mambaout.errors import UserError, describe

__all__ = [
    "IGNORE_INDEX",
    "AdeSegmentation",
    "AnnotationError",
    "CocoDetection",
    "ade_split",
    "coco_split",
    "encode_mask",
]

IGNORE_INDEX = 255  # label of pixels left out of the loss and the metrics (ADE20K's "other" after reduction)
_BOX_TOLERANCE = 1.0  # pixels a box may pass the image border by (rounding in the annotation tools); clipped
_SPLITS = {"train": ("train2017", "training"), "val": ("val2017", "validation")}


class AnnotationError(TransformFailed):
    """A sample's annotation contradicts its image (sizes, label values); the message names both files."""


def coco_split(root: Path, split: str) -> tuple[Path, Path]:
    """COCO's image folder and annotation file of `split` ("train" or "val") under `root`."""
    name = _SPLITS[split][0]
    return root / name, root / "annotations" / f"instances_{name}.json"


def ade_split(root: Path, split: str) -> tuple[Path, Path]:
    """ADE20K's image and annotation folders of `split` ("train" or "val") under `root`."""
    name = _SPLITS[split][1]
    return root / "images" / name, root / "annotations" / name


class _Problems:
    """Skipped input by reason, with a few examples each, for the once-only report."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = defaultdict(int)
        self.examples: dict[str, list[str]] = defaultdict(list)

    def add(self, reason: str, example: str) -> None:
        self.counts[reason] += 1
        if len(self.examples[reason]) < 3:
            self.examples[reason].append(example)

    def __bool__(self) -> bool:
        return bool(self.counts)

    def total(self) -> int:
        return sum(self.counts.values())

    def summary(self) -> str:
        """`2 zero-area boxes (annotation 5, annotation 9); 1 unknown category id (...)`."""
        return "; ".join(f"{n} {reason} ({', '.join(self.examples[reason])})" for reason, n in self.counts.items())


class _Samples(ImageFiles):
    """`ImageFiles` whose samples carry an annotation: subclasses give `_target(index, image)`.

    A training set (`substitute`) replaces an unreadable image by the next readable sample; an evaluation set
    returns that sample with `target["valid"] = False`, which evaluation leaves out.
    """

    problems: _Problems
    source: Path

    def __init__(self, samples: list[tuple[str, int]], transform: Callable | None, substitute: bool, name: str):
        super().__init__(samples, None, substitute, name=name)
        self.pipeline = transform

    def problem_report(self) -> str:
        """The one warning line of what was skipped: `skipped 3 items of <source>: 2 boxes of zero area (...); ...`."""
        return f"skipped {self.problems.total()} items of {self.source}: {self.problems.summary()}"

    def __getitem__(self, index: int) -> tuple[Any, Any]:
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            image = self._read(i)
            if image is None:
                continue
            sample = self._transformed_pair(*self._target(i, image), i)
            if offset and not self.substitute:
                sample[1]["valid"] = False  # an evaluation set borrows the image only to keep the batch's shape
            return sample
        raise self._lost()

    def _target(self, index: int, image: Image.Image) -> tuple[Any, dict[str, Any]]:
        raise NotImplementedError

    def _transformed_pair(self, image: Any, target: dict[str, Any], index: int) -> tuple[Any, dict[str, Any]]:
        if self.pipeline is None:
            return image, target
        # a Compose's steps run one by one (as Compose runs them), so that a failure can name its step
        for step in getattr(self.pipeline, "transforms", None) or [self.pipeline]:
            try:
                image, target = step(image, target)
            except AnnotationError:
                raise
            except Exception as e:
                name = type(step).__name__
                raise TransformFailed(f"transform {name} failed on {self.samples[index][0]}: {describe(e, 300)}") from e
        return image, target


class CocoDetection(_Samples):
    """One split of a COCO-format instance dataset: an image folder and a JSON of boxes and polygon / RLE masks.

    Args:
        images: The folder `file_name`s are relative to.
        annotations: The instances JSON.
        transform: A `transforms.v2` pipeline on (image, target).
        train: Leave out crowd annotations and images without any usable annotation (torchvision's and mmdet's
            training rule), and substitute unreadable images; else keep every image (evaluation).
        masks: Require and return instance masks (Mask R-CNN); without, segmentations are not read.
        categories: The category ids in label order (the training split's, for its validation split); default the
            JSON's, sorted by id. Labels are 1..K (0 is the background).

    Attributes:
        coco: pycocotools' index of the JSON (the ground truth of `COCOeval`).
        category_ids: COCO category id of labels 1..K.
        class_names: Their names.
        image_ids: COCO image id of each sample.
        problems: What was skipped, by reason (`mambaout.dense.annotations` checks every entry).
        root: The image folder.
        source: The JSON (what `problem_report` names).

    Raises:
        UserError: The JSON is missing, not JSON or not COCO's format, or no image is usable.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        transform: Callable | None = None,
        train: bool = True,
        masks: bool = True,
        categories: list[int] | None = None,
    ):
        self.root, self.annotation_file = Path(images).expanduser(), Path(annotations).expanduser()
        self.source, self.masks, self.problems = self.annotation_file, masks, _Problems()
        if not self.annotation_file.is_file():
            raise UserError(f"no annotation file {self.annotation_file} (COCO's annotations/instances_<split>.json)")
        if not self.root.is_dir():
            raise UserError(f"no image folder {self.root} for {self.annotation_file}")
        self.coco = read_coco(self.annotation_file, masks, self.problems.add)
        names = {c["id"]: str(c.get("name", c["id"])) for c in self.coco.loadCats(self.coco.getCatIds())}
        self.category_ids = list(categories) if categories is not None else sorted(names)
        self.class_names = [names.get(c, str(c)) for c in self.category_ids]
        label_of = {c: i + 1 for i, c in enumerate(self.category_ids)}
        samples, self.image_ids, self.targets = [], [], []
        for image_id in sorted(self.coco.getImgIds()):
            info = self.coco.imgs[image_id]
            path = self.root / info["file_name"]  # a relative path without `..`: inside the folder
            if not path.is_file():
                self.problems.add("images whose file is missing", str(path))
                continue
            anns = self._usable(self.coco.imgToAnns.get(image_id, []), info, label_of, train)
            if train and not anns:
                continue
            samples.append((str(path), len(samples)))
            self.image_ids.append(image_id)
            self.targets.append(anns)
        if not samples:
            raise UserError(f"no usable image in {self.annotation_file}: {self.problems.summary() or 'no images'}")
        super().__init__(samples, transform, substitute=train, name=str(self.root))

    def _usable(
        self, anns: list[dict[str, Any]], info: dict[str, Any], label_of: dict[int, int], train: bool
    ) -> list[dict[str, Any]]:
        """The annotations of one image that training can use, each box clipped into the image.

        Every field is already of its type (`read_coco`); what is checked here is what they mean for training.
        """
        width, height = info["width"], info["height"]
        kept = []
        for ann in anns:
            where = f"annotation {ann['id']}"
            if ann["iscrowd"]:
                continue  # crowd regions are no instances: COCOeval reads them from the JSON as regions to ignore
            if ann["category_id"] not in label_of:
                self.problems.add("annotations of unknown category ids", f"{where}: {ann['category_id']}")
                continue
            x, y, w, h = (float(v) for v in ann["bbox"])
            if not (w > 0 and h > 0):
                self.problems.add("boxes of zero area", where)
                continue
            t = _BOX_TOLERANCE
            if x < -t or y < -t or x + w > width + t or y + h > height + t:
                self.problems.add("boxes out of their image", f"{where}: {[x, y, w, h]} in {width}×{height}")
                continue
            x1, y1 = max(x, 0.0), max(y, 0.0)
            box = [x1, y1, min(x + w, width), min(y + h, height)]
            kept.append({"box": box, "label": label_of[ann["category_id"]], "ann": ann})
        return kept

    def _target(self, index: int, image: Image.Image) -> tuple[Any, dict[str, Any]]:
        info = self.coco.imgs[self.image_ids[index]]
        if image.size != (info["width"], info["height"]):
            raise AnnotationError(
                f"{self.samples[index][0]} is {image.width}×{image.height} pixels but {self.annotation_file} gives "
                f"image {self.image_ids[index]} as {info['width']}×{info['height']}: fix the annotation or the file"
            )
        anns = self.targets[index]
        size = (image.height, image.width)
        boxes = torch.tensor([a["box"] for a in anns], dtype=torch.float32).reshape(-1, 4)
        target: dict[str, Any] = {
            "boxes": tv_tensors.BoundingBoxes(boxes, format="XYXY", canvas_size=size),
            "labels": torch.tensor([a["label"] for a in anns], dtype=torch.int64),
            "image_id": self.image_ids[index],
            "valid": True,
        }
        if self.masks:
            masks = np.stack([self.coco.annToMask(a["ann"]) for a in anns]) if anns else np.zeros((0, *size), "u1")
            target["masks"] = tv_tensors.Mask(torch.from_numpy(masks))
        return tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)), target  # [H,W,3] -> [3,H,W]


def encode_mask(mask: np.ndarray) -> dict[str, Any]:
    """A binary `[H, W]` mask as COCO's compressed RLE, with `counts` as text (JSON-ready)."""
    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": list(rle["size"]), "counts": rle["counts"].decode("ascii")}


class AdeSegmentation(_Samples):
    """One split of an ADE20K-style semantic dataset: `images/<split>/*.jpg` with `annotations/<split>/*.png`.

    Args:
        images: The image folder.
        annotations: The label-map folder; a map is matched to its image by file stem.
        num_classes: Classes after the zero-label reduction (ADE20K: 150).
        transform: A `transforms.v2` pipeline on (image, target) with `target["mask"]` the label map.
        train: Substitute unreadable images (training); else mark them invalid (evaluation).
        reduce_zero_label: Label 0 is "other" and becomes `IGNORE_INDEX`; labels 1..K become 0..K-1 (ADE20K's rule).

    Attributes:
        problems: Images without a label map, label maps without an image.
        root: The image folder.
        source: The image folder (what `problem_report` names).

    Raises:
        UserError: A folder is missing, two files of a folder share a name but for the extension, or no image has a
            label map.
    """

    def __init__(
        self,
        images: str | os.PathLike,
        annotations: str | os.PathLike,
        num_classes: int,
        transform: Callable | None = None,
        train: bool = True,
        reduce_zero_label: bool = True,
    ):
        self.root, self.label_root = Path(images).expanduser(), Path(annotations).expanduser()
        self.source = self.root
        for folder in (self.root, self.label_root):
            if not folder.is_dir():
                raise UserError(f"no folder {folder} (ADE20K's images/<split>/ and annotations/<split>/)")
        self.num_classes, self.reduce_zero_label = num_classes, reduce_zero_label
        images_by_stem = _by_stem(self.root, lambda p: has_image_extension(p.name))
        labels_by_stem = _by_stem(self.label_root, lambda p: p.suffix.lower() == ".png")
        self.problems = _Problems()
        for stem in sorted(set(images_by_stem) - set(labels_by_stem)):
            self.problems.add("images without a label map", str(images_by_stem[stem]))
        for stem in sorted(set(labels_by_stem) - set(images_by_stem)):
            self.problems.add("label maps without an image", str(labels_by_stem[stem]))
        stems = sorted(set(images_by_stem) & set(labels_by_stem))
        if not stems:
            raise UserError(f"no image in {self.root} has a label map of the same name in {self.label_root}")
        self.labels = [labels_by_stem[s] for s in stems]
        super().__init__([(str(images_by_stem[s]), i) for i, s in enumerate(stems)], transform, train, str(self.root))

    def _target(self, index: int, image: Image.Image) -> tuple[Any, dict[str, Any]]:
        path = self.labels[index]
        try:
            with Image.open(path) as label_image:
                label_image.load()
                labels = np.asarray(label_image)
        except (OSError, ValueError) as e:
            raise AnnotationError(f"label map {path} cannot be read ({describe(e)})") from None
        if labels.ndim != 2 or labels.shape != (image.height, image.width):
            shape = "×".join(map(str, labels.shape[1::-1])) if labels.ndim >= 2 else str(labels.shape)
            raise AnnotationError(
                f"label map {path} is {shape} but its image {self.samples[index][0]} is {image.width}×{image.height}"
                " pixels: they must be the same size (one label per pixel)"
            )
        labels = labels.astype(np.int64)
        if self.reduce_zero_label:
            labels = np.where(labels == 0, IGNORE_INDEX + 1, labels) - 1
        past = labels[(labels >= self.num_classes) & (labels != IGNORE_INDEX)]
        if past.size:
            rule = " after reducing label 0" if self.reduce_zero_label else ""
            raise AnnotationError(
                f"label map {path} (for {self.samples[index][0]}) holds label {int(past.max())}{rule}, but there are "
                f"{self.num_classes} classes: check --num-classes and --reduce-zero-label"
            )
        target = {"mask": tv_tensors.Mask(torch.from_numpy(labels)), "valid": True}
        return tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1)), target  # [H,W,3] -> [3,H,W]


def _by_stem(folder: Path, keep: Callable[[Path], bool]) -> dict[str, Path]:
    """The files of `folder` that `keep` takes, by name without extension (how a label map finds its image).

    Raises:
        UserError: Two of them share that name (`img0.jpg` and `img0.png`): which one a label map belongs to is unknown.
    """
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if not path.is_file() or path.name.startswith(".") or not keep(path):
            continue
        if path.stem in found:
            raise UserError(
                f"{found[path.stem]} and {path} share the name {path.stem!r}: images and label maps are paired by "
                "name, so rename or remove one of them"
            )
        found[path.stem] = path
    return found
