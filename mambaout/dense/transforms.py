"""The `torchvision.transforms.v2` pipelines of the dense tasks: boxes, instance masks and label maps move with
their image.

Detection (mmdetection's Mask R-CNN 1×): training flips half the images and resizes them to `min_size` on the short
side, at most `max_size` on the long one; boxes that the resize leaves under a pixel are dropped with their masks.
Evaluation and prediction pass the image as it is: torchvision's detector resizes by the same rule and maps its
boxes and masks back to the image's own pixels, where the annotations are.

Segmentation (mmsegmentation's ADE20K pipeline): training rescales the image to fit `scale` (2048×512) times a
random factor in `ratio_range` (0.5-2.0), crops `crop_size` (512) re-drawn until no class covers more than
`cat_max_ratio` of it, flips, distorts brightness, contrast, saturation and hue, and normalizes; the label map is
resized by nearest neighbour and padded with the ignore index. Evaluation rescales the image alone to fit `scale`
(scores are resized back to the label map).
"""

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torchvision import tv_tensors
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from mambaout.dense.data import IGNORE_INDEX

__all__ = ["Rescale", "SegmentationCrop", "detection_transform", "segmentation_transform"]

_TO_FLOAT = {tv_tensors.Image: torch.float32, "others": None}
_CROP_TRIES = 10


def detection_transform(train: bool, min_size: int, max_size: int, hflip: float = 0.5) -> v2.Compose:
    """(image, target) -> (float image `[3, H, W]` in 0..1, target with boxes, labels and masks to match)."""
    if not train:
        return v2.Compose([v2.ToDtype(_TO_FLOAT, scale=True)])
    return v2.Compose(
        [
            v2.RandomHorizontalFlip(hflip),
            v2.Resize(min_size, max_size=max_size, antialias=True),
            v2.SanitizeBoundingBoxes(min_size=1.0),
            v2.ToDtype(_TO_FLOAT, scale=True),
        ]
    )


class Rescale:
    """Resize the image (and its label map, unless `image_only`) to fit `scale` (long, short) times a factor drawn
    from `ratio_range`, keeping the aspect ratio (mmseg's `RandomResize(keep_ratio=True)`)."""

    def __init__(self, scale: Sequence[int], ratio_range: Sequence[float] = (1.0, 1.0), image_only: bool = False):
        self.scale, self.ratio_range, self.image_only = tuple(scale), tuple(ratio_range), image_only

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        low, high = self.ratio_range
        ratio = low + (high - low) * torch.rand(()).item() if high > low else low
        height, width = image.shape[-2:]
        factor = min(max(self.scale) * ratio / max(height, width), min(self.scale) * ratio / min(height, width))
        size = [max(1, round(height * factor)), max(1, round(width * factor))]
        image = F.resize(image, size, antialias=True)
        if not self.image_only:
            target = {**target, "mask": F.resize(target["mask"], size)}  # a Mask resizes by nearest neighbour
        return image, target


class SegmentationCrop:
    """Pad to at least `size` (image with 0, labels with the ignore index), then crop `size` at random, re-drawn up
    to 10 times while one class covers more than `cat_max_ratio` of the labelled pixels (mmseg's `RandomCrop`)."""

    def __init__(self, size: int, cat_max_ratio: float = 1.0):
        self.size, self.cat_max_ratio = size, cat_max_ratio

    def __call__(self, image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
        labels = target["mask"]
        height, width = image.shape[-2:]
        pad = [0, 0, max(0, self.size - width), max(0, self.size - height)]  # left, top, right, bottom
        if any(pad):
            image = F.pad(image, pad, fill=0)
            labels = F.pad(labels, pad, fill=IGNORE_INDEX)
            height, width = image.shape[-2:]
        for _ in range(_CROP_TRIES):
            top = int(torch.randint(0, height - self.size + 1, ()))
            left = int(torch.randint(0, width - self.size + 1, ()))
            crop = labels[..., top : top + self.size, left : left + self.size]
            if self.cat_max_ratio >= 1 or _largest_share(crop) < self.cat_max_ratio:
                break
        image = F.crop(image, top, left, self.size, self.size)
        return image, {**target, "mask": F.crop(labels, top, left, self.size, self.size)}


def _largest_share(labels: torch.Tensor) -> float:
    """The share of the labelled pixels that the commonest class covers (0 with fewer than two classes)."""
    _, counts = np.unique(labels[labels != IGNORE_INDEX].numpy(), return_counts=True)
    return counts.max() / counts.sum() if len(counts) > 1 else 0.0


def segmentation_transform(
    train: bool,
    mean: Sequence[float],
    std: Sequence[float],
    scale: Sequence[int] = (2048, 512),
    ratio_range: Sequence[float] = (0.5, 2.0),
    crop_size: int = 512,
    cat_max_ratio: float = 0.75,
    hflip: float = 0.5,
    photometric: bool = True,
) -> v2.Compose:
    """(image, {"mask": labels}) -> (normalized float image `[3, h, w]`, labels `[h, w]` to match in training;
    at their own size in evaluation)."""
    normalize = [v2.ToDtype(_TO_FLOAT, scale=True), v2.Normalize(list(mean), list(std))]
    if not train:
        return v2.Compose([Rescale(scale, image_only=True), *normalize])
    # mmseg's PhotoMetricDistortion: brightness ±32 of 255, contrast and saturation ×0.5-1.5, hue ±18°
    color = [v2.ColorJitter(brightness=32 / 255, contrast=0.5, saturation=0.5, hue=18 / 360)] if photometric else []
    steps = [Rescale(scale, ratio_range), SegmentationCrop(crop_size, cat_max_ratio), v2.RandomHorizontalFlip(hflip)]
    return v2.Compose([*steps, *color, *normalize])
