"""mambaout.demo as plain functions: top classes, activation maps on the photo, examples, which model is served,
and the page's handlers called directly (the running page is tests/test_demo_app.py)."""

import math
import os
import sys

import gradio as gr
import numpy as np
import pytest
import torch
from PIL import Image

from mambaout.cli import main
from mambaout.data import data_config, digits_tree, imagenet_class_names, imagenet_synsets, load_image
from mambaout.demo import (
    CAM_METHODS,
    activation_map,
    blend_map,
    bundled_examples,
    crop_box,
    default_stage,
    held_out_images,
    input_sizes,
    latest_default_run,
    load_demo_classifier,
    model_input,
    photo_map,
    skimage_photos,
    top_classes,
)
from mambaout.demo.app import DemoPage
from mambaout.errors import UserError
from mambaout.fast import optimize_for_inference
from mambaout.models import create_model
from mambaout.train.inference import Classifier

DIMS = (8, 16, 24, 32)


def _tiny(classes: int = 10) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model("mambaout_femto", num_classes=classes, depths=(1, 1, 1, 1), dims=DIMS).eval()


def _photo(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 255, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def classifier() -> Classifier:
    model = _tiny()
    names = [str(i) for i in range(10)]
    return Classifier(model, "mambaout_femto", names, names, data_config(model, 32), "tiny", digits_tree() / "val")


# --- prediction ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "optimized"])
def test_top_classes_are_ranked_probabilities(one_thread, fast):
    model = _tiny(7)
    x = model_input(_photo(40, 30), data_config(model, 32))
    assert x.shape == (1, 3, 32, 32)
    found = top_classes(optimize_for_inference(model) if fast else model, x, top=7)
    assert sorted(found.indices) == list(range(7)) and found.seconds > 0
    assert math.isclose(sum(found.probabilities), 1.0, rel_tol=1e-5)
    assert found.probabilities == sorted(found.probabilities, reverse=True)
    expected = model(x).softmax(dim=1)[0]
    assert torch.allclose(torch.tensor(found.probabilities), expected[found.indices], atol=1e-5)
    assert len(top_classes(model, x, top=3).indices) == 3


def test_input_sizes_offer_the_native_one_and_multiples_of_eight():
    assert input_sizes(224) == [168, 224, 280, 336, 448]
    assert input_sizes(32) == [32, 40, 48, 64]
    sizes = input_sizes(100)
    assert 100 in sizes and all(s % 8 == 0 and s >= 32 for s in sizes if s != 100)


# --- activation maps -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("method", "stage"), [("grad-cam", -1), ("grad-cam", 0), ("grad-cam", 1), ("head", -1)])
def test_activation_map_is_in_unit_range_on_the_stage_grid(one_thread, method, stage):
    model = _tiny()
    x = model_input(_photo(64, 64), data_config(model, 64))
    heat = activation_map(model, x, class_index=3, method=method, stage=stage)
    reduction = model.feature_info[stage]["reduction"]
    assert heat.shape == (math.ceil(64 / reduction),) * 2
    assert heat.min() >= 0 and math.isclose(heat.max().item(), 1.0)  # scaled to its peak: never an empty map
    assert all(p.grad is None for p in model.parameters())  # nothing accumulates between requests


def test_activation_maps_differ_by_class_and_reject_bad_requests(one_thread):
    model = _tiny()
    x = model_input(_photo(64, 64, seed=1), data_config(model, 64))
    maps = [activation_map(model, x, c, "grad-cam", stage=1) for c in range(3)]
    assert not torch.equal(maps[0], maps[1]) or not torch.equal(maps[1], maps[2])
    with pytest.raises(ValueError, match="method must be one of"):
        activation_map(model, x, 0, "saliency")
    with pytest.raises(ValueError, match="only the last stage"):
        activation_map(model, x, 0, "head", stage=0)
    assert set(CAM_METHODS) == {"grad-cam", "head"}


def test_default_stage_is_the_last_with_a_readable_grid():
    model = _tiny()
    assert default_stage(model, 224) == 3  # 7×7
    assert default_stage(model, 32) == 1  # 4×4 (the last stage would be 1×1)
    assert default_stage(model, 8) == 0


@pytest.mark.parametrize("crop_pct", [1.0, 0.875])
@pytest.mark.parametrize("size", [(300, 200), (120, 360), (64, 64)])
def test_photo_map_has_the_photo_aspect_and_is_zero_outside_the_crop(crop_pct, size):
    data = {"input_size": (3, 32, 32), "crop_pct": crop_pct}
    heat = torch.rand(4, 4)
    heat[0, 0] = 1.0
    placed = photo_map(heat, size, data)
    width, height = size
    assert placed.shape == (height, width) and placed.dtype == np.float32
    assert placed.min() >= 0 and placed.max() <= 1 and placed.max() > 0.5
    left, top, right, bottom = crop_box(size, data)
    assert math.isclose(right - left, bottom - top)  # the model sees a square...
    assert math.isclose(right - left, min(size) * 32 / math.floor(32 / crop_pct))  # ...of the short side
    outside = np.ones_like(placed, dtype=bool)
    outside[max(0, round(top)) : round(bottom), max(0, round(left)) : round(right)] = False
    assert not placed[outside].any()


def test_blend_colors_the_crop_and_dims_the_rest():
    photo = Image.new("RGB", (300, 100), (200, 200, 200))
    data = {"input_size": (3, 32, 32), "crop_pct": 1.0}
    blended = blend_map(photo, photo_map(torch.ones(2, 2), photo.size, data), crop_box(photo.size, data))
    assert blended.size == photo.size and blended.mode == "RGB"
    pixels = np.asarray(blended)
    assert (pixels[:, :90] < 100).all() and (pixels[:, 210:] < 100).all()  # dimmed: outside the center square
    assert (pixels[50, 150] != pixels[50, 10]).any()


# --- examples and which model is served ------------------------------------------------------------------------------


def test_held_out_examples_are_one_scan_per_digit(classifier):
    examples = held_out_images(digits_tree() / "val")
    assert [p.parent.name for p in examples] == [str(d) for d in range(10)]
    assert bundled_examples(classifier) == examples
    assert all(load_image(p).size == (8, 8) for p in examples)


def test_imagenet_classifiers_get_the_scikit_image_photos(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path))
    photos = skimage_photos()
    assert [p.name for p in photos] == ["chelsea.png", "coffee.png", "astronaut.png", "rocket.png"]
    assert all(p.parent == tmp_path / "demo-photos" and load_image(p).width >= 300 for p in photos)
    stamps = [p.stat().st_mtime_ns for p in photos]
    assert skimage_photos() == photos and [p.stat().st_mtime_ns for p in photos] == stamps  # written once
    model = _tiny(1000)
    imagenet = Classifier(
        model, "mambaout_femto", list(imagenet_class_names()), list(imagenet_synsets()), data_config(model), "x"
    )
    assert bundled_examples(imagenet) == photos


def _run(folder, data: str | None, mtime: float) -> None:
    folder.mkdir(parents=True)
    (folder / "config.yaml").write_text(f"model: mambaout_femto\ndata: {data or 'null'}\n")
    (folder / "best.pth").write_bytes(b"")
    os.utime(folder / "best.pth", (mtime, mtime))


def test_latest_default_run_is_the_newest_on_the_digits(tmp_path):
    assert latest_default_run(tmp_path / "runs") is None
    _run(tmp_path / "runs" / "old", None, 1_000)
    _run(tmp_path / "runs" / "new", None, 2_000)
    _run(tmp_path / "runs" / "pets", "/data/pets", 3_000)  # newer, but not the embedded default
    (tmp_path / "runs" / "broken").mkdir()
    (tmp_path / "runs" / "broken" / "best.pth").write_bytes(b"")  # no config.yaml
    assert latest_default_run(tmp_path / "runs") == tmp_path / "runs" / "new" / "best.pth"


@pytest.mark.parametrize(
    ("checkpoint", "model", "pretrained", "message"),
    [
        ("a.pth", None, "timm", "--checkpoint and --pretrained both name weights"),
        (None, None, "official", "--pretrained official needs --model NAME"),
        (None, None, None, "`bash scripts/main.sh` trains the embedded default"),
    ],
)
def test_demo_flags_that_cannot_work_are_one_line(tmp_path, checkpoint, model, pretrained, message):
    with pytest.raises(UserError, match=message):
        load_demo_classifier(checkpoint, model, pretrained, False, torch.device("cpu"), tmp_path / "runs")


def test_demo_without_a_run_says_how_to_make_one(tmp_path, capsys):
    assert main(["demo", "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: no checkpoint to serve") and "bash scripts/main.sh" in err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--share", "maybe"], "argument --share: expects true or false, got 'maybe'"),
        (["--max-upload-mb", "0"], "--max-upload-mb: must be > 0, got 0"),
        (["--max-megapixels", "-1"], "--max-megapixels: must be > 0, got -1"),
        (["--port", "70000"], "--port: must be within [1, 65535], got 70000"),
    ],
)
def test_bad_demo_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main(["demo", "--runs", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]


def test_demo_without_gradio_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "gradio", None)  # `import gradio` now fails as if it were not installed
    monkeypatch.delitem(sys.modules, "mambaout.demo.app")
    assert main(["demo", "--runs", str(tmp_path)]) == 2
    assert capsys.readouterr().err.strip() == 'error: the demo needs gradio: pip install "mambaout[demo]"'


# --- the page's handlers, called directly ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def page(classifier) -> DemoPage:
    return DemoPage(classifier)


def test_classify_handler_returns_labels_map_and_details(one_thread, page, tmp_path):
    path = tmp_path / "wide.png"
    _photo(90, 30).save(path)
    labels, overlay, details = page.classify(str(path), top=3)
    assert list(labels) == [
        page.labels[i]
        for i in top_classes(page.classifier.model, model_input(load_image(path), page.data()), 3).indices
    ]
    assert overlay.size == (630, 210)  # enlarged by whole pixels to the display size, the photo's aspect
    assert "wide.png" in details and "90×30 px" in details and "cpu (1 thread)" in details
    assert "stage 2 of 4 (4×4 cells)" in details
    labels_64, _, details_64 = page.classify(
        {"path": str(path), "orig_name": "mine.png"}, 3, 64, "optimized", 2, "head"
    )
    assert (
        "mine.png" in details_64 and "seen at 64×64" in details_64 and "stage 4 of 4 (2×2 cells) for *2*" in details_64
    )
    assert len(labels_64) == 3
    assert page.classify(None) == (None, None, "Upload, paste or take a photo, or pick an example below it.")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"top": 11}, "top must be 1 to 10"),
        ({"input_size": 33}, "input size must be one of"),
        ({"model": "compiled"}, "model must be one of"),
        ({"cam_class": 10}, "map of class 10"),
        ({"cam_method": "saliency"}, "no 'saliency' map"),
        ({"cam_stage": "5"}, "at stage '5'"),
    ],
)
def test_classify_handler_refuses_bad_options(page, tmp_path, options, message):
    path = tmp_path / "x.png"
    _photo(8, 8).save(path)
    with pytest.raises(gr.Error, match=message):
        page.classify(str(path), **options)


def _truncated_jpeg(path):
    _photo(64, 64).save(path, format="JPEG")
    path.write_bytes(path.read_bytes()[:400])
    return path


@pytest.mark.parametrize(
    ("write", "reason"),
    [
        (lambda p: p.write_bytes(b""), "empty file"),
        (lambda p: p.write_text("hello"), "not an image"),
        (_truncated_jpeg, "corrupt or truncated"),
    ],
    ids=["empty", "text", "truncated"],
)
def test_unreadable_uploads_become_messages(page, tmp_path, write, reason):
    path = tmp_path / "bad.png"
    write(path)
    with pytest.raises(gr.Error, match=f"bad.png: {reason}"):
        page.classify(str(path))


def test_compare_and_classify_many_handlers(one_thread, page, tmp_path):
    good = tmp_path / "good.png"
    _photo(16, 16).save(good)
    (tmp_path / "bad.jpg").write_bytes(b"nope")
    table = page.compare(str(good), 32, 5)
    assert "| reference |" in table and "| optimize_for_inference |" in table and "Same top 5: yes" in table
    rows = page.classify_many([str(good), str(tmp_path / "bad.jpg")], top=2)
    assert rows[0][0] == "good.png" and rows[0][1] in page.labels and rows[0][2].endswith("%")
    assert rows[1] == ["bad.jpg", "unreadable: not an image", "", ""]
    assert page.classify_many(None) == []
    with pytest.raises(gr.Error, match="pick an image first"):
        page.compare(None)
