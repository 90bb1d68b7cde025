"""Helpers for the dense tests: small synthetic COCO and ADE20K-style datasets, and fast training settings
(`flags(DETECT, epochs=2)` gives their command-line flags)."""

import json
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as coco_mask
from train_fixtures import settings_flags

flags = settings_flags  # `flags(DETECT, epochs="2")`
TINY_MODEL = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32]}"
COLORS = ((230, 40, 40), (40, 230, 40))
# a detector of ~60k parameters on 64-pixel images: a step takes a few tens of milliseconds
DETECT = {
    "model": "mambaout_femto",
    "model_kwargs": TINY_MODEL,
    "min_size": "64",
    "max_size": "96",
    "fpn_channels": "16",
    "box_head_dim": "32",
    "rpn_batch_size": "64",
    "box_batch_size": "64",
    "batch_size": "2",
    "epochs": "3",
    "lr": "2e-3",
    "decay_milestones": ["100"],
    "warmup_iters": "0",
    "drop_path": "0",
    "hflip": "0",
    "workers": "0",
    "threads": "1",
    "log_interval": "1000",
}
SEGMENT = {
    "model": "mambaout_femto",
    "model_kwargs": TINY_MODEL,
    "crop_size": "32",
    "scale": ["32", "32"],
    "ratio_range": ["1", "1"],
    "head_channels": "16",
    "aux_channels": "8",
    "batch_size": "2",
    "iters": "12",
    "lr": "2e-3",
    "warmup_iters": "0",
    "drop_path": "0",
    "hflip": "0",
    "photometric": "false",
    "workers": "0",
    "threads": "1",
    "log_interval": "1000",
}


def _squares(rng: np.random.Generator, size: int) -> tuple[np.ndarray, list[tuple[int, list[int]]]]:
    """A noisy dark image with one or two coloured squares: (pixels, [(class 0/1, [x, y, w, h]), ...])."""
    pixels = np.clip(rng.normal(40, 10, (size, size, 3)), 0, 255)
    objects = []
    for k in range(int(rng.integers(1, 3))):
        side = int(rng.integers(size // 4, size // 2))
        x, y = int(rng.integers(0, size - side)), int(rng.integers(0, size - side))
        if any(x < ox + ow and ox < x + side and y < oy + oh and oy < y + side for _, (ox, oy, ow, oh) in objects):
            continue
        cls = (k + int(rng.integers(2))) % 2
        pixels[y : y + side, x : x + side] = COLORS[cls]
        objects.append((cls, [x, y, side, side]))
    return pixels.astype(np.uint8), objects


def make_coco(root: Path, train: int = 8, val: int = 2, size: int = 64, seed: int = 0) -> Path:
    """`root/{train2017,val2017}/*.png` and `root/annotations/instances_{train,val}2017.json`: squares of two
    categories (ids 3 "red" and 7 "green"), polygons in train, RLE masks in val."""
    rng = np.random.default_rng(seed)
    (root / "annotations").mkdir(parents=True, exist_ok=True)
    for split, count in (("train2017", train), ("val2017", val)):
        (root / split).mkdir(exist_ok=True)
        images, annotations = [], []
        for image_id in range(1, count + 1):
            pixels, objects = _squares(rng, size)
            Image.fromarray(pixels).save(root / split / f"{image_id:03d}.png")
            images.append({"id": image_id, "file_name": f"{image_id:03d}.png", "width": size, "height": size})
            for cls, (x, y, w, h) in objects:
                if split == "val2017":
                    mask = np.zeros((size, size), np.uint8)
                    mask[y : y + h, x : x + w] = 1
                    rle = coco_mask.encode(np.asfortranarray(mask))
                    segmentation = {"size": [size, size], "counts": rle["counts"].decode()}
                else:
                    segmentation = [[x, y, x + w, y, x + w, y + h, x, y + h]]
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": (3, 7)[cls],
                     "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0, "segmentation": segmentation}
                )  # fmt: skip
        categories = [{"id": 3, "name": "red"}, {"id": 7, "name": "green"}]
        dataset = {"images": images, "annotations": annotations, "categories": categories}
        (root / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))
    return root


def make_ade(root: Path, train: int = 8, val: int = 2, size: int = 32, seed: int = 0) -> Path:
    """`root/images/{training,validation}/*.jpg` with `root/annotations/.../*.png` label maps: 0 (ignored) at the
    border, 1 background, 2 and 3 the square's colour; and `root/classes.txt`."""
    rng = np.random.default_rng(seed)
    for split, count in (("training", train), ("validation", val)):
        (root / "images" / split).mkdir(parents=True, exist_ok=True)
        (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
        for i in range(count):
            pixels, objects = _squares(rng, size)
            labels = np.ones((size, size), np.uint8)
            for cls, (x, y, w, h) in objects:
                labels[y : y + h, x : x + w] = 2 + cls
            labels[0, :] = 0
            Image.fromarray(pixels).save(root / "images" / split / f"{i:03d}.jpg", quality=95)
            Image.fromarray(labels).save(root / "annotations" / split / f"{i:03d}.png")
    (root / "classes.txt").write_text("background\nred\ngreen\n")
    return root
