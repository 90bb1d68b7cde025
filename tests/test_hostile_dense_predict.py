"""Dense `predict` on real-world inputs, and `--force` against a command's own inputs (issue 22, classes 3 and 4).

Full-size work stays bounded (masks within their boxes, class scores a band of rows at a time) and is still the
function of torchvision's full-size path; odd inputs (a 5000x1 image, /dev/null, a FIFO, a decompression bomb) are
skipped with their reason, or refused in one line when nothing is left; output names never collide; label maps past
256 classes are 16-bit; and no eval writes into the data it reads, even with --force.
"""

import contextlib
import dataclasses
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from dense_fixtures import DETECT, SEGMENT, make_ade, make_coco
from dense_fixtures import flags as dense_flags
from hostile_fixtures import assert_refused
from PIL import Image
from torchvision.models.detection.roi_heads import paste_masks_in_image
from torchvision.utils import draw_segmentation_masks
from train_fixtures import flags, make_tree, write_image

from mambaout.cli import main
from mambaout.dense import inference
from mambaout.dense.data import encode_mask
from mambaout.dense.tasks import Detection
from mambaout.errors import UserError
from mambaout.outputs import check_output
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint


@dataclasses.dataclass
class Workspace:
    root: Path  # what a refused command must leave as it was (no FIFO in it: hashing one would wait forever)
    tree: Path
    coco: Path
    ade: Path
    classify: Path  # the best.pth of each run
    detect: Path
    segment: Path
    seg300: Path  # the segmenter with 300 classes (random classifiers)
    photo: Path
    thin: Path  # 5000x1 pixels
    tall: Path  # 1x5000


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("dense-predict")
    tree = make_tree(root / "tree", classes=("cat", "dog"), train=4, val=2)
    coco, ade = make_coco(root / "coco", train=4, val=1), make_ade(root / "ade", train=4, val=1)
    runs = {name: root / f"{name}-run" for name in ("classify", "detect", "segment")}
    trainings = {
        "classify": ["train", "--data", str(tree), *flags(epochs=1)],
        "detect": ["detect", "train", "--data", str(coco), *dense_flags(DETECT, epochs=1)],
        "segment": ["segment", "train", "--data", str(ade), *dense_flags(SEGMENT, iters=2)],
    }
    for name, argv in trainings.items():
        assert main([*argv, "--output", str(runs[name])]) == 0
    (root / "coco-link").symlink_to(coco)
    seg300 = _with_classes(runs["segment"] / "best.pth", 300, root / "seg300.pth")
    photo = write_image(root / "photo.png", 0, size=48)
    thin, tall = root / "thin.png", root / "tall.png"
    Image.fromarray(np.full((1, 5000, 3), 90, np.uint8)).save(thin)
    Image.fromarray(np.full((5000, 1, 3), 90, np.uint8)).save(tall)
    best = [runs[name] / "best.pth" for name in ("classify", "detect", "segment")]
    return Workspace(root, tree, coco, ade, *best, seg300, photo, thin, tall)


def _with_classes(checkpoint: Path, classes: int, out: Path) -> Path:
    """A copy of a segmentation run's checkpoint whose heads score `classes` classes (seeded random weights)."""
    saved = read_checkpoint(checkpoint)
    generator = torch.Generator().manual_seed(0)
    model = dict(saved["model"])
    for head in ("decode_head", "aux_head"):
        weight = model[f"{head}.classifier.weight"]
        model[f"{head}.classifier.weight"] = torch.randn((classes, *weight.shape[1:]), generator=generator)
        model[f"{head}.classifier.bias"] = torch.zeros(classes)
    names = [f"class_{i}" for i in range(classes)]
    config = saved["config"] | {"num_classes": classes}
    save_checkpoint(saved | {"model": model, "class_names": names, "config": config}, out)
    return out


def _keep_every_detection(model: torch.nn.Module) -> None:
    """No score threshold and no suppression: a tiny detector then gives its 100 detections per image."""
    heads = model.roi_heads
    heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.0, 100


def _fifo(folder: Path) -> Path:
    """`folder` holding one FIFO named like an image: opening it for reading waits for a writer, forever."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "pipe.png")
    return folder


@contextlib.contextmanager
def _deadline(seconds: int) -> Iterator[None]:
    """Fail instead of hanging: SIGALRM interrupts a read that waits forever."""

    def expire(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


# --- 1. full-size work is bounded, and the same function as torchvision's full-size path


def test_box_local_masks_are_torchvisions_pasted_masks(monkeypatch):
    """Crops, their RLE and their drawing equal torchvision's pasted masks, `encode_mask` of the full mask and
    `draw_segmentation_masks`, for boxes across the borders, overlapping, and down to a pixel."""
    monkeypatch.setattr(inference, "_BAND_ELEMENTS", 1000)  # many bands of rows in the blend
    generator = torch.Generator().manual_seed(0)
    height, width, n = 97, 131, 24
    masks = torch.rand(n, 1, 28, 28, generator=generator)
    corner = torch.rand(n, 2, generator=generator) * torch.tensor([width, height]) - 8
    boxes = torch.cat([corner, corner + torch.rand(n, 2, generator=generator) * 90], 1).clamp(min=0)
    boxes[:, 0::2] = boxes[:, 0::2].clamp(max=width)
    boxes[:, 1::2] = boxes[:, 1::2].clamp(max=height)
    full = paste_masks_in_image(masks, boxes, (height, width))[:, 0] > 0.5
    assert (full.sum(0) > 1).any() and full.any((1, 2)).all()  # overlaps, and no empty mask
    crops = inference._mask_crops(masks, boxes, height, width)
    for mask, (crop, left, top) in zip(full, crops, strict=True):
        placed = torch.zeros(height, width, dtype=torch.bool)
        placed[top : top + crop.shape[0], left : left + crop.shape[1]] = crop
        assert torch.equal(placed, mask)
        assert inference._rle(crop.numpy(), left, top, height, width) == encode_mask(mask.numpy())
    pixels = torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)
    colors = [tuple(torch.randint(0, 256, (3,), generator=generator).tolist()) for _ in range(n)]
    drawn = inference._draw_masks(pixels, crops, colors, alpha=0.45)
    assert torch.equal(drawn, draw_segmentation_masks(pixels, full, alpha=0.45, colors=colors))


def test_rle_of_a_crop_is_cocos_rle_of_the_full_mask():
    """Crops at every edge and corner, spanning whole columns or rows, empty or full."""
    rng = np.random.default_rng(0)
    for _ in range(500):
        height, width = (int(v) for v in rng.integers(1, 12, 2))
        h, w = int(rng.integers(0, height + 1)), int(rng.integers(0, width + 1))
        top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
        crop = rng.random((h, w)) < rng.choice([0.0, 0.5, 1.0])
        full = np.zeros((height, width), bool)
        full[top : top + h, left : left + w] = crop
        assert inference._rle(crop, left, top, height, width) == encode_mask(full), (height, width, top, left)


def test_detect_is_the_detector_less_its_paste(ws):
    dense = inference.load_dense_model(str(ws.detect), Detection, torch.device("cpu"))
    _keep_every_detection(dense.model)
    image = torch.rand(3, 150, 230, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ours = inference._detect(dense.model, image)
        reference = dense.model([image])[0]
    assert len(ours["boxes"]) == 100
    for key in ("boxes", "labels", "scores"):
        assert torch.equal(ours[key], reference[key]), key
    assert torch.equal(paste_masks_in_image(ours["masks"], ours["boxes"], (150, 230)), reference["masks"])


@pytest.mark.parametrize(
    ("shape", "size"),
    [((5, 7, 9), (50, 61)), ((150, 16, 12), (300, 211)), ((3, 10, 10), (10, 10)), ((4, 20, 30), (7, 5)),
     ((3, 1, 40), (500, 1)), ((2, 40, 1), (1, 500))],
)  # fmt: skip
def test_label_bands_are_the_full_size_argmax(monkeypatch, shape, size):
    monkeypatch.setattr(inference, "_BAND_ELEMENTS", 997)  # bands of a few rows: every seam is crossed
    scores = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    labels = torch.full(size, -1)
    for top, band in inference._label_bands(scores, *size):
        labels[top : top + len(band)] = band
    assert torch.equal(labels, F.interpolate(scores[None], size=size, mode="bilinear")[0].argmax(0))


_PEAK_MEMORY = """
import json, resource, sys
from pathlib import Path
import torch
from mambaout.dense.inference import load_dense_model, predict_detections, predict_segmentation
from mambaout.dense.tasks import Detection, Segmentation

torch.set_num_threads(1)
detector, segmenter, photo, out = sys.argv[1], sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])
detect = load_dense_model(detector, Detection, torch.device("cpu"))
heads = detect.model.roi_heads
heads.score_thresh, heads.nms_thresh, heads.detections_per_img = 0.0, 1.0, 100
segment = load_dense_model(segmenter, Segmentation, torch.device("cpu"))
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
detections, _ = predict_detections(detect, [photo], {photo: out / "detections.png"}, 0.0)
predict_segmentation(segment, [photo], {photo: out / "segments.png"}, {photo: out / "labels.png"})
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"detections": len(detections), "extra_mib": (peak - before) / 1024}))
"""


def test_peak_memory_stays_bounded_whatever_the_detections_and_classes(ws, tmp_path):
    """A 1200x900 photo with 100 detections and a 300-class segmentation. Pasted full-size masks (100 x 4.3 MB of
    floats, 1.4 GB at the peak) or 300 full-size score maps (1.3 GB) pass the bound; box-local masks and bands of rows
    stay far under it (about 120 MiB, most of it the first forward pass)."""
    photo = tmp_path / "photo.png"
    pixels = np.random.default_rng(0).integers(0, 256, (900, 1200, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(photo, compress_level=1)
    argv = [sys.executable, "-c", _PEAK_MEMORY, str(ws.detect), str(ws.seg300), str(photo), str(tmp_path)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-2000:]
    measured = json.loads(done.stdout.strip().splitlines()[-1])
    assert measured["detections"] == 100
    assert measured["extra_mib"] < 400, measured


# --- 2, 3. odd inputs: one clear line each, never a traceback or a hang


def _refused_cases(ws: Workspace, fifos: Path) -> list[tuple[list[str], str]]:
    """(argv, what the one error line names): inputs of which none can be predicted."""
    detect = ["--checkpoint", str(ws.detect), "--output", str(ws.root / "refused")]
    segment = ["--checkpoint", str(ws.segment), "--output", str(ws.root / "refused")]
    return [
        (["detect", "predict", str(ws.thin), *detect], "too thin for the detector: 5000x1 pixels"),
        (["detect", "predict", str(ws.tall), *detect], "too thin for the detector: 1x5000 pixels"),
        (["detect", "predict", "/dev/null", *detect], "/dev/null (a device or other special file, not a regular"),
        (["segment", "predict", "/dev/null", *segment], "/dev/null (a device or other special file, not a regular"),
        (["detect", "predict", str(fifos), *detect], "pipe.png (a FIFO, not a regular file)"),
        (["segment", "predict", str(fifos), *segment], "pipe.png (a FIFO, not a regular file)"),
        (["segment", "predict", str(fifos / "pipe.png"), *segment], "pipe.png (a FIFO, not a regular file)"),
    ]


def test_inputs_that_cannot_be_predicted_are_refused_in_one_line(ws, capsys, tmp_path):
    """Nothing is written either: not even the output folder."""
    for argv, named in _refused_cases(ws, _fifo(tmp_path / "fifos")):
        with _deadline(60):
            assert_refused(ws.root, capsys, argv, named)


def test_a_decompression_bomb_is_skipped_by_pils_pixel_limit(ws, capsys, monkeypatch):
    """The limit classification predict keeps (`Image.MAX_IMAGE_PIXELS`), here below the 48x48 photo."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    argv = ["segment", "predict", str(ws.photo), "--checkpoint", str(ws.segment), "--output", str(ws.root / "bomb")]
    assert_refused(ws.root, capsys, argv, "photo.png (too large (over 1000 pixels))")


def test_unusable_inputs_beside_good_ones_are_skipped_with_their_reason(ws, capsys, tmp_path):
    fifos = _fifo(tmp_path / "fifos")
    out = tmp_path / "out"
    argv = ["detect", "predict", str(ws.photo), str(ws.thin), "/dev/null", str(fifos), "--checkpoint", str(ws.detect),
            "--output", str(out)]  # fmt: skip
    capsys.readouterr()
    with _deadline(60):
        assert main(argv) == 0
    err = capsys.readouterr().err
    assert "Traceback" not in err
    skipped = [line for line in err.splitlines() if line.startswith("warning: skipped")]
    assert len(skipped) == 1 and skipped[0].startswith("warning: skipped 3 files: "), err
    for path, reason in ((ws.thin, "too thin"), ("/dev/null", "a device"), (fifos / "pipe.png", "a FIFO")):
        assert f"{path} ({reason}" in skipped[0]
    assert sorted(p.name for p in out.iterdir()) == ["photo.png", "predictions.json"]


def test_segmentation_labels_thin_images_at_their_own_size(ws, tmp_path):
    """The segmenter takes any aspect ratio (its resize keeps a pixel): these are predicted, not skipped."""
    out = tmp_path / "out"
    argv = ["segment", "predict", str(ws.thin), str(ws.tall), "--checkpoint", str(ws.segment), "--output", str(out)]
    assert main(argv) == 0
    entries = json.loads((out / "predictions.json").read_text())
    assert [(e["width"], e["height"]) for e in entries] == [(5000, 1), (1, 5000)]
    for entry in entries:
        size = (entry["width"], entry["height"])
        assert Image.open(entry["label_map"]).size == Image.open(entry["overlay"]).size == size


# --- 4. output names


def test_output_names_are_unique_and_the_same_on_every_run(ws, tmp_path):
    """A stem in two folders, one that is another's numbered name, one that is (listed before) another's label-map
    name, and one that differs only in case: each input gets PNGs of its own (told apart here by their sizes)."""
    inputs = tmp_path / "in"
    for i, name in enumerate(("a/x_labels.png", "b/x.png", "c/x.png", "d/x_1.png", "e/X.png")):
        write_image(inputs / name, i, size=16 + 4 * i)
    out = tmp_path / "out"
    argv = ["segment", "predict", str(inputs), "--checkpoint", str(ws.segment), "--output", str(out)]
    assert main(argv) == 0
    names = _png_names(out)
    assert len(names) == 5 and len({png.casefold() for pair in names.values() for png in pair}) == 10
    assert len(list(out.glob("*.png"))) == 10
    for source, pngs in names.items():
        assert {Image.open(png).size for png in pngs} == {Image.open(source).size}
    assert main(argv) == 0  # again into the same folder: the same names, its own PNGs replaced
    assert _png_names(out) == names
    detections = tmp_path / "detections"
    assert main(["detect", "predict", str(inputs), "--checkpoint", str(ws.detect), "--output", str(detections)]) == 0
    assert len(list(detections.glob("*.png"))) == 5


def _png_names(out: Path) -> dict[str, tuple[str, str]]:
    """Input -> (overlay, label map), as a segmentation's predictions.json names them."""
    return {e["file_name"]: (e["overlay"], e["label_map"]) for e in json.loads((out / "predictions.json").read_text())}


# --- 5. label maps past 256 classes


def test_label_maps_past_256_classes_are_16_bit_and_read_back_as_predicted(ws, tmp_path):
    out = tmp_path / "out"
    assert main(["segment", "predict", str(ws.photo), "--checkpoint", str(ws.seg300), "--output", str(out)]) == 0
    (entry,) = json.loads((out / "predictions.json").read_text())
    saved = Image.open(entry["label_map"])
    labels = np.array(saved)
    assert saved.mode == "I;16" and labels.min() <= 255 < labels.max()
    values, counts = np.unique(labels, return_counts=True)
    # the shares were counted before saving: a label that wrapped (300 -> 44) would read back as another class
    assert {f"class_{v}": round(100 * c / labels.size, 2) for v, c in zip(values, counts, strict=True)} == entry[
        "class_percent"
    ]
    assert main(["segment", "predict", str(ws.photo), "--checkpoint", str(ws.segment), "--output", str(out)]) == 0
    assert Image.open(out / "photo_labels.png").mode == "L"  # 3 classes: 8-bit, as before


# --- 6. --force replaces a foreign output, never an input


def _force_cases(ws: Workspace) -> list[tuple[list[str], str]]:
    """(argv, what the error names): eval outputs onto or into the data each eval reads, all with --force."""
    detect = ["detect", "eval", "--checkpoint", str(ws.detect), "--workers", "0", "--force"]
    segment = ["segment", "eval", "--checkpoint", str(ws.segment), "--workers", "0", "--force"]
    classify = ["eval", "--checkpoint", str(ws.classify), "--workers", "0", "--force"]
    annotations = ws.coco / "annotations" / "instances_val2017.json"
    image = ws.tree / "val" / "cat" / "000.png"
    return [
        ([*detect, "--data", str(ws.coco), "--json", str(annotations)], "inside the input folder"),
        ([*detect, "--json", str(annotations)], "inside the input folder"),  # the run's own data
        ([*detect, "--json", str(ws.root / "coco-link" / "annotations" / "new.json")], "inside the input folder"),
        ([*detect, "--json", str(ws.coco / "val2017" / "001.png")], "inside the input folder"),
        ([*segment, "--json", str(ws.ade / "classes.txt")], "inside the input folder"),
        ([*segment, "--data", str(ws.ade), "--json", str(ws.ade / "results.json")], "inside the input folder"),
        ([*classify, "--data", str(ws.tree), "--json", str(image)], "inside the input folder"),
        ([*classify, "--json", str(image)], "inside the input folder"),  # the run's own validation split
    ]


def test_force_never_writes_into_the_data_an_eval_reads(ws, capsys):
    for argv, named in _force_cases(ws):
        assert_refused(ws.root, capsys, argv, named)


def test_force_still_replaces_a_foreign_file_outside_the_data(ws, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("my notes\n")
    argv = ["detect", "eval", "--checkpoint", str(ws.detect), "--workers", "0", "--json", str(notes), "--force"]
    assert main(argv) == 0
    assert json.loads(notes.read_text())["task"] == "detection"


def test_force_onto_a_hard_link_of_an_input_replaces_the_link_not_the_input(ws, tmp_path):
    annotations = ws.coco / "annotations" / "instances_val2017.json"
    before = annotations.read_bytes()
    link = tmp_path / "link.json"
    os.link(annotations, link)  # the same file under a name outside the data: a path check cannot see it
    argv = ["detect", "eval", "--checkpoint", str(ws.detect), "--workers", "0", "--json", str(link), "--force"]
    assert main(argv) == 0
    assert json.loads(link.read_text())["task"] == "detection"  # a new file under the link's name (atomic rename)
    assert annotations.read_bytes() == before and annotations.stat().st_nlink == 1


def test_check_output_refuses_any_path_inside_an_input_folder(tmp_path):
    data = tmp_path / "data"
    (data / "sub").mkdir(parents=True)
    (tmp_path / "data2").mkdir()
    (tmp_path / "link").symlink_to(data)
    for path in (data / "new.json", data / "sub" / "deeper" / "x.json", tmp_path / "link" / "x.json"):
        with pytest.raises(UserError, match="inside the input folder"):
            check_output(path, "--json", "eval-json", inputs=[data], force=True)
    beside = tmp_path / "data2" / "x.json"  # a sibling whose name starts like the folder's is outside it
    assert check_output(beside, "--json", "eval-json", inputs=[data]) == beside
