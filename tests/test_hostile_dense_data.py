"""COCO and ADE20K-style datasets under hostile annotations (issue 22): every problem is one line naming the file, the
image or annotation id and the field, found before training starts; a bad entry is skipped and counted, a dataset
with nothing sensible left is refused; pycocotools never sees a NaN (whose polygon would crash the process), and no
file outside the image folder is read.

Cases come from tables of (description, mutation, what the line must hold): a mutation edits a copy of a tiny dataset's
JSON (or files). Refused cases fail before training; skipped entries are checked through `detect|segment eval`, which
is fast, on runs trained once for the module. The NaN polygon runs in a subprocess, where a crash is a return code.
"""

import dataclasses
import json
import math
import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dense_fixtures import DETECT, SEGMENT, flags, make_ade, make_coco
from hostile_fixtures import assert_refused
from PIL import Image

from mambaout.cli import main
from mambaout.dense.data import CocoDetection, coco_split
from mambaout.dense.metrics import coco_metrics

NAN = float("nan")
_CHILD_MEMORY = 4 * 2**30  # address space of a subprocess: a runaway allocation fails (a crash) instead of swapping

Mutation = Callable[[dict[str, Any], Path], None]  # (the split's JSON, the dataset's root) -> edits in place


@dataclasses.dataclass
class Workspace:
    root: Path
    coco: Path
    ade: Path
    detect: Path
    segment: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("hostile-dense")
    coco, ade = make_coco(root / "coco", train=4, val=2), make_ade(root / "ade", train=4, val=2)
    detect, segment = root / "detect-run", root / "segment-run"
    assert main(["detect", "train", "--data", str(coco), "--output", str(detect), *flags(DETECT, epochs=1)]) == 0
    assert main(["segment", "train", "--data", str(ade), "--output", str(segment), *flags(SEGMENT, iters=2)]) == 0
    return Workspace(root, coco, ade, detect, segment)


def _coco_variant(ws: Workspace, name: str, split: str, mutate: Mutation) -> tuple[Path, Path]:
    """A copy of the COCO set with `mutate` applied to `split`'s JSON: (its root, that JSON)."""
    root = ws.root / "variants" / name
    shutil.copytree(ws.coco, root)
    path = coco_split(root, split)[1]
    dataset = json.loads(path.read_text())
    mutate(dataset, root)
    path.write_text(json.dumps(dataset))
    return root, path


def _beside(data: Path, name: str) -> Path:
    """An output of a command on the dataset copy `data`: beside it, as a dataset folder is never written into."""
    return data.with_name(f"{data.name}.{name}")


def _set(entry: str, key: str, value: Any) -> Mutation:
    """Set `key` of the first image or annotation (`entry`) to `value`."""
    return lambda d, root: d[entry][0].__setitem__(key, value)


def _drop(entry: str, *keys: str) -> Mutation:
    """Remove `keys` from the first image or annotation (`entry`)."""

    def mutate(d: dict[str, Any], root: Path) -> None:
        for key in keys:
            del d[entry][0][key]

    return mutate


def _append(entry: str, value: Any) -> Mutation:
    return lambda d, root: d[entry].append(value)


def _repeat_first(entry: str) -> Mutation:
    return lambda d, root: d[entry].append(dict(d[entry][0]))


def _outside_file(absolute: bool) -> Mutation:
    """The first image's `file_name` names a real image outside the image folder."""

    def mutate(d: dict[str, Any], root: Path) -> None:
        shutil.copy(root / "val2017" / "001.png", root / "outside.png")
        d["images"][0]["file_name"] = str(root / "outside.png") if absolute else "../outside.png"

    return mutate


def _delete_file(d: dict[str, Any], root: Path) -> None:
    (root / "val2017" / "002.png").unlink()


BAD_SEGMENTATION = "segmentations that are no polygon or RLE"
BAD_BOX = "annotations whose bbox is not [x, y, w, h] of finite numbers, w and h ≥ 0"
BAD_SIZE = "images without a positive integer width and height"
BAD_FILE_NAME = "images whose file_name is no path inside the image folder"


def _rle(counts: Any, size: tuple[int, int] = (64, 64)) -> Mutation:
    return _set("annotations", "segmentation", {"size": list(size), "counts": counts})


# (description, mutation of the val JSON, count and reason, example, images evaluated): `detect eval` skips, counts
# and names each in its one warning line, `skipped N items of <json>: <count> <reason> (<example>, ...)`; the val split
# has two images
SKIPPED: list[tuple[str, Mutation, str, str, int]] = [
    ("no area", _drop("annotations", "area"), "1 annotations without area", "annotation 1: no 'area'", 2),
    ("no iscrowd", _drop("annotations", "iscrowd"), "1 annotations without iscrowd", "annotation 1: no 'iscrowd'", 2),
    ("no segmentation", _drop("annotations", "segmentation"), f"1 {BAD_SEGMENTATION}", "annotation 1: no 'segm", 2),
    ("null annotation", _append("annotations", None), "1 annotations without an integer id", "entry ", 2),
    ("string image id", _set("images", "id", "1"), "1 images without an integer id", "entry 0 of 'images'", 1),
    ("string image_id", _set("annotations", "image_id", "1"), "image_id is not an integer", 'image_id "1"', 2),
    ("string width", _set("images", "width", "64"), f"1 {BAD_SIZE}", 'image 1: width "64", height 64', 1),
    ("no size", _drop("images", "width", "height"), f"1 {BAD_SIZE}", "image 1: width null, height null", 1),
    ("zero width", _set("images", "width", 0), f"1 {BAD_SIZE}", "image 1: width 0, height 64", 1),
    ("garbage RLE", _rle("!!x"), f"1 {BAD_SEGMENTATION}", 'annotation 1: RLE counts "!!x"', 2),
    ("negative RLE", _rle([-5, 4101]), f"1 {BAD_SEGMENTATION}", "annotation 1: RLE counts [-5, 4101]", 2),
    ("short RLE", _rle([10, 5]), f"1 {BAD_SEGMENTATION}", "annotation 1: RLE runs covering 15 of 4096 pixels", 2),
    ("RLE size", _rle([1000, 24], (32, 32)), "1 RLE masks of another size than their image", "RLE size [32, 32]", 2),
    ("odd polygon", _set("annotations", "segmentation", [[1, 2, 3, 4, 5, 6, 7]]), f"1 {BAD_SEGMENTATION}", "poly", 2),
    (
        "far polygon",
        _set("annotations", "segmentation", [[1, 2, 1e5, 4, 5, 6]]),
        "1 polygons reaching far outside their image",
        "annotation 1: polygon [1, 2, 100000.0, 4, 5, 6] on 64×64 pixels",
        2,
    ),
    ("bbox of strings", _set("annotations", "bbox", ["1", "2", "3", "4"]), f"1 {BAD_BOX}", 'bbox ["1", "2", "3"', 2),
    ("bbox text", _set("annotations", "bbox", "1234"), f"1 {BAD_BOX}", 'annotation 1: bbox "1234"', 2),
    ("NaN bbox", _set("annotations", "bbox", [1, NAN, 3, 4]), f"1 {BAD_BOX}", "annotation 1: bbox [1, NaN, 3, 4]", 2),
    ("negative bbox", _set("annotations", "bbox", [1, 2, -3, 4]), f"1 {BAD_BOX}", "bbox [1, 2, -3, 4]", 2),
    ("NaN area", _set("annotations", "area", NAN), "area is not a finite number ≥ 0", "annotation 1: area NaN", 2),
    ("iscrowd 2", _set("annotations", "iscrowd", 2), "1 annotations whose iscrowd is not 0 or 1", "iscrowd 2", 2),
    ("string category", _set("annotations", "category_id", "3"), "category_id is not an integer", 'id "3"', 2),
    ("unknown image", _set("annotations", "image_id", 99), "1 annotations of unknown image ids", "image_id 99", 2),
    ("repeated image id", _repeat_first("images"), "2 images whose id is given twice", 'image 1: file_name "001', 1),
    (
        "repeated annotation id",
        _repeat_first("annotations"),
        "1 annotations whose id is given twice",
        "annotation 1",
        2,
    ),
    ("file_name ..", _outside_file(absolute=False), f"1 {BAD_FILE_NAME}", 'image 1: file_name "../outside.png"', 1),
    ("absolute file_name", _outside_file(absolute=True), f"1 {BAD_FILE_NAME}", 'image 1: file_name "/', 1),
    ("missing image file", _delete_file, "1 images whose file is missing", "/val2017/002.png", 1),
]


@pytest.mark.parametrize(("description", "mutate", "reason", "example", "images"), SKIPPED, ids=[c[0] for c in SKIPPED])
def test_bad_annotations_are_skipped_and_named_in_one_warning(ws, capsys, description, mutate, reason, example, images):
    data, path = _coco_variant(ws, description.replace(" ", "-"), "val", mutate)
    argv = ["detect", "eval", "--checkpoint", str(ws.detect / "best.pth"), "--data", str(data), "--workers", "0"]
    capsys.readouterr()
    assert main([*argv, "--json", str(_beside(data, "eval.json"))]) == 0
    captured = capsys.readouterr()
    warnings = [line for line in captured.err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and "Traceback" not in captured.err, captured.err
    assert warnings[0].startswith("warning: skipped ") and f" items of {path}: " in warnings[0], warnings[0]
    assert reason in warnings[0] and example in warnings[0].split(reason, 1)[1].split(")")[0], (reason, warnings[0])
    assert json.loads((_beside(data, "eval.json")).read_text())["images"] == images


def _drop_all_sizes(d: dict[str, Any], root: Path) -> None:
    for image in d["images"]:
        del image["width"]


def _images_not_a_list(d: dict[str, Any], root: Path) -> None:
    d["images"] = {"1": 2}


# (description, mutation of the train JSON, words the error line holds): `detect train` refuses before training
REFUSED: list[tuple[str, Mutation, str]] = [
    ("images not a list", _images_not_a_list, "no 'images' list"),
    ("annotations not a list", lambda d, root: d.__setitem__("annotations", {"1": 1}), "'annotations' is not a list"),
    ("null category", lambda d, root: d["categories"].append(None), "entry 2 of 'categories' has no integer 'id'"),
    ("string category id", _set("categories", "id", "3"), "entry 0 of 'categories' has no integer 'id'"),
    ("repeated category id", _repeat_first("categories"), "category id 3 is given twice"),
    ("no image has a size", _drop_all_sizes, "no usable image in"),
]


@pytest.mark.parametrize(("description", "mutate", "named"), REFUSED, ids=[c[0] for c in REFUSED])
def test_a_file_with_nothing_sensible_left_is_refused_before_training(ws, capsys, description, mutate, named):
    data, path = _coco_variant(ws, description.replace(" ", "-"), "train", mutate)
    argv = ["detect", "train", "--data", str(data), "--output", str(_beside(data, "run")), *flags(DETECT, epochs=1)]
    line = assert_refused(ws.root, capsys, argv, named)
    assert str(path) in line and not (_beside(data, "run") / "last.pth").exists()


def test_training_reports_a_skipped_annotation_by_file_id_and_field(ws, capsys):
    data, path = _coco_variant(ws, "train-nan-box", "train", _set("annotations", "bbox", [NAN, 1, 2, 3]))
    capsys.readouterr()
    argv = ["detect", "train", "--data", str(data), "--output", str(_beside(data, "run")), *flags(DETECT, epochs=1)]
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert f"warning: skipped 1 items of {path}: 1 annotations whose bbox is not" in err
    assert "annotation 1: bbox [NaN, 1, 2, 3]" in err


def test_a_nan_box_in_the_ground_truth_is_not_counted_by_evaluation(ws):
    """Perfect detections of every other annotation score 100 AP: the NaN box is neither a miss nor a match."""
    data, _ = _coco_variant(ws, "eval-nan-box", "val", _set("annotations", "bbox", [NAN, 1, 2, 3]))
    dataset = CocoDetection(*coco_split(data, "val"), train=False)
    assert dict(dataset.problems.counts) == {BAD_BOX: 1}
    truth = json.loads(coco_split(ws.coco, "val")[1].read_text())["annotations"][1:]
    results = [
        {"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 1} for a in truth
    ]
    metrics = coco_metrics(dataset.coco, results, dataset.image_ids, ("bbox",))
    assert math.isclose(metrics["bbox_ap"], 100.0)


def _nan_polygon(d: dict[str, Any], root: Path) -> None:
    d["annotations"][0]["segmentation"] = [[1.0, 2.0, NAN, 9.0, 9.0, 9.0, 1.0, 9.0]]


def _run_child(argv: list[str]) -> subprocess.CompletedProcess:
    """`python -m mambaout argv` in its own process, so that a crash in C code is a return code below 0."""
    limit = (_CHILD_MEMORY, _CHILD_MEMORY)
    return subprocess.run(
        [sys.executable, "-m", "mambaout", *argv],
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, limit),
    )


@pytest.mark.parametrize("action", ["train", "eval"])
def test_a_nan_polygon_does_not_crash_the_process(ws, action):
    split = "train" if action == "train" else "val"
    data, path = _coco_variant(ws, f"nan-polygon-{action}", split, _nan_polygon)
    if action == "train":
        argv = ["detect", "train", "--data", str(data), "--output", str(_beside(data, "run")), *flags(DETECT, epochs=1)]
    else:
        argv = ["detect", "eval", "--checkpoint", str(ws.detect / "best.pth"), "--data", str(data), "--workers", "0",
                "--json", str(_beside(data, "eval.json"))]  # fmt: skip
    child = _run_child(argv)
    assert child.returncode == 0, (child.returncode, child.stderr[-2000:])
    assert f"skipped 1 items of {path}: 1 {BAD_SEGMENTATION} (annotation 1: polygon [1.0, 2.0, NaN" in child.stderr


def _ade_variant(ws: Workspace, name: str, change: Callable[[Path], None]) -> Path:
    root = ws.root / "variants" / name
    shutil.copytree(ws.ade, root)
    change(root)
    return root


def _second_image_of_one_name(split: str) -> Callable[[Path], None]:
    def change(root: Path) -> None:
        with Image.open(root / "images" / split / "000.jpg") as image:
            image.save(root / "images" / split / "000.png")

    return change


def _segment_train(ws: Workspace, data: Path) -> list[str]:
    return ["segment", "train", "--data", str(data), "--output", str(_beside(data, "run")), *flags(SEGMENT, iters=2)]


def _segment_eval(ws: Workspace, data: Path) -> list[str]:
    checkpoint = str(ws.segment / "best.pth")
    return ["segment", "eval", "--checkpoint", checkpoint, "--data", str(data), "--workers", "0", "--json",
            str(_beside(data, "eval.json"))]  # fmt: skip


# (description, change to the ADE copy, command, words the error line holds)
ADE_REFUSED: list[tuple[str, Callable[[Path], None], Callable, str]] = [
    ("train stems collide", _second_image_of_one_name("training"), _segment_train, "share the name '000'"),
    ("val stems collide", _second_image_of_one_name("validation"), _segment_eval, "000.png share the name '000'"),
    (
        "a class named twice",
        lambda root: (root / "classes.txt").write_text("background\nred\nred\n"),
        _segment_train,
        "classes.txt names the class 'red' twice",
    ),
]


@pytest.mark.parametrize(("description", "change", "command", "named"), ADE_REFUSED, ids=[c[0] for c in ADE_REFUSED])
def test_ambiguous_ade_folders_are_refused(ws, capsys, description, change, command, named):
    data = _ade_variant(ws, description.replace(" ", "-"), change)
    assert_refused(ws.root, capsys, command(ws, data), named)


# (description, change to the ADE copy, words the warning line holds): `segment eval` says what it left out
ADE_SKIPPED: list[tuple[str, Callable[[Path], None], tuple[str, ...]]] = [
    (
        "no label map",
        lambda root: (root / "annotations" / "validation" / "001.png").unlink(),
        ("images without a label map", "images/validation/001.jpg"),
    ),
    (
        "no image",
        lambda root: (root / "images" / "validation" / "001.jpg").unlink(),
        ("label maps without an image", "annotations/validation/001.png"),
    ),
]


@pytest.mark.parametrize(("description", "change", "words"), ADE_SKIPPED, ids=[c[0] for c in ADE_SKIPPED])
def test_images_left_out_of_segmentation_eval_are_said(ws, capsys, description, change, words):
    data = _ade_variant(ws, description.replace(" ", "-"), change)
    capsys.readouterr()
    assert main(_segment_eval(ws, data)) == 0
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning: ")]
    assert len(warnings) == 1 and warnings[0].startswith("warning: skipped 1 items of "), err
    assert all(w in warnings[0] for w in words), (words, warnings[0])
    assert json.loads((_beside(data, "eval.json")).read_text())["images"] == 1


def test_a_symbolic_link_inside_the_image_folder_is_followed(ws):
    """Links placed in the folder are the user's choice (as the folder datasets): only `file_name` may not leave it."""
    data, _ = _coco_variant(ws, "linked", "val", lambda d, root: None)
    store = ws.root / "store.png"
    shutil.copy(data / "val2017" / "001.png", store)
    (data / "val2017" / "001.png").unlink()
    (data / "val2017" / "001.png").symlink_to(store)
    dataset = CocoDetection(*coco_split(data, "val"), train=False)
    assert not dataset.problems and dataset[0][1]["valid"] and len(dataset) == 2
