"""Detection and segmentation as tasks of the one training engine (`mambaout.train.runner`).

Each supplies its data (COCO / ADE20K folders, the embedded defaults without --data), its model, the forward and
backward of one micro-batch and its validation metric; the loop, accumulation, DDP, AMP, EMA, clipping,
checkpoints, resume, signals, records and progress are the engine's. `evaluate_detection` and
`evaluate_segmentation` are also what `mambaout detect|segment eval` run.
"""

import abc
import contextlib
import dataclasses
import math
from collections import Counter
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from mambaout.data import parse_data_name, resolve_data
from mambaout.dense.config import DETECT_RECIPES, SEGMENT_RECIPES, DetectConfig, SegmentConfig
from mambaout.dense.data import IGNORE_INDEX, AdeSegmentation, CocoDetection, ade_split, coco_split, encode_mask
from mambaout.dense.detector import create_detector
from mambaout.dense.examples import coins_coco, ihc_ade
from mambaout.dense.metrics import ConfusionMatrix, coco_metrics
from mambaout.dense.segmenter import create_segmenter
from mambaout.dense.transforms import detection_transform, segmentation_transform
from mambaout.errors import UserError, one_line
from mambaout.fast.train_step import autocast
from mambaout.models import get_spec
from mambaout.models.settings import check_activation_memory
from mambaout.train.distributed import DistEnv
from mambaout.train.engine import TrainParts, backward, syncing
from mambaout.train.notices import warn
from mambaout.train.optim import fused_step_name
from mambaout.train.task import Task

__all__ = [
    "MASK_THRESHOLD",
    "Detection",
    "Segmentation",
    "build_detector",
    "build_segmenter",
    "coco_results",
    "evaluate_detection",
    "evaluate_segmentation",
    "read_class_names",
    "segmentation_loss",
]

_FROZEN = (
    "model", "model_kwargs", "num_classes", "opt", "opt_eps", "opt_betas", "momentum", "weight_decay", "batch_size",
    "accum_steps", "fused_optimizer",
)  # fmt: skip
MASK_THRESHOLD = 0.5  # torchvision's and mmdet's: a mask pixel belongs to the instance above this probability


def _to_device(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value


def _list_collate(batch: list[tuple[Any, Any]]) -> tuple[list[Any], list[Any]]:
    """Images of different sizes as lists (torchvision's detectors batch them themselves)."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)


@dataclasses.dataclass
class DetectionStep:
    """Detection's `ForwardBackward`: torchvision's loss dict on a list of images, summed."""

    def epoch_context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __call__(self, parts: TrainParts, batch: Any, last_micro: bool) -> tuple[float, int]:
        device = parts.env.device
        images = [image.to(device, non_blocking=True) for image in batch[0]]
        targets = [
            {k: _to_device(v, device) for k, v in t.items() if k in ("boxes", "labels", "masks")} for t in batch[1]
        ]
        with syncing(parts.model, last_micro):
            with autocast(device, parts.amp_dtype):
                loss = sum(parts.model(images, targets).values())
            backward(parts, loss / parts.accum_steps)
        return loss.item() * len(images), len(images)


def segmentation_loss(outputs: dict[str, torch.Tensor], labels: torch.Tensor, aux_weight: float) -> torch.Tensor:
    """Cross-entropy of the decode head plus `aux_weight` times the auxiliary head's, each the mean over every pixel
    (ignored ones count 0, as mmseg's default), so a batch's loss is the mean of its images' losses.

    Args:
        outputs: The segmenter's "out" (and "aux") scores `[B, K, H, W]`.
        labels: `[B, H, W]` class indices, `IGNORE_INDEX` for pixels left out.
    """
    loss = F.cross_entropy(outputs["out"].float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
    if "aux" in outputs and aux_weight:
        aux = F.cross_entropy(outputs["aux"].float(), labels, ignore_index=IGNORE_INDEX, reduction="none").mean()
        loss = loss + aux_weight * aux
    return loss


@dataclasses.dataclass
class SegmentationStep:
    """Segmentation's `ForwardBackward`: `segmentation_loss` on a batch of crops."""

    aux_weight: float

    def epoch_context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    def __call__(self, parts: TrainParts, batch: Any, last_micro: bool) -> tuple[float, int]:
        device = parts.env.device
        images, labels = batch[0].to(device, non_blocking=True), batch[1]["mask"].to(device, non_blocking=True)
        with syncing(parts.model, last_micro):
            with autocast(device, parts.amp_dtype):
                outputs = parts.model(images)
            loss = segmentation_loss(outputs, labels, self.aux_weight)
            backward(parts, loss / parts.accum_steps)
        return loss.item() * len(images), len(images)


def coco_results(output: dict[str, torch.Tensor], image_id: int, category_ids: list[int]) -> list[dict[str, Any]]:
    """One image's detections in COCO's results format (x, y, w, h boxes; RLE masks when the model gives masks)."""
    boxes = output["boxes"].float().cpu().clone()
    boxes[:, 2:] -= boxes[:, :2]  # x1, y1, x2, y2 -> x, y, w, h
    results = []
    masks = output.get("masks")
    rows = zip(boxes.tolist(), output["scores"].tolist(), output["labels"].tolist(), strict=True)
    for i, (box, score, label) in enumerate(rows):
        result = {
            "image_id": image_id,
            "category_id": category_ids[label - 1],
            "bbox": [round(v, 2) for v in box],
            "score": round(score, 5),
        }
        if masks is not None:
            result["segmentation"] = encode_mask((masks[i, 0] > MASK_THRESHOLD).cpu().numpy())
        results.append(result)
    return results


@torch.no_grad()
def evaluate_detection(
    model: nn.Module, loader: DataLoader, env: DistEnv, amp_dtype: torch.dtype | None, dataset: CocoDetection
) -> dict[str, float]:
    """COCO box (and mask) AP of `model` over `loader` (a shard of `dataset` per rank), equal on every rank.

    Images marked invalid (unreadable) are left out, of the ground truth too.
    """
    model.eval()
    results, image_ids, masks = [], [], False
    for images, targets in loader:
        keep = [i for i, t in enumerate(targets) if t["valid"]]
        if not keep:
            continue
        with autocast(env.device, amp_dtype):
            outputs = model([images[i].to(env.device) for i in keep])
        for i, output in zip(keep, outputs, strict=True):
            masks = masks or "masks" in output
            results += coco_results(output, targets[i]["image_id"], dataset.category_ids)
            image_ids.append(targets[i]["image_id"])
    gathered = env.gather((results, image_ids, masks))
    metrics = None
    if env.is_main:
        results = [r for part in gathered for r in part[0]]
        image_ids = [i for part in gathered for i in part[1]]
        iou_types = ("bbox", "segm") if any(part[2] for part in gathered) else ("bbox",)
        metrics = coco_metrics(dataset.coco, results, image_ids, iou_types)
        metrics["images"] = len(image_ids)
    return env.broadcast(metrics)


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module, loader: DataLoader, env: DistEnv, amp_dtype: torch.dtype | None, num_classes: int
) -> dict[str, Any]:
    """mIoU, mAcc, aAcc and per-class IoU/accuracy (percent) of `model` over `loader`, summed over all ranks.

    Scores are resized to each label map's own size before the arg-max (mmseg's whole-image evaluation); images
    marked invalid (unreadable) are left out.
    """
    model.eval()
    confusion = ConfusionMatrix(num_classes)
    images_counted = 0
    for images, target in loader:
        for image, labels, valid in zip(images, target["mask"], target["valid"].tolist(), strict=True):
            if not valid:
                continue
            with autocast(env.device, amp_dtype):
                scores = model(image[None].to(env.device))["out"]
            scores = F.interpolate(scores.float(), size=labels.shape[-2:], mode="bilinear", align_corners=False)
            confusion.update(scores.argmax(1)[0], labels)
            images_counted += 1
    env.all_reduce_(confusion.matrix)
    metrics = confusion.compute()
    metrics["images"] = int(env.all_reduce_(torch.tensor([images_counted], dtype=torch.float64)).item())
    return metrics


def read_class_names(root: Path, num_classes: int | None) -> list[str]:
    """An ADE-style dataset's class names: `root/classes.txt` (one per line), else `class_<i>` for `num_classes`.

    Raises:
        UserError: Neither is given, they disagree, or the listing names a class twice.
    """
    listing = root / "classes.txt"
    if listing.is_file():
        names = [line.strip() for line in listing.read_text(errors="replace").splitlines() if line.strip()]
        repeated = [name for name, count in Counter(names).items() if count > 1]
        if repeated:
            raise UserError(f"{listing} names the class {one_line(repeated[0], 80)!r} twice: give each class one line")
        if num_classes is not None and num_classes != len(names):
            raise UserError(f"--num-classes {num_classes} does not match the {len(names)} classes in {listing}")
        return names
    if num_classes is None:
        raise UserError(f"--num-classes is needed for {root} (150 for ADE20K), or a {listing} naming the classes")
    return [f"class_{i}" for i in range(num_classes)]


def build_detector(config: DetectConfig, pretrained: bool | str = False) -> nn.Module:
    """The detector a (resolved) detection config describes."""
    return create_detector(
        config.model,
        config.num_classes,
        config.kind,
        pretrained,
        drop_path_rate=config.drop_path,
        model_kwargs=config.model_kwargs,
        min_size=config.min_size,
        max_size=config.max_size,
        fpn_channels=config.fpn_channels,
        box_head_dim=config.box_head_dim,
        rpn_batch_size=config.rpn_batch_size,
        box_batch_size=config.box_batch_size,
    )


def build_segmenter(config: SegmentConfig, pretrained: bool | str = False) -> nn.Module:
    """The segmenter a (resolved) segmentation config describes."""
    return create_segmenter(
        config.model,
        config.num_classes,
        pretrained,
        drop_path_rate=config.drop_path,
        model_kwargs=config.model_kwargs,
        channels=config.head_channels,
        aux_channels=config.aux_channels or None,
        norm=config.head_norm,
        dropout=config.head_dropout,
    )


class _DenseTask(Task):
    """What detection and segmentation share: the backbone's memory check, warnings, the description."""

    def warn_about_data(self) -> None:
        for dataset in (self.train_set, self.val_set):
            if dataset.problems:
                warn(dataset.problem_report())

    def check_memory(self, parts: TrainParts) -> None:
        trunk = self._trunk(parts.module)
        check_activation_memory(trunk, self.config.batch_size, self._side(), self.env.device, training=True)

    @abc.abstractmethod
    def _trunk(self, model: nn.Module) -> nn.Module:
        """The MambaOut inside the model."""

    @abc.abstractmethod
    def _side(self) -> int:
        """The side of a square image with as many pixels as the largest training input."""

    def _describe_data(self) -> str:
        return (
            f"{len(self.class_names)} classes, {len(self.train_set)} train / {len(self.val_set)} val images from "
            f"{self.data_root}"
        )

    def _pretrained(self, pretrained: bool) -> bool | str:
        return self.config.pretrained if pretrained else False


class Detection(_DenseTask):
    """A COCO-format dataset, Mask R-CNN (or Faster R-CNN) with an FPN, COCO box and mask AP."""

    name = "detection"
    command = "mambaout detect train"
    config_class = DetectConfig
    recipes = DETECT_RECIPES
    frozen_on_resume = (*_FROZEN, "kind", "fpn_channels", "box_head_dim")
    metric = "bbox_ap"
    metric_label = "val box AP"
    default_data = "coins"
    collate_fn = staticmethod(_list_collate)
    config: DetectConfig
    train_set: CocoDetection
    val_set: CocoDetection

    @classmethod
    def default_recipe(cls, model: str, data: str | None) -> str | None:
        if not data:
            return "coins_cpu"
        name = f"mask_rcnn_{model.removeprefix('mambaout_')}_coco"
        return name if (DETECT_RECIPES / f"{name}.yaml").is_file() else None

    def build_data(self, checkpoint: dict[str, Any] | None) -> None:
        config = self.config
        root = resolve_data(config.data, "detection", coins_coco)
        train = CocoDetection(*coco_split(root, "train"), train=True, masks=config.kind == "mask_rcnn")
        train.pipeline = detection_transform(True, config.min_size, config.max_size, config.hflip)
        self.train_set, self.val_set, self.data_root = train, self.val_dataset(root, train.category_ids), root
        self.class_names, self.category_ids = train.class_names, train.category_ids
        if checkpoint is not None and (
            checkpoint.get("class_names") != self.class_names or checkpoint.get("category_ids") != self.category_ids
        ):
            raise UserError(f"the categories of {train.annotation_file} differ from those of the run being resumed")
        if config.num_classes is not None and config.num_classes != len(self.class_names):
            raise UserError(
                f"--num-classes {config.num_classes} does not match the {len(self.class_names)} categories of "
                f"{train.annotation_file}"
            )

    def val_dataset(self, root: Path, category_ids: list[int]) -> CocoDetection:
        """The validation split of COCO-format `root`, labelled by `category_ids` (the training split's)."""
        val = CocoDetection(*coco_split(root, "val"), train=False, masks=self.config.kind == "mask_rcnn",
                            categories=category_ids)  # fmt: skip
        val.pipeline = detection_transform(False, self.config.min_size, self.config.max_size)
        return val

    def build_model(self, pretrained: bool) -> nn.Module:
        config = self.config = dataclasses.replace(self.config, num_classes=len(self.class_names))
        model = build_detector(config, self._pretrained(pretrained))
        model.backbone.body.set_grad_checkpointing(config.grad_checkpointing)
        return model

    def forward_backward(self, module: nn.Module, amp_dtype: torch.dtype | None) -> DetectionStep:
        return DetectionStep()

    def _trunk(self, model: nn.Module) -> nn.Module:
        return model.backbone.body.trunk

    def _side(self) -> int:
        return int(math.sqrt(self.config.min_size * self.config.max_size))

    def evaluate(self, model: nn.Module, loader: DataLoader, amp_dtype: torch.dtype | None) -> dict[str, float]:
        metrics = evaluate_detection(model, loader, self.env, amp_dtype, self.val_set)
        return {k: v for k, v in metrics.items() if k != "images"}

    def epoch_summary(self, record: dict[str, Any]) -> str:
        if "val_bbox_ap" not in record:
            return ""
        text = f"box AP {record['val_bbox_ap']:.2f} AP50 {record['val_bbox_ap50']:.2f}"
        if "val_segm_ap" in record:
            text += f" mask AP {record['val_segm_ap']:.2f}"
        if "val_bbox_ap_ema" in record:
            text += f"  ema box AP {record['val_bbox_ap_ema']:.2f}"
        return text

    def describe(self, parts: TrainParts) -> tuple[str, str]:
        config = self.config
        how = (
            f"{fused_step_name(parts.optimizer, config)} update, {config.kind} on images of short side "
            f"{config.min_size} (long side at most {config.max_size})"
        )
        return self._describe_data(), how

    def checkpoint_extras(self) -> dict[str, Any]:
        return {"category_ids": list(self.category_ids)}


class Segmentation(_DenseTask):
    """An ADE20K-style dataset, UperNet with an auxiliary FCN head, mIoU."""

    name = "segmentation"
    command = "mambaout segment train"
    config_class = SegmentConfig
    recipes = SEGMENT_RECIPES
    frozen_on_resume = (*_FROZEN, "head_channels", "aux_channels", "head_norm")
    metric = "miou"
    metric_label = "val mIoU"
    default_data = "ihc"
    config: SegmentConfig
    train_set: AdeSegmentation
    val_set: AdeSegmentation

    @classmethod
    def default_recipe(cls, model: str, data: str | None) -> str | None:
        if not data:
            return "ihc_cpu"
        if parse_data_name(data) is not None:
            return "pathfinder_seg_cpu"
        name = f"upernet_{model.removeprefix('mambaout_')}_ade20k"
        return name if (SEGMENT_RECIPES / f"{name}.yaml").is_file() else None

    def build_data(self, checkpoint: dict[str, Any] | None) -> None:
        config = self.config
        root = resolve_data(config.data, "segmentation", ihc_ade)
        self.class_names = read_class_names(root, config.num_classes)
        if checkpoint is not None and checkpoint.get("class_names") != self.class_names:
            raise UserError(f"the classes of {root} differ from those of the run being resumed")
        k, reduce = len(self.class_names), config.reduce_zero_label
        cfg = get_spec(config.model).cfg
        self.train_set = AdeSegmentation(*ade_split(root, "train"), k, train=True, reduce_zero_label=reduce)
        self.train_set.pipeline = segmentation_transform(
            True,
            cfg.mean,
            cfg.std,
            config.scale,
            config.ratio_range,
            config.crop_size,
            config.cat_max_ratio,
            config.hflip,
            config.photometric,
        )
        self.val_set, self.data_root = self.val_dataset(root, k), root

    def val_dataset(self, root: Path, num_classes: int) -> AdeSegmentation:
        """The validation split of ADE-style `root`."""
        config = self.config
        val = AdeSegmentation(
            *ade_split(root, "val"), num_classes, train=False, reduce_zero_label=config.reduce_zero_label
        )
        cfg = get_spec(config.model).cfg
        val.pipeline = segmentation_transform(False, cfg.mean, cfg.std, config.scale)
        return val

    def build_model(self, pretrained: bool) -> nn.Module:
        config = self.config = dataclasses.replace(self.config, num_classes=len(self.class_names))
        model = build_segmenter(config, self._pretrained(pretrained))
        model.backbone.set_grad_checkpointing(config.grad_checkpointing)
        return model

    def val_batch_size(self) -> int:
        return 1  # whole images of their own sizes, as mmseg evaluates

    def forward_backward(self, module: nn.Module, amp_dtype: torch.dtype | None) -> SegmentationStep:
        return SegmentationStep(self.config.aux_weight)

    def _trunk(self, model: nn.Module) -> nn.Module:
        return model.backbone.trunk

    def _side(self) -> int:
        return self.config.crop_size

    def evaluate(self, model: nn.Module, loader: DataLoader, amp_dtype: torch.dtype | None) -> dict[str, float]:
        metrics = evaluate_segmentation(model, loader, self.env, amp_dtype, len(self.class_names))
        return {k: metrics[k] for k in ("miou", "macc", "aacc")}

    def epoch_summary(self, record: dict[str, Any]) -> str:
        if "val_miou" not in record:
            return ""
        text = f"mIoU {record['val_miou']:.2f} aAcc {record['val_aacc']:.2f}"
        if "val_miou_ema" in record:
            text += f"  ema mIoU {record['val_miou_ema']:.2f}"
        return text

    def describe(self, parts: TrainParts) -> tuple[str, str]:
        config = self.config
        how = (
            f"{fused_step_name(parts.optimizer, config)} update, UperNet ({config.head_channels} channels, "
            f"{config.head_norm} norm) on {config.crop_size}² crops, aux weight {config.aux_weight:g}"
        )
        return self._describe_data(), how
