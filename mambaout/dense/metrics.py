"""The dense tasks' metrics, the real ones: COCO box and mask AP by pycocotools' COCOeval, and mIoU the mmseg way.

Every figure is in percent (as the paper's tables). COCO: AP (IoU 0.50:0.95), AP50, AP75 and AP for small, medium
and large objects, of boxes (`bbox_*`) and masks (`segm_*`); an area range without any ground truth gives NaN
(COCOeval's -1). Segmentation: a confusion matrix over the whole dataset with the ignore index left out; IoU and
accuracy per class, mIoU and mAcc their means over the classes that occur in the labels or the predictions
(mmseg's nan-mean), aAcc the share of labelled pixels predicted right.
"""

import contextlib
import copy
import io
import math
from typing import Any

import numpy as np
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mambaout.dense.data import IGNORE_INDEX

__all__ = ["COCO_FIELDS", "ConfusionMatrix", "coco_metrics"]

COCO_FIELDS = ("ap", "ap50", "ap75", "aps", "apm", "apl")  # COCOeval.stats[0:6]


def coco_metrics(
    ground_truth: COCO, results: list[dict[str, Any]], image_ids: list[int], iou_types: tuple[str, ...]
) -> dict[str, float]:
    """COCOeval's AP figures of `results` on `image_ids`.

    Args:
        ground_truth: The annotations (pycocotools' index of the JSON).
        results: COCO's results format: per detection `image_id`, `category_id`, `bbox` (x, y, w, h), `score`, and
            for "segm" a `segmentation` RLE.
        image_ids: The images evaluated (others in the JSON are not counted as missed).
        iou_types: "bbox" and/or "segm".

    Returns:
        `<type>_<field>` for each type and `COCO_FIELDS`, in percent.
    """
    metrics = {}
    for iou_type in iou_types:
        if not image_ids:
            stats = [math.nan] * len(COCO_FIELDS)
        else:
            with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints as it goes
                # no detections at all still goes through COCOeval: 0 where there is ground truth, NaN where not
                detections = ground_truth.loadRes(copy.deepcopy(results)) if results else _nothing(ground_truth)
                evaluator = COCOeval(ground_truth, detections, iou_type)
                evaluator.params.imgIds = sorted(image_ids)
                evaluator.evaluate()
                evaluator.accumulate()
                evaluator.summarize()
            stats = [100.0 * s if s >= 0 else math.nan for s in evaluator.stats[: len(COCO_FIELDS)]]
        metrics.update({f"{iou_type}_{name}": float(v) for name, v in zip(COCO_FIELDS, stats, strict=True)})
    return metrics


def _nothing(ground_truth: COCO) -> COCO:
    """An empty results set for `ground_truth`'s images and categories (pycocotools' `loadRes` refuses an empty
    list)."""
    empty = COCO()
    empty.dataset = {key: ground_truth.dataset.get(key, []) for key in ("images", "categories")} | {"annotations": []}
    empty.createIndex()
    return empty


class ConfusionMatrix:
    """Pixel counts of (label, prediction) over a dataset; pixels labelled `ignore_index` are left out.

    Args:
        num_classes: Classes K; labels and predictions are 0..K-1.
        ignore_index: The label of pixels that count nowhere.
    """

    def __init__(self, num_classes: int, ignore_index: int = IGNORE_INDEX):
        self.num_classes, self.ignore_index = num_classes, ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.float64)  # [label, prediction]

    def update(self, prediction: torch.Tensor, labels: torch.Tensor) -> None:
        """Count one batch: `prediction` and `labels` of the same shape (`[B, H, W]` or `[H, W]`)."""
        keep = labels != self.ignore_index
        k = self.num_classes
        pairs = labels[keep].long().cpu() * k + prediction[keep].long().cpu()
        self.matrix += torch.bincount(pairs, minlength=k * k).reshape(k, k).double()

    def compute(self) -> dict[str, Any]:
        """`miou`, `macc`, `aacc` (percent) and per-class `iou` and `acc` lists (None where a class never occurs)."""
        m = self.matrix.numpy()
        hits, labelled, predicted = np.diag(m), m.sum(1), m.sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            iou = hits / (labelled + predicted - hits)
            acc = hits / labelled
        total = labelled.sum()
        return {
            "miou": _nanmean(iou),
            "macc": _nanmean(acc),
            "aacc": float(100.0 * hits.sum() / total) if total else math.nan,
            "iou": [None if math.isnan(v) else float(100.0 * v) for v in iou],
            "acc": [None if math.isnan(v) else float(100.0 * v) for v in acc],
        }


def _nanmean(values: np.ndarray) -> float:
    present = values[~np.isnan(values)]
    return float(100.0 * present.mean()) if present.size else math.nan
