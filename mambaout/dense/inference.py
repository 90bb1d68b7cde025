"""Evaluation and prediction with a trained detector or segmenter: from a run's checkpoint to metrics, PNG
overlays and JSON.

Detection predictions are written in COCO's results format (`image_id`, `category_id`, `bbox` as x, y, w, h,
`score`, `segmentation` as RLE), with `file_name` added and `image_id` the image's position in the input list;
the overlays draw each box with its class and score and each instance mask. Segmentation predictions are a
label map per image (PNG, class index per pixel: 8-bit, 16-bit past 256 classes) and the class map blended on the
photo, with a JSON of each class's share. Full-size work (masks, class scores, blending) is done box by box or a band
of rows at a time, so memory stays within a few copies of the image, whatever the count of detections or classes.
"""

import json
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from pycocotools import mask as coco_mask
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.models.detection.roi_heads import expand_boxes, expand_masks
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.utils import draw_bounding_boxes

from mambaout.data import ShardSampler, load_image, resolve_data
from mambaout.data.images import UnreadableImage
from mambaout.dense.examples import coins_coco, ihc_ade
from mambaout.dense.tasks import MASK_THRESHOLD, Detection, build_detector, build_segmenter, coco_results
from mambaout.dense.transforms import segmentation_transform
from mambaout.errors import UserError
from mambaout.fast.train_step import autocast
from mambaout.models import get_spec
from mambaout.outputs import PNG_SOFTWARE
from mambaout.train.checkpoint import read_checkpoint
from mambaout.train.config import build_config
from mambaout.train.distributed import DistEnv
from mambaout.train.task import Task
from mambaout.weights.io import atomic_write

__all__ = [
    "DenseModel",
    "load_dense_model",
    "predict_detections",
    "predict_segmentation",
    "validation_loader",
    "validation_root",
    "write_json",
]

_PALETTE_SEED = 7
_BAND_ELEMENTS = 1 << 22  # floats per band of full-size work (16 MiB): memory stays bounded whatever the image size
_Crop = tuple[torch.Tensor, int, int]  # a mask within its box: `[h, w]` bool, its left and top column/row in the image


@dataclass
class DenseModel:
    """A trained dense model ready for inference.

    Attributes:
        task: Its task class (`Detection` or `Segmentation`).
        model: In eval mode, on its device.
        config: The run's resolved config.
        class_names: Name per class (labels 1..K for detection, 0..K-1 for segmentation).
        category_ids: COCO category id per class (detection).
        source: The checkpoint.
    """

    task: type[Task]
    model: nn.Module
    config: Any
    class_names: list[str]
    category_ids: list[int]
    source: str


def load_dense_model(
    checkpoint: str, task: type[Task], device: torch.device, prefer_ema: bool = False, config: dict | None = None
) -> DenseModel:
    """The model of a `mambaout detect|segment train` checkpoint.

    Args:
        checkpoint: `best.pth` or `last.pth` of a run.
        task: `Detection` or `Segmentation`: the checkpoint must be of that task.
        device: Where to put the model.
        prefer_ema: Use the checkpoint's EMA weights.
        config: Settings to change from the run's (e.g. `min_size` for evaluation at another size).

    Raises:
        UserError: Unreadable file, not a run checkpoint, a run of another task, or no EMA weights asked for.
    """
    saved = read_checkpoint(checkpoint)
    kind = saved.get("task", "classification")
    if kind != task.name:
        command = {
            "classification": "mambaout eval",
            "detection": "mambaout detect",
            "segmentation": "mambaout segment",
        }
        command = command.get(kind, "its own command")
        raise UserError(f"{checkpoint} is a {kind} checkpoint, not a {task.name} one: use it with `{command}`")
    resolved = build_config(saved["config"], config or {}, cls=task.config_class)
    model = build_detector(resolved) if task is Detection else build_segmenter(resolved)
    weights = saved.get("ema") if prefer_ema else saved["model"]
    if weights is None:
        raise UserError(f"{checkpoint} holds no EMA weights (the run was trained without --ema): drop --ema")
    model.load_state_dict(weights)
    return DenseModel(
        task,
        model.to(device).eval(),
        resolved,
        list(saved["class_names"]),
        list(saved.get("category_ids") or []),
        str(checkpoint),
    )


def validation_root(dense: DenseModel, data: str | None) -> Path:
    """The dataset root `validation_loader` reads: `data` (a folder or data name), else the run's own."""
    config = dense.config if data is None else _with_data(dense.config, data)
    kind = "detection" if dense.task is Detection else "segmentation"
    return resolve_data(config.data, kind, lambda: coins_coco() if dense.task is Detection else ihc_ade())


def validation_loader(dense: DenseModel, data: str | None, env: DistEnv, batch_size: int, workers: int) -> tuple:
    """(dataset, loader) of the validation split of `data` (default: the run's own), a shard per rank."""
    runner_task = dense.task(dense.config if data is None else _with_data(dense.config, data), env)
    root = validation_root(dense, data)
    if dense.task is Detection:
        dataset = runner_task.val_dataset(root, dense.category_ids)
        if dataset.class_names != dense.class_names:
            raise UserError(f"the categories of {dataset.annotation_file} differ from the model's: {dense.source}")
    else:
        dataset = runner_task.val_dataset(root, len(dense.class_names))
        batch_size = 1
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=ShardSampler(dataset, env.world_size, env.rank),
        num_workers=workers,
        collate_fn=dense.task.collate_fn,
    )
    return dataset, loader


def _with_data(config: Any, data: str) -> Any:
    return build_config(config.to_dict(), {"data": data}, cls=type(config))


def _palette(count: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(_PALETTE_SEED)
    return [tuple(int(c) for c in rng.integers(40, 256, 3)) for _ in range(count)]


def _save_png(pixels: torch.Tensor | np.ndarray, path: Path) -> None:
    """`[3, H, W]` uint8 tensor, `[H, W, 3]` uint8 or `[H, W]` uint8/uint16 array as a PNG (16-bit grey for uint16),
    atomically, marked as ours.

    The folder is made with the first file, so a command whose every input is skipped leaves nothing behind.
    """
    array = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else pixels  # [3,H,W] -> [H,W,3]
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Software", PNG_SOFTWARE)  # tells our images from a user's photos (`check_output`)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--output: cannot create {path.parent}: {e.strerror or e}") from None
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=meta)


def _readable(files: list[Path], skipped: list[tuple[str, str]]) -> Iterator[tuple[int, Path, torch.Tensor]]:
    """(position, path, `[3, H, W]` uint8 pixels) of each file `load_image` reads; the others go to `skipped` with
    their reason (classification predict's rule: empty, not an image, a FIFO or device, over PIL's pixel limit).

    Raises:
        UserError: Once all are tried, every file was skipped (here or by the caller): nothing was written then.
    """
    for position, path in enumerate(files):
        try:
            pixels = np.array(load_image(path))  # [H, W, 3]
        except UnreadableImage as e:
            skipped.append((str(path), e.reason))
            continue
        yield position, path, torch.from_numpy(pixels).permute(2, 0, 1)  # [H,W,3] -> [3,H,W]
    if len(skipped) == len(files):
        shown = "; ".join(f"{path} ({reason})" for path, reason in skipped[:3])
        raise UserError(f"no image to predict among the {len(files)} inputs: {shown}")


def _too_thin(transform: GeneralizedRCNNTransform, height: int, width: int) -> str | None:
    """Why torchvision's detection transform cannot take a `height` x `width` image, or None.

    It scales the short side to `min_size` unless the long side would pass `max_size`: past an aspect ratio of
    `max_size`:1 the short side rounds down to no pixel at all (torchvision's own arithmetic, repeated here).
    """
    scale = min(transform.min_size[-1] / min(height, width), transform.max_size / max(height, width))
    if math.floor(min(height, width) * scale) >= 1:
        return None
    return (
        f"too thin for the detector: {width}x{height} pixels, fitted into its {transform.max_size}-pixel size, is "
        "under one pixel across"
    )


def _detect(model: nn.Module, image: torch.Tensor) -> dict[str, torch.Tensor]:
    """torchvision's `GeneralizedRCNN.forward` (eval mode) on one `[3, H, W]` image in [0, 1], less its last step:
    boxes are in the image's pixels, but masks stay `[N, 1, M, M]` box-local probabilities (M = 28) instead of being
    pasted into N full-size float images (100 detections on a 12-megapixel photo would take 4.8 GB).
    """
    images, _ = model.transform([image])
    features = model.backbone(images.tensors)
    proposals, _ = model.rpn(images, features)
    detections = model.roi_heads(features, proposals, images.image_sizes)[0][0]
    detections["boxes"] = resize_boxes(detections["boxes"], images.image_sizes[0], image.shape[-2:])
    return detections


def _mask_crops(masks: torch.Tensor, boxes: torch.Tensor, height: int, width: int) -> list[_Crop]:
    """Each `[1, M, M]` mask of `masks` resized into its box and thresholded, as a crop of the image.

    torchvision's `paste_masks_in_image` step by step (a 1-pixel border, the box grown to match, bilinear resize),
    less the full-size canvas: the crop is what it would write into an all-zero `height` x `width` image.
    """
    masks, scale = expand_masks(masks, padding=1)
    crops = []
    for mask, (x0, y0, x1, y1) in zip(masks[:, 0], expand_boxes(boxes, scale).to(torch.int64).tolist(), strict=True):
        size = (max(y1 - y0 + 1, 1), max(x1 - x0 + 1, 1))
        resized = F.interpolate(mask[None, None], size=size, mode="bilinear", align_corners=False)[0, 0]
        left, top = max(x0, 0), max(y0, 0)
        right, bottom = max(min(x1 + 1, width), left), max(min(y1 + 1, height), top)
        crops.append((resized[top - y0 : bottom - y0, left - x0 : right - x0] > MASK_THRESHOLD, left, top))
    return crops


def _rle(crop: np.ndarray, left: int, top: int, height: int, width: int) -> dict[str, Any]:
    """COCO's compressed RLE of a `height` x `width` mask that is all zero outside `crop` (`[h, w]` bool, placed at
    `left`, `top`), computed from the crop alone: what `encode_mask` gives for the full mask, without making it.

    COCO's runs go down the columns (column-major), zeros first. Between one column's part of the crop and the next
    lie `height - h` zero rows; each such gap is a single 0 here, its run lengthened afterwards.
    """
    h, w = crop.shape
    if not crop.any():
        counts = [height * width]
    else:
        gap = height - h
        column = np.zeros((w, h + (gap > 0)), np.uint8)  # [w, h (+1)]: a crop column, then the gap after it
        column[:, :h] = crop.T  # [h,w] -> [w,h]: column-major order
        flat = column.ravel()[: w * column.shape[1] - (gap > 0)]  # the last gap is counted with the trailing zeros
        starts = np.concatenate([[0], np.flatnonzero(flat[1:] != flat[:-1]) + 1])
        runs = np.diff(np.append(starts, flat.size))
        if gap > 0:  # each gap stands for `gap` zeros, not one
            gaps = np.arange(h, flat.size, h + 1)
            np.add.at(runs, np.searchsorted(starts, gaps, side="right") - 1, gap - 1)
        leading, trailing = left * height + top, (height - top - h) + (width - left - w) * height
        runs = list(runs.tolist())
        if flat[0]:
            runs.insert(0, leading)  # COCO's first run counts zeros, maybe none
        else:
            runs[0] += leading
        if flat[-1]:
            runs.append(trailing)
        else:
            runs[-1] += trailing
        counts = [r for i, r in enumerate(runs) if r or i == 0]
    rle = coco_mask.frPyObjects({"size": [height, width], "counts": counts}, height, width)
    return {"size": [height, width], "counts": rle["counts"].decode("ascii")}


def _draw_masks(
    pixels: torch.Tensor, crops: list[_Crop], colors: list[tuple[int, int, int]], alpha: float
) -> torch.Tensor:
    """torchvision's `draw_segmentation_masks` on `[3, H, W]` uint8 `pixels` for box-local masks: each mask's colour
    where it lies (the last one wins, black where two overlap), blended with the image by `alpha`.

    The blend runs a band of rows at a time, so the float copies stay a few MiB whatever the image's size.
    """
    height, width = pixels.shape[-2:]
    painted = pixels.clone()
    cover = torch.zeros(height, width, dtype=torch.uint8)  # masks per pixel, counted up to 2
    for (crop, left, top), color in zip(crops, colors, strict=True):
        h, w = crop.shape
        painted[:, top : top + h, left : left + w][:, crop] = torch.tensor(color, dtype=torch.uint8)[:, None]
        region = cover[top : top + h, left : left + w]
        region += (crop & (region < 2)).to(torch.uint8)
    painted[:, cover > 1] = 0
    out = torch.empty_like(pixels)
    rows = max(1, _BAND_ELEMENTS // (3 * width))
    for top in range(0, height, rows):
        band = slice(top, top + rows)
        out[:, band] = (pixels[:, band] * (1 - alpha) + painted[:, band] * alpha).to(torch.uint8)
    return out


@torch.no_grad()
def predict_detections(
    dense: DenseModel, files: list[Path], overlays: dict[Path, Path], score_threshold: float, amp_dtype: Any = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Detect objects in `files`, draw them into `overlays[file]`, return COCO results and the skipped files.

    Overlays show the detections scoring at least `score_threshold`; the results hold all of them (as COCO's), each
    with its image's `file_name`. Memory stays within a few copies of one image whatever the number of
    detections: masks are kept, encoded and drawn within their boxes.

    Returns:
        The results, and (path, reason) of each file skipped: unreadable, or too thin for the detector.

    Raises:
        UserError: Every file was skipped.
    """
    device = next(dense.model.parameters()).device
    colors = _palette(len(dense.class_names) + 1)
    category_ids = dense.category_ids or list(range(1, len(dense.class_names) + 1))
    results, skipped = [], []
    for image_id, path, pixels in _readable(files, skipped):
        height, width = pixels.shape[-2:]
        reason = _too_thin(dense.model.transform, height, width)
        if reason:
            skipped.append((str(path), reason))
            continue
        with autocast(device, amp_dtype):
            output = _detect(dense.model, pixels.to(device, torch.float32).div_(255))
        output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
        masks = output.pop("masks", None)
        crops = [] if masks is None else _mask_crops(masks, output["boxes"], height, width)
        rows = coco_results(output, image_id, category_ids)
        for i, result in enumerate(rows):
            if crops:
                result["segmentation"] = _rle(crops[i][0].numpy(), crops[i][1], crops[i][2], height, width)
            results.append({**result, "file_name": str(path)})
        shown = (output["scores"] >= score_threshold).nonzero().flatten().tolist()
        labels = output["labels"].tolist()
        canvas = pixels
        if crops and shown:
            canvas = _draw_masks(canvas, [crops[i] for i in shown], [colors[labels[i]] for i in shown], alpha=0.45)
        if shown:
            names = [f"{dense.class_names[labels[i] - 1]} {output['scores'][i]:.2f}" for i in shown]
            boxes = output["boxes"][shown]
            canvas = draw_bounding_boxes(canvas, boxes, names, [colors[labels[i]] for i in shown], width=2)
        _save_png(canvas, overlays[path])
    return results, skipped


def _label_bands(scores: torch.Tensor, height: int, width: int) -> Iterator[tuple[int, torch.Tensor]]:
    """Class per pixel of `[K, h, w]` scores bilinearly resized to `height` x `width`, a band of rows at a time:
    (first row, `[rows, width]` labels).

    The labels of `F.interpolate(scores[None], (height, width), mode="bilinear")[0].argmax(0)` (the resized scores
    agree to float rounding), which would hold K full-size float maps at once (150 classes on a 12-megapixel photo:
    7.2 GB): each band reads only the score rows it needs, resizes them along the width, then mixes each pair of rows
    with the weights PyTorch's bilinear resize gives them.
    """
    classes, h, w = scores.shape
    # PyTorch's source row for output row y (align_corners=False): scale * (y + 0.5) - 0.5, at least 0, in float32
    scale = torch.tensor(h, dtype=torch.float32) / height
    source = (scale * (torch.arange(height, dtype=torch.float32) + 0.5) - 0.5).clamp_(min=0)
    upper = source.floor().to(torch.int64).clamp_(max=h - 1)
    lower = torch.where(upper < h - 1, upper + 1, upper)
    weight = (source - upper).clamp_(0, 1)
    rows = max(1, _BAND_ELEMENTS // (classes * width))
    for top in range(0, height, rows):
        band = slice(top, min(top + rows, height))
        first, last = int(upper[band][0]), int(lower[band][-1])
        needed = scores[:, first : last + 1]  # [K, k, w]
        wide = F.interpolate(needed.reshape(1, -1, w), size=width, mode="linear").view(classes, -1, width)
        a = (1 - weight[band])[:, None] * wide[:, upper[band] - first]  # [K, rows, width]
        b = weight[band][:, None] * wide[:, lower[band] - first]
        yield top, (a + b).max(0).indices  # argmax, faster across few classes (ties: the first, as argmax)


@torch.no_grad()
def predict_segmentation(
    dense: DenseModel,
    files: list[Path],
    overlays: dict[Path, Path],
    label_maps: dict[Path, Path],
    amp_dtype: Any = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Label every pixel of `files`: label maps (class index per pixel) and blended class maps, per-image shares.

    A label map is an 8-bit PNG, or a 16-bit one (mode "I;16") for more than 256 classes. Memory stays within a few
    copies of one image whatever the number of classes: the full-size class scores are made a band at a time.

    Returns:
        The results, and (path, reason) of each unreadable file.

    Raises:
        UserError: More classes than a 16-bit PNG holds, or no file could be read.
    """
    classes = len(dense.class_names)
    if classes > 65536:
        raise UserError(f"{dense.source} has {classes} classes: a label map PNG holds at most 65536")
    label_dtype = np.uint8 if classes <= 256 else np.uint16
    device = next(dense.model.parameters()).device
    cfg = get_spec(dense.config.model).cfg
    pipeline = segmentation_transform(False, cfg.mean, cfg.std, dense.config.scale)
    colors = torch.tensor(_palette(classes), dtype=torch.uint8)
    results, skipped = [], []
    for _, path, pixels in _readable(files, skipped):
        height, width = pixels.shape[-2:]
        normalized, _ = pipeline(tv_tensors.Image(pixels), {})
        with autocast(device, amp_dtype):
            scores = dense.model(normalized[None].to(device))["out"]
        labels = np.empty((height, width), label_dtype)
        blended = np.empty((height, width, 3), np.uint8)
        counts = torch.zeros(classes, dtype=torch.int64)
        for top, band in _label_bands(scores[0].float().cpu(), height, width):
            rows = slice(top, top + band.shape[0])
            painted = colors[band].permute(2, 0, 1).float()  # [rows,W,3] -> [3,rows,W]
            mixed = (0.5 * pixels[:, rows].float() + 0.5 * painted).round().to(torch.uint8)
            blended[rows] = mixed.permute(1, 2, 0).numpy()  # [3,rows,W] -> [rows,W,3]
            labels[rows] = band.numpy()
            counts += torch.bincount(band.flatten(), minlength=classes)
        _save_png(blended, overlays[path])
        _save_png(labels, label_maps[path])
        counted = zip(dense.class_names, counts.tolist(), strict=True)
        shares = {name: round(100 * c / (height * width), 2) for name, c in counted if c}
        results.append(
            {"file_name": str(path), "height": height, "width": width,
             "label_map": str(label_maps[path]), "overlay": str(overlays[path]), "class_percent": shares}
        )  # fmt: skip
    return results, skipped


def write_json(data: Any, path: Path) -> None:
    """`data` as indented JSON, atomically (NaN written as null: JSON has no NaN)."""
    text = json.dumps(_no_nan(data), indent=2) + "\n"
    with atomic_write(path) as f:
        f.write(text.encode("utf-8", "surrogateescape"))


def _no_nan(value: Any) -> Any:
    if isinstance(value, float) and value != value:
        return None
    if isinstance(value, dict):
        return {k: _no_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_no_nan(v) for v in value]
    return value
