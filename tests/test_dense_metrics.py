"""mambaout.dense.metrics: COCO AP through pycocotools' COCOeval, mIoU/aAcc the mmseg way."""

import contextlib
import copy
import io
import math

import numpy as np
import pytest
import torch
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from mambaout.dense.data import IGNORE_INDEX, encode_mask
from mambaout.dense.metrics import ConfusionMatrix, coco_metrics


def _ground_truth() -> COCO:
    """Two 64×64 images: image 1 holds two cats, image 2 one dog (boxes and square masks)."""
    annotations, masks = [], {}
    for ann_id, (image_id, cat, box) in enumerate(
        [(1, 1, [4, 4, 20, 20]), (1, 1, [34, 30, 24, 26]), (2, 2, [10, 12, 30, 30])], start=1
    ):
        mask = np.zeros((64, 64), np.uint8)
        x, y, w, h = box
        mask[y : y + h, x : x + w] = 1
        masks[ann_id] = mask
        annotations.append(
            {"id": ann_id, "image_id": image_id, "category_id": cat, "bbox": box, "area": w * h, "iscrowd": 0,
             "segmentation": encode_mask(mask)}
        )  # fmt: skip
    coco = COCO()
    coco.dataset = {
        "images": [{"id": i, "width": 64, "height": 64} for i in (1, 2)],
        "annotations": annotations,
        "categories": [{"id": 1, "name": "cat"}, {"id": 2, "name": "dog"}],
    }
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    coco.masks = masks
    return coco


def _perfect(gt: COCO) -> list[dict]:
    return [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9,
         "segmentation": a["segmentation"]}
        for a in gt.dataset["annotations"]
    ]  # fmt: skip


def test_perfect_detections_give_ap_100():
    gt = _ground_truth()
    metrics = coco_metrics(gt, _perfect(gt), [1, 2], ("bbox", "segm"))
    for kind in ("bbox", "segm"):
        assert metrics[f"{kind}_ap"] == pytest.approx(100.0)  # pycocotools' 1.0
        assert metrics[f"{kind}_ap50"] == metrics[f"{kind}_ap75"] == pytest.approx(100.0)
    assert math.isnan(metrics["bbox_apl"])  # no large object: COCOeval's -1


def test_no_detections_give_0_where_there_is_ground_truth_and_nan_where_there_is_none():
    metrics = coco_metrics(_ground_truth(), [], [1, 2], ("bbox", "segm"))
    for kind in ("bbox", "segm"):
        assert [metrics[f"{kind}_{f}"] for f in ("ap", "ap50", "ap75", "aps")] == [0.0] * 4  # all objects are small
        assert math.isnan(metrics[f"{kind}_apm"]) and math.isnan(metrics[f"{kind}_apl"])  # none: COCOeval's -1
    assert all(math.isnan(v) for v in coco_metrics(_ground_truth(), [], [], ("bbox",)).values())  # no image


def test_an_imperfect_case_gives_pycocotools_value():
    gt = _ground_truth()
    results = _perfect(gt)
    results[1] = {**results[1], "bbox": [38, 30, 24, 26], "score": 0.3}  # shifted: IoU 0.71
    results[2] = {**results[2], "category_id": 1, "score": 0.8}  # the dog called a cat
    for r in results:
        r.pop("segmentation", None)
    metrics = coco_metrics(gt, results, [1, 2], ("bbox",))
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval(gt, gt.loadRes(copy.deepcopy(results)), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    assert metrics["bbox_ap"] == pytest.approx(100 * evaluator.stats[0])
    assert metrics["bbox_ap50"] == pytest.approx(100 * evaluator.stats[1])
    # by hand: the dog is missed (AP 0); the cats are found in score order 0.9 (IoU 1), 0.8 (a false one: the dog,
    # on image 2), 0.3 (IoU 0.71, a hit up to IoU 0.70); at IoU 0.5: precision 1 to recall 0.5, then 2/3 to 1.0
    cat_at_50 = (51 * 1.0 + 50 * 2 / 3) / 101
    assert metrics["bbox_ap50"] == pytest.approx(100 * cat_at_50 / 2, abs=1e-6)


def test_images_left_out_are_not_counted_as_missed():
    gt = _ground_truth()
    only_first = [r for r in _perfect(gt) if r["image_id"] == 1]
    assert coco_metrics(gt, only_first, [1], ("bbox",))["bbox_ap"] == pytest.approx(100.0)


def test_perfect_labels_give_miou_100_and_ignored_pixels_count_nowhere():
    labels = torch.tensor([[0, 1, 2], [IGNORE_INDEX, 1, 2]])
    confusion = ConfusionMatrix(3)
    prediction = labels.clone()
    prediction[1, 0] = 0  # under the ignore label: not counted
    confusion.update(prediction, labels)
    metrics = confusion.compute()
    assert metrics["miou"] == metrics["aacc"] == metrics["macc"] == pytest.approx(100.0)


def test_an_imperfect_segmentation_gives_the_hand_computed_figures():
    labels = torch.tensor([0, 0, 0, 0, 1, 1, 2, 2, IGNORE_INDEX])
    prediction = torch.tensor([0, 0, 0, 1, 1, 1, 1, 0, 2])
    confusion = ConfusionMatrix(4)  # class 3 never occurs: left out of the means (nan-mean)
    confusion.update(prediction[:5], labels[:5])
    confusion.update(prediction[5:], labels[5:])  # the counts add up over batches
    metrics = confusion.compute()
    # class 0: 3 hits, 4 labelled, 4 predicted -> IoU 3/5; class 1: 2 hits, 2 labelled, 4 predicted -> 2/4;
    # class 2: 0 hits -> 0; accuracies 3/4, 2/2, 0/2; aAcc 5 of 8 labelled pixels
    assert metrics["iou"][:3] == pytest.approx([60.0, 50.0, 0.0]) and metrics["iou"][3] is None
    assert metrics["miou"] == pytest.approx(100 * (0.6 + 0.5 + 0.0) / 3)
    assert metrics["macc"] == pytest.approx(100 * (0.75 + 1.0 + 0.0) / 3)
    assert metrics["aacc"] == pytest.approx(100 * 5 / 8)
