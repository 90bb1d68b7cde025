"""The embedded real-data defaults of the dense tasks: labels derived from scikit-image's bundled photos.

Nothing is downloaded and nothing binary is checked in: this module derives the labels once, on first use, with
scikit-image's own classical methods, and writes the datasets in the layouts the tasks read.

- `coins_coco()`: scikit-image's `coins` (a 303×384 photo of 24 Greek coins in four rows). Each coin is found as in
  scikit-image's region-based segmentation tutorial (Sobel elevation map, markers at the dark background and the
  bright coins, watershed, holes filled), one instance each, class "coin". The top three rows (18 coins) give the
  training images: 64 random 128×128 crops, flipped and turned by chance, with every visible part of a coin an
  instance (polygons); the bottom row (6 coins) is the validation image, as it is (RLE masks). COCO's layout.
- `ihc_ade()`: scikit-image's `immunohistochemistry` (a 512×512 IHC stain of colon tissue). Each pixel is labelled
  by colour deconvolution into haematoxylin and DAB (`skimage.color.rgb2hed`, Otsu thresholds): 1 lumen (unstained,
  bright), 2 stroma, 3 nuclei (haematoxylin), 4 DAB-stained epithelium; pixels on the border between two classes
  get 0 ("other", ignored), as ADE20K's. The left 384 columns give 48 random 128×128 training crops; the right 128
  columns, four 128×128 validation tiles. ADE20K's layout, with a `classes.txt`.

Both are written in a temporary folder and renamed into place (distributed ranks may race harmlessly).
"""

import json
import os
from pathlib import Path

import numpy as np
from PIL import Image

from mambaout.data.digits import write_tree_once
from mambaout.dense.data import encode_mask

__all__ = ["IHC_CLASSES", "coins_coco", "coins_instances", "ihc_ade", "ihc_labels"]

IHC_CLASSES = ("lumen", "stroma", "nuclei", "dab")
_COINS, _IHC = "coins-coco-v1", "ihc-ade-v1"
_PROVENANCE = "derived by mambaout.dense.examples from scikit-image's bundled photos"
_SEED = 0
_CROP = 128
_COINS_TRAIN_ROWS = 215  # the bottom row of coins starts below this line
_COINS_TRAIN_CROPS, _IHC_TRAIN_CROPS, _IHC_TRAIN_COLUMNS = 64, 48, 384
_MIN_VISIBLE = 30  # pixels of a coin a crop must show for it to count as an instance
_MIN_COIN = 200  # pixels of the smallest coin
_LUMEN_BRIGHTNESS = 232  # mean RGB of unstained background (the light stroma stays below)


def coins_instances() -> tuple[np.ndarray, np.ndarray]:
    """The coins photo `[303, 384]` uint8 and its instance map (0 background, 1..24 one coin each, by position)."""
    from scipy import ndimage
    from skimage import data, filters, measure, segmentation

    photo = data.coins()
    markers = np.zeros_like(photo, dtype=np.int32)
    markers[photo < 30], markers[photo > 150] = 1, 2
    coins = ndimage.binary_fill_holes(segmentation.watershed(filters.sobel(photo), markers) == 2)
    labels = measure.label(coins)
    sizes = np.bincount(labels.ravel())
    labels[sizes[labels] < _MIN_COIN] = 0  # specks of glare, not coins
    labels = measure.label(labels > 0)
    # number the coins row by row, left to right, so that the split by rows is stable
    centers = {r.label: r.centroid for r in measure.regionprops(labels)}
    order = sorted(centers, key=lambda k: (round(centers[k][0] / 75), centers[k][1]))
    ordered = np.zeros_like(labels)
    for new, old in enumerate(order, start=1):
        ordered[labels == old] = new
    return photo, ordered


def ihc_labels() -> tuple[np.ndarray, np.ndarray]:
    """The IHC photo `[512, 512, 3]` uint8 and its label map (0 other, 1..4 `IHC_CLASSES`)."""
    from skimage import color, data, filters, morphology

    photo = data.immunohistochemistry()
    hed = color.rgb2hed(photo)
    haematoxylin, dab = filters.gaussian(hed[..., 0], 1.5), filters.gaussian(hed[..., 2], 2.0)
    bright = photo.mean(axis=2) > _LUMEN_BRIGHTNESS
    stained = dab > filters.threshold_otsu(dab)
    nuclei = (haematoxylin > filters.threshold_otsu(haematoxylin)) & ~stained
    labels = np.full(photo.shape[:2], 2, dtype=np.uint8)  # stroma where nothing else holds
    labels[bright & ~stained] = 1
    labels[nuclei] = 3
    labels[stained & ~bright] = 4
    # a pixel whose 3×3 neighbourhood holds two classes is ambiguous: "other"
    around = np.ones((3, 3), bool)
    mixed = morphology.dilation(labels, around) != morphology.erosion(labels, around)
    labels[mixed] = 0
    return photo, labels


def _random_views(rng: np.random.Generator, height: int, width: int, count: int) -> list[tuple[int, int, int, bool]]:
    """(top, left, quarter turns, flip) of `count` random `_CROP`-sized views inside `height` × `width`."""
    return [
        (int(rng.integers(0, height - _CROP + 1)), int(rng.integers(0, width - _CROP + 1)), int(rng.integers(4)),
         bool(rng.integers(2)))
        for _ in range(count)
    ]  # fmt: skip


def _view(array: np.ndarray, top: int, left: int, turns: int, flip: bool) -> np.ndarray:
    crop = np.rot90(array[top : top + _CROP, left : left + _CROP], turns)
    return np.ascontiguousarray(crop[:, ::-1] if flip else crop)


def coins_coco(root: str | os.PathLike | None = None) -> Path:
    """The coins instance dataset in COCO's layout (`train2017/`, `val2017/`, `annotations/`), written on first use.

    Args:
        root: Parent folder; default `mambaout.data.cache_dir()`.
    """
    return write_tree_once(_COINS, root, _write_coins, _PROVENANCE)


def _write_coins(tree: Path) -> None:
    from skimage import measure

    photo, instances = coins_instances()
    rng = np.random.default_rng(_SEED)
    train = [_view(a, *v) for v in _random_views(rng, _COINS_TRAIN_ROWS, photo.shape[1], _COINS_TRAIN_CROPS)
             for a in (photo, instances)]  # fmt: skip
    splits = {
        "train2017": [(train[2 * i], train[2 * i + 1]) for i in range(_COINS_TRAIN_CROPS)],
        "val2017": [(photo[_COINS_TRAIN_ROWS:], instances[_COINS_TRAIN_ROWS:])],
    }
    (tree / "annotations").mkdir(parents=True)
    for split, views in splits.items():
        (tree / split).mkdir()
        images, annotations = [], []
        for image_id, (pixels, labels) in enumerate(views, start=1):
            name = f"{image_id:04d}.png"
            Image.fromarray(pixels).convert("RGB").save(tree / split / name)
            images.append({"id": image_id, "file_name": name, "height": pixels.shape[0], "width": pixels.shape[1]})
            for k in np.unique(labels[labels > 0]):
                mask = labels == k
                if mask.sum() < _MIN_VISIBLE:
                    continue
                ys, xs = np.nonzero(mask)
                x, y = float(xs.min()), float(ys.min())
                w, h = float(xs.max() + 1 - xs.min()), float(ys.max() + 1 - ys.min())
                if split == "val2017":
                    segmentation = encode_mask(mask)
                else:  # polygons, as most COCO annotations: each contour of the coin's visible part
                    padded = np.pad(mask, 1)
                    contours = measure.find_contours(padded.astype(float), 0.5)
                    segmentation = [
                        (np.fliplr(c) - 1).clip(0).round(1).ravel().tolist() for c in contours if len(c) >= 3
                    ]
                annotations.append(
                    {"id": len(annotations) + 1, "image_id": image_id, "category_id": 1, "bbox": [x, y, w, h],
                     "area": float(mask.sum()), "iscrowd": 0, "segmentation": segmentation}
                )  # fmt: skip
        dataset = {"images": images, "annotations": annotations, "categories": [{"id": 1, "name": "coin"}]}
        (tree / "annotations" / f"instances_{split}.json").write_text(json.dumps(dataset))


def ihc_ade(root: str | os.PathLike | None = None) -> Path:
    """The IHC semantic dataset in ADE20K's layout (`images/`, `annotations/`, `classes.txt`), written on first use.

    Args:
        root: Parent folder; default `mambaout.data.cache_dir()`.
    """
    return write_tree_once(_IHC, root, _write_ihc, _PROVENANCE)


def _write_ihc(tree: Path) -> None:
    photo, labels = ihc_labels()
    rng = np.random.default_rng(_SEED)
    views = _random_views(rng, photo.shape[0], _IHC_TRAIN_COLUMNS, _IHC_TRAIN_CROPS)
    splits = {
        "training": [(_view(photo, *v), _view(labels, *v)) for v in views],
        "validation": [
            (photo[t : t + _CROP, _IHC_TRAIN_COLUMNS:], labels[t : t + _CROP, _IHC_TRAIN_COLUMNS:])
            for t in range(0, photo.shape[0], _CROP)
        ],
    }
    for split, pairs in splits.items():
        (tree / "images" / split).mkdir(parents=True)
        (tree / "annotations" / split).mkdir(parents=True)
        for i, (pixels, label_map) in enumerate(pairs):
            Image.fromarray(pixels).save(tree / "images" / split / f"ihc_{i:04d}.jpg", quality=95)
            Image.fromarray(label_map).save(tree / "annotations" / split / f"ihc_{i:04d}.png")
    (tree / "classes.txt").write_text("".join(f"{name}\n" for name in IHC_CLASSES))
