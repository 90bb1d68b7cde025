"""Evaluation and prediction with a trained detector or segmenter: from a run's checkpoint to metrics, PNG
overlays and JSON.

Detection predictions are written in COCO's results format (`image_id`, `category_id`, `bbox` as x, y, w, h,
`score`, `segmentation` as RLE), with `file_name` added and `image_id` the image's position in the input list;
the overlays draw each box with its class and score and each instance mask. Segmentation predictions are a label
map per image (PNG, class index per pixel) and the class map blended on the photo, with a JSON of each class's share.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, PngImagePlugin
from torch import nn
from torch.utils.data import DataLoader
from torchvision import tv_tensors
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from mambaout.data import ShardSampler, load_image, resolve_data
from mambaout.data.images import UnreadableImage
from mambaout.dense.tasks import Detection, build_detector, build_segmenter, coco_results
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
    "write_json",
]

_PALETTE_SEED = 7


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


def validation_loader(dense: DenseModel, data: str | None, env: DistEnv, batch_size: int, workers: int) -> tuple:
    """(dataset, loader) of the validation split of `data` (default: the run's own), a shard per rank."""
    runner_task = dense.task(dense.config if data is None else _with_data(dense.config, data), env)
    kind = "detection" if dense.task is Detection else "segmentation"
    root = resolve_data(runner_task.config.data, kind, lambda: _default_root(dense.task))
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


def _default_root(task: type[Task]) -> Path:
    from mambaout.dense.examples import coins_coco, ihc_ade

    return coins_coco() if task is Detection else ihc_ade()


def _palette(count: int) -> list[tuple[int, int, int]]:
    rng = np.random.default_rng(_PALETTE_SEED)
    return [tuple(int(c) for c in rng.integers(40, 256, 3)) for _ in range(count)]


def _save_png(pixels: torch.Tensor | np.ndarray, path: Path) -> None:
    """`[3, H, W]` uint8 tensor or `[H, W]` array as a PNG, atomically, marked as ours."""
    array = pixels.permute(1, 2, 0).numpy() if isinstance(pixels, torch.Tensor) else pixels  # [3,H,W] -> [H,W,3]
    meta = PngImagePlugin.PngInfo()
    meta.add_text("Software", PNG_SOFTWARE)  # tells our images from a user's photos (`check_output`)
    with atomic_write(path) as f:
        Image.fromarray(array).save(f, format="PNG", pnginfo=meta)


def _read(path: Path) -> tuple[Image.Image | None, str | None]:
    try:
        return load_image(path), None
    except UnreadableImage as e:
        return None, e.reason


@torch.no_grad()
def predict_detections(
    dense: DenseModel, files: list[Path], overlays: dict[Path, Path], score_threshold: float, amp_dtype: Any = None
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Detect objects in `files`, draw them into `overlays[file]`, return COCO results and the unreadable files.

    Overlays show the detections scoring at least `score_threshold`; the results hold all of them (as COCO's).
    """
    device = next(dense.model.parameters()).device
    colors = _palette(len(dense.class_names) + 1)
    results, unreadable = [], []
    for image_id, path in enumerate(files):
        image, reason = _read(path)
        if image is None:
            unreadable.append((str(path), reason))
            continue
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # [H,W,3] -> [3,H,W]
        with autocast(device, amp_dtype):
            output = dense.model([pixels.to(device).float() / 255])[0]
        output = {k: v.float().cpu() if v.is_floating_point() else v.cpu() for k, v in output.items()}
        for result in coco_results(output, image_id, dense.category_ids or list(range(1, len(dense.class_names) + 1))):
            results.append({**result, "file_name": str(path)})
        shown = output["scores"] >= score_threshold
        canvas = pixels.as_subclass(torch.Tensor)
        labels = output["labels"][shown].tolist()
        if "masks" in output and shown.any():
            masks = output["masks"][shown, 0] > 0.5
            canvas = draw_segmentation_masks(canvas, masks, alpha=0.45, colors=[colors[k] for k in labels])
        if shown.any():
            names = [
                f"{dense.class_names[k - 1]} {s:.2f}"
                for k, s in zip(labels, output["scores"][shown].tolist(), strict=True)
            ]
            canvas = draw_bounding_boxes(canvas, output["boxes"][shown], names, [colors[k] for k in labels], width=2)
        _save_png(canvas, overlays[path])
    return results, unreadable


@torch.no_grad()
def predict_segmentation(
    dense: DenseModel,
    files: list[Path],
    overlays: dict[Path, Path],
    label_maps: dict[Path, Path],
    amp_dtype: Any = None,
) -> tuple[list[dict[str, Any]], list[tuple[str, str]]]:
    """Label every pixel of `files`: label maps (class index per pixel) and blended class maps, per-image shares."""
    device = next(dense.model.parameters()).device
    cfg = get_spec(dense.config.model).cfg
    pipeline = segmentation_transform(False, cfg.mean, cfg.std, dense.config.scale)
    colors = torch.tensor(_palette(len(dense.class_names)), dtype=torch.uint8)
    results, unreadable = [], []
    for path in files:
        image, reason = _read(path)
        if image is None:
            unreadable.append((str(path), reason))
            continue
        pixels = tv_tensors.Image(torch.from_numpy(np.array(image)).permute(2, 0, 1))  # [H,W,3] -> [3,H,W]
        normalized, _ = pipeline(pixels, {})
        with autocast(device, amp_dtype):
            scores = dense.model(normalized[None].to(device))["out"]
        scores = F.interpolate(scores.float(), size=pixels.shape[-2:], mode="bilinear", align_corners=False)
        labels = scores.argmax(1)[0].cpu()
        blended = (0.5 * pixels.float() + 0.5 * colors[labels].permute(2, 0, 1).float()).round().to(torch.uint8)
        _save_png(blended, overlays[path])
        _save_png(labels.to(torch.uint8).numpy(), label_maps[path])
        counts = torch.bincount(labels.flatten(), minlength=len(dense.class_names)).tolist()
        total = sum(counts)
        shares = {name: round(100 * c / total, 2) for name, c in zip(dense.class_names, counts, strict=True) if c}
        results.append(
            {"file_name": str(path), "height": pixels.shape[-2], "width": pixels.shape[-1],
             "label_map": str(label_maps[path]), "overlay": str(overlays[path]), "class_percent": shares}
        )  # fmt: skip
    return results, unreadable


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
