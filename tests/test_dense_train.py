"""`mambaout detect|segment train|eval|predict` on small synthetic sets, through the one training engine."""

import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from dense_fixtures import DETECT, SEGMENT, flags, make_ade, make_coco
from PIL import Image
from train_fixtures import assert_same_weights, wait_for

from mambaout.cli import main
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    return make_coco(tmp_path_factory.mktemp("coco"), train=8, val=2)


@pytest.fixture(scope="module")
def ade(tmp_path_factory):
    return make_ade(tmp_path_factory.mktemp("ade"), train=8, val=2)


def _losses(run: Path) -> list[float]:
    return [r["train_loss"] for r in RunDir(run).read_metrics()]


def test_detection_learns_evaluates_and_predicts(coco, tmp_path, capsys):
    run = tmp_path / "run"
    argv = ["detect", "train", "--data", str(coco), "--output", str(run), *flags(DETECT, epochs="4")]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert (
        "2 classes, 8 train / 2 val images" in out
        and "mask_rcnn on images of short side 64 (long side at most 96)" in out
    )
    losses = _losses(run)
    assert len(losses) == 4 and losses[-1] < 0.8 * losses[0]
    records = RunDir(run).read_metrics()
    assert {"val_bbox_ap", "val_bbox_ap50", "val_segm_ap", "val_segm_apl"} <= set(records[-1])
    best = read_checkpoint(run / "best.pth")
    assert best["task"] == "detection" and best["category_ids"] == [3, 7] and best["class_names"] == ["red", "green"]

    assert main(["detect", "eval", "--checkpoint", str(run / "best.pth"), "--workers", "0"]) == 0
    printed = capsys.readouterr().out
    result = json.loads((run / "best.eval.json").read_text())
    assert result["task"] == "detection" and result["images"] == 2 and "box AP" in printed
    assert result["bbox_ap"] == pytest.approx(best["best_bbox_ap"])  # the same figure as training's evaluation
    assert result["bbox_ap"] > 10 and result["segm_ap"] > 10  # ~30 after 4 epochs here; an untrained model ~0

    photos = [coco / "val2017" / "001.png", coco / "val2017" / "002.png"]
    assert main(["detect", "predict", *map(str, photos), "--checkpoint", str(run / "best.pth"), "--output",
                 str(tmp_path / "preds"), "--score-threshold", "0"]) == 0  # fmt: skip
    detections = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    assert detections and {d["image_id"] for d in detections} <= {0, 1}
    for d in detections:  # COCO's results format
        assert set(d) == {"image_id", "category_id", "bbox", "score", "segmentation", "file_name"}
        assert d["category_id"] in (3, 7) and len(d["bbox"]) == 4 and set(d["segmentation"]) == {"size", "counts"}
    overlay = Image.open(tmp_path / "preds" / "001.png")
    assert overlay.size == (64, 64) and overlay.info.get("Software") == "mambaout"
    assert main(["plot", str(run), "--output", str(tmp_path / "curves.png")]) == 0


def test_segmentation_learns_evaluates_and_predicts(ade, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(["segment", "train", "--data", str(ade), "--output", str(run), *flags(SEGMENT, iters="40", lr="5e-3")])
        == 0
    )
    out = capsys.readouterr().out
    assert "3 classes, 8 train / 2 val images" in out and "40 steps, device cpu" in out
    losses = _losses(run)
    assert len(losses) == 10 and losses[-1] < 0.8 * losses[0]
    assert read_checkpoint(run / "last.pth")["step"] == 40
    assert main(["segment", "eval", "--checkpoint", str(run / "best.pth"), "--workers", "0"]) == 0
    result = json.loads((run / "best.eval.json").read_text())
    assert set(result["class_iou"]) == {"background", "red", "green"}
    maps = sorted((ade / "annotations" / "validation").iterdir())
    labels = np.concatenate([np.asarray(Image.open(path)).ravel() for path in maps])
    labels = labels[labels != 0]  # 0 is ignored; 1 is the background class
    background_only = 100 * np.mean(labels == 1) / 3  # the mIoU of calling every pixel background
    assert result["miou"] > background_only and min(result["class_iou"].values()) > 0  # 35 vs 27 here
    assert result["miou"] == pytest.approx(read_checkpoint(run / "best.pth")["best_miou"])
    photo = ade / "images" / "validation" / "000.jpg"
    assert main(["segment", "predict", str(photo), "--checkpoint", str(run / "best.pth"), "--output",
                 str(tmp_path / "preds")]) == 0  # fmt: skip
    (entry,) = json.loads((tmp_path / "preds" / "predictions.json").read_text())
    labels = Image.open(entry["label_map"])
    assert labels.size == (32, 32) and np.asarray(labels).max() <= 2 and sum(entry["class_percent"].values()) > 99.9


def test_bad_annotations_are_reported_once_and_training_goes_on(coco, tmp_path, capsys):
    root = tmp_path / "coco"
    make_coco(root, train=4, val=2)
    path = root / "annotations" / "instances_train2017.json"
    data = json.loads(path.read_text())
    data["annotations"].append({**data["annotations"][0], "id": 999, "bbox": [0, 0, 0, 0]})
    path.write_text(json.dumps(data))
    (root / "train2017" / "002.png").write_bytes(b"broken")
    argv = ["detect", "train", "--data", str(root), "--output", str(tmp_path / "run"), *flags(DETECT, epochs="2")]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert err.count("boxes of zero area (annotation 999)") == 1
    assert err.count("skipped 1 unreadable files") == 1 and "002.png" in err


def _start(argv: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "mambaout", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)  # fmt: skip


@pytest.mark.parametrize("task", ["detect", "segment"])
def test_sigterm_mid_epoch_resumes_to_the_same_weights(coco, ade, tmp_path, task):
    data, settings = (coco, DETECT) if task == "detect" else (ade, SEGMENT)
    # random flips and drop path: a resumed run must draw what a straight one draws
    extra = {"hflip": "0.5", "drop_path": "0.1", "save_interval": "1", "epochs": "3", "iters": "12"}
    extra.pop("iters" if task == "detect" else "epochs")  # each task's length in its own unit: both are refused
    argv = [task, "train", "--data", str(data), *flags(settings, **extra)]
    assert main([*argv, "--output", str(tmp_path / "straight")]) == 0
    stopped = tmp_path / "stopped"
    process = _start([*argv, "--output", str(stopped)])
    wait_for(stopped / "last.pth", process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=120)
    assert process.returncode == 128 + signal.SIGTERM, err
    assert f"continue with `mambaout {task} train --output" in err
    assert main([task, "train", "--output", str(stopped), "--resume", "auto"]) == 0
    straight, resumed = read_checkpoint(tmp_path / "straight" / "last.pth"), read_checkpoint(stopped / "last.pth")
    assert resumed["step"] == straight["step"]
    assert_same_weights(resumed["model"], straight["model"])  # the stopped part ran in another process


def test_a_checkpoint_of_another_task_is_refused(coco, tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["detect", "train", "--data", str(coco), "--output", str(run), *flags(DETECT, epochs="1")]) == 0
    capsys.readouterr()
    assert main(["segment", "eval", "--checkpoint", str(run / "best.pth")]) == 2
    assert "is a detection checkpoint, not a segmentation one" in capsys.readouterr().err
    assert main(["eval", "--checkpoint", str(run / "best.pth")]) == 2
    assert "is a detection checkpoint: use it with `mambaout detect eval`" in capsys.readouterr().err
    assert main(["segment", "train", "--output", str(run), "--resume", "auto"]) == 2
    assert "is a detection run, not a segmentation run" in capsys.readouterr().err
