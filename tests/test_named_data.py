"""Data names (`--data pathfinder:32-6`): parsing, the trees they write once, and every command that takes one."""

import json
import re

import numpy as np
import pytest
from PIL import Image
from train_fixtures import flags

from mambaout.cli import main
from mambaout.data import make_sample
from mambaout.data.named import (
    CLASS_NAMES,
    SEGMENT_CLASSES,
    TRAIN_SIZE,
    VAL_SEED,
    VAL_SIZE,
    DataName,
    data_label,
    parse_data_name,
    resolve_data,
)
from mambaout.errors import UserError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def _never() -> None:
    raise AssertionError("the default dataset was asked for")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("pathfinder:32-14", DataName("classification", 32, 14, TRAIN_SIZE, VAL_SIZE)),
        ("pathfinder:64-6:500", DataName("classification", 64, 6, 500, VAL_SIZE)),
        ("pathfinder-seg:128-9:40/8", DataName("segmentation", 128, 9, 40, 8)),
        ("pathfinders/are/folders", None),
        ("~/data", None),
        (None, None),
    ],
)
def test_names_parse_and_folders_are_not_names(text, expected):
    assert parse_data_name(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("pathfinder:32", "the form is pathfinder[-seg]:SIZE-LENGTH"),
        ("pathfinder:32-6:10/", "the form is"),
        ("pathfinder:48-6", "size 48 is not one of 32, 64, 128"),
        ("pathfinder:32-0", "contour_length 0 is not a positive integer"),
        ("pathfinder-seg:32-6:0", "TRAIN and VAL must be at least 1"),
    ],
)
def test_bad_names_are_one_clear_error(text, message):
    with pytest.raises(UserError) as e:
        parse_data_name(text)
    assert str(e.value).startswith(f"--data {text}") and message in str(e.value)


def test_a_classification_tree_holds_the_generators_samples_in_label_folders(cache):
    root = resolve_data("pathfinder:32-6:12/6", "classification", _never)
    assert root == cache / "pathfinder-v1-32-6-12-6" and (root / "COMPLETE").is_file()
    for split, count, first in (("train", 12, 0), ("val", 6, VAL_SEED)):
        files = sorted((root / split).glob("*/*.png"))
        assert len(files) == count and {f.parent.name for f in files} <= set(CLASS_NAMES)
        for f in files:
            sample = make_sample(32, 6, first + int(f.stem))
            assert f.parent.name == CLASS_NAMES[sample.label]
            np.testing.assert_array_equal(np.asarray(Image.open(f)), sample.image)
    # written once: a second resolution reuses the tree as it is
    marker = root / "train" / "extra.txt"
    marker.write_text("kept")
    assert resolve_data("pathfinder:32-6:12/6", "classification", _never) == root and marker.exists()
    assert data_label("pathfinder:32-6:12/6") == "pathfinder-32-6-12-6"


def test_a_segmentation_tree_is_ade_style_with_the_generators_masks(cache):
    root = resolve_data("pathfinder-seg:32-9:5/3", "segmentation", _never)
    assert (root / "classes.txt").read_text().split() == list(SEGMENT_CLASSES)
    for split, count, first in (("training", 5, 0), ("validation", 3, VAL_SEED)):
        images = sorted((root / "images" / split).glob("*.png"))
        assert len(images) == count
        for image in images:
            sample = make_sample(32, 9, first + int(image.stem.removeprefix("pf_")))
            np.testing.assert_array_equal(np.asarray(Image.open(image)), sample.image)
            mask = np.asarray(Image.open(root / "annotations" / split / image.name))
            np.testing.assert_array_equal(mask, sample.mask)


@pytest.mark.parametrize(
    ("data", "kind", "message"),
    [
        ("pathfinder-seg:32-6", "classification", "is segmentation data (for `mambaout segment`); classification "
         "takes pathfinder:32-6"),
        ("pathfinder:32-6", "segmentation", "takes pathfinder-seg:32-6"),
        ("pathfinder:32-6", "detection", "detection has no data name"),
    ],
)  # fmt: skip
def test_a_name_for_another_task_is_refused_before_anything_is_written(cache, data, kind, message):
    with pytest.raises(UserError, match=re.escape(message)):
        resolve_data(data, kind, _never)
    assert not cache.exists()


def test_no_data_is_the_default_and_a_folder_stays_a_folder(tmp_path):
    assert resolve_data(None, "classification", lambda: tmp_path) == tmp_path
    assert resolve_data(str(tmp_path / "x"), "classification", _never) == tmp_path / "x"


def test_train_eval_and_predict_take_a_pathfinder_name(cache, tmp_path, capsys):
    run = tmp_path / "run"
    data = "pathfinder:32-6:16/8"
    assert main(["train", "--data", data, "--output", str(run), *flags(epochs=1)]) == 0
    assert "pathfinder-v1-32-6-16-8" in capsys.readouterr().out
    # eval finds the run's own data through its name: the 8 validation images
    assert main(["eval", "--checkpoint", str(run / "last.pth"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 8
    capsys.readouterr()
    assert main(["predict", data, "--checkpoint", str(run / "last.pth"), "--json"]) == 0
    records = json.loads(capsys.readouterr().out)
    assert len(records) == 8 and {p["label"] for r in records for p in r["predictions"]} == set(CLASS_NAMES)


def test_without_a_recipe_a_pathfinder_name_picks_the_pathfinder_recipe():
    from mambaout.train.trainer import default_recipe

    assert default_recipe("mambaout_femto", "pathfinder:32-14") == "pathfinder_cpu"
    assert default_recipe("mambaout_femto", None) == "digits_cpu"


def test_segment_train_eval_and_predict_take_a_pathfinder_seg_name(cache, tmp_path, capsys):
    run = tmp_path / "seg"
    data = "pathfinder-seg:32-6:4/2"
    argv = ["segment", "train", "--data", data, "--output", str(run), "--iters", "2", "--batch-size", "2"]
    assert main([*argv, "--eval-interval", "1", "--threads", "1"]) == 0
    record = json.loads((run / "metrics.jsonl").read_text().splitlines()[-1])
    assert 0 <= record["val_miou"] <= 100
    assert main(["segment", "eval", "--checkpoint", str(run / "last.pth"), "--json", str(tmp_path / "e.json")]) == 0
    assert json.loads((tmp_path / "e.json").read_text())["images"] == 2
    out = tmp_path / "pred"
    assert main(["segment", "predict", data, "--checkpoint", str(run / "last.pth"), "--output", str(out)]) == 0
    assert len(list(out.glob("*_labels.png"))) == 2
