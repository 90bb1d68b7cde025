"""`mambaout train / eval / predict / plot`: what a user sees, one-line errors, bad data, outputs on disk."""

import csv
import io
import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image
from train_fixtures import flags, make_tree, write_image

from mambaout.cli import main
from mambaout.models import create_model


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny 3-class run (2 epochs) and its data."""
    root = tmp_path_factory.mktemp("cli")
    tree = make_tree(root / "data", classes=("cat", "dog", "fox"), train=8, val=4)
    assert main(["train", "--data", str(tree), "--output", str(root / "run"), *flags(epochs=3, lr=3e-3)]) == 0
    return tree, root / "run"


def _one_line_error(capsys, code: int) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--batch-size", "0"], "--batch-size must be >= 1 (got 0)"),
        (["--epochs", "ten"], "--epochs expects an integer, got 'ten'"),
        (["--amp", "fp8"], "--amp must be one of"),
        (["--model", "mambaout_large"], "--model: unknown model 'mambaout_large'"),
        (["--config", "nope"], "--config: no file nope and no recipe named 'nope'"),
        (["--resume", "auto"], "--resume auto needs --output RUN_DIR"),
        (["--data", "/no/such/folder"], "--data /no/such/folder: no train/ folder"),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(capsys, tmp_path, argv, message):
    output = [] if "--resume" in argv else ["--output", str(tmp_path / "r")]
    line = _one_line_error(capsys, main(["train", *output, *argv]))
    assert message in line
    assert not (tmp_path / "r" / "last.pth").exists()


def test_bad_config_key_is_one_line(tmp_path, capsys):
    (tmp_path / "mine.yaml").write_text("model: mambaout_femto\nwarmup: 5\n")
    line = _one_line_error(capsys, main(["train", "--config", str(tmp_path / "mine.yaml")]))
    assert "unknown config key 'warmup'" in line and "did you mean 'warmup_lr'" in line


def test_mismatched_val_classes_are_one_line(tmp_path, capsys):
    tree = make_tree(tmp_path / "data", classes=("a", "b"), train=2, val=1)
    write_image(tree / "val" / "zebra" / "0.png", 0)
    line = _one_line_error(capsys, main(["train", "--data", str(tree), "--output", str(tmp_path / "r"), *flags()]))
    assert "has classes the training set lacks: zebra" in line


def test_bad_files_are_skipped_counted_and_reported_once(tmp_path, capsys):
    tree = make_tree(tmp_path / "data", classes=("a", "b"), train=6, val=2)
    (tree / "train" / "a" / "zero.jpg").write_bytes(b"")
    (tree / "train" / "b" / "words.png").write_text("hello")
    write_image(tree / "train" / "b" / "cut.jpg", 1, size=64)
    (tree / "train" / "b" / "cut.jpg").write_bytes((tree / "train" / "b" / "cut.jpg").read_bytes()[:250])
    (tree / "val" / "a" / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    Image.fromarray((torch.rand(16, 16) * 65535).numpy().astype("uint16")).save(tree / "train" / "a" / "deep.png")
    Image.new("CMYK", (16, 16), (0, 200, 200, 0)).save(tree / "train" / "a" / "print.jpg")
    Image.new("RGB", (16, 16), (200, 30, 30)).save(tree / "train" / "a" / "wrong_ext.jpg", format="PNG")
    code = main(["train", "--data", str(tree), "--output", str(tmp_path / "r"), *flags(epochs=3)])
    assert code == 0
    err = capsys.readouterr().err
    assert err.count("skipped 3 unreadable files in") == 1 and err.count("skipped 1 unreadable files in") == 1
    assert "zero.jpg (empty file)" in err and "words.png (not an image)" in err and "cut.jpg (corrupt" in err
    metrics = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == 3


def test_nothing_readable_is_one_line(tmp_path, capsys):
    tree = make_tree(tmp_path / "data", classes=("a",), train=0, val=1)
    (tree / "train" / "a").mkdir(parents=True)
    (tree / "train" / "a" / "x.jpg").write_text("nope")
    line = _one_line_error(capsys, main(["train", "--data", str(tree), "--output", str(tmp_path / "r"), *flags()]))
    assert "no readable image in" in line and "x.jpg (not an image)" in line


def test_eval_prints_and_writes_json(trained, capsys):
    tree, run = trained
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--data", str(tree / "val"), "--workers", "0"]) == 0
    out = capsys.readouterr().out
    assert "top-1" in out and "top-5" in out and "images/s" in out
    record = json.loads((run / "best.eval.json").read_text())
    assert record["images"] == 12 and record["top5"] == 100.0 and record["input_size"] == 32
    assert {"top1", "loss", "images_per_sec", "model", "checkpoint"} <= record.keys()
    # without --data: the run's own validation split
    assert main(["eval", "--checkpoint", str(run / "last.pth"), "--workers", "0", "--json", str(run / "e.json")]) == 0
    assert json.loads((run / "e.json").read_text())["data"] == str(tree / "val")


def test_predict_names_the_run_classes_in_text_json_and_csv(trained, tmp_path, capsys):
    tree, run = trained
    images = [str(tree / "val" / "dog" / "000.png"), str(tree / "val" / "fox")]
    assert main(["predict", *images, "--checkpoint", str(run / "best.pth"), "--top", "2"]) == 0
    text = capsys.readouterr().out
    assert text.splitlines()[0].endswith("dog/000.png") and len(text.splitlines()) == 5 * 3
    assert main(["predict", *images, "--checkpoint", str(run / "best.pth"), "--top", "2", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert len(results) == 5 and [p["rank"] for p in results[0]["predictions"]] == [1, 2]
    assert all(p["label"] in ("cat", "dog", "fox") for r in results for p in r["predictions"])
    (tmp_path / "broken.jpg").write_text("not an image")
    out = tmp_path / "p.csv"
    argv = ["predict", images[0], str(tmp_path / "broken.jpg"), "--checkpoint", str(run / "best.pth")]
    assert main([*argv, "--csv", "--output", str(out)]) == 0
    rows = list(csv.DictReader(io.StringIO(out.read_text())))
    assert len(rows) == 3 and rows[0]["path"].endswith("000.png") and float(rows[0]["probability"]) > 0
    assert "skipped 1 unreadable files" in capsys.readouterr().err


def test_predict_with_imagenet_weights_names_imagenet_classes(tmp_path, capsys):
    torch.save(create_model("mambaout_femto").state_dict(), tmp_path / "femto.pth")
    image = write_image(tmp_path / "x.png", 0)
    assert main(["predict", str(image), "--model", "mambaout_femto", "--checkpoint", str(tmp_path / "femto.pth")]) == 0
    from mambaout.data import imagenet_class_names

    labels = [line.split("%", 1)[1].strip() for line in capsys.readouterr().out.splitlines()[1:]]
    assert len(labels) == 5 and set(labels) <= set(imagenet_class_names())


def test_predict_errors_are_one_line(trained, tmp_path, capsys):
    _, run = trained
    line = _one_line_error(capsys, main(["predict", str(tmp_path / "none.png"), "--checkpoint", str(run / "best.pth")]))
    assert "no such file or folder" in line
    (tmp_path / "a.txt").write_text("x")
    line = _one_line_error(capsys, main(["predict", str(tmp_path / "a.txt"), "--checkpoint", str(run / "best.pth")]))
    assert "no readable image" in line
    image = write_image(tmp_path / "x.png", 0)
    line = _one_line_error(capsys, main(["predict", str(image), "--checkpoint", str(tmp_path / "a.txt")]))
    assert "--model is needed" in line or "not a PyTorch" in line


def test_plot_draws_the_curves(trained, tmp_path, capsys):
    _, run = trained
    assert main(["plot", str(run)]) == 0
    image = Image.open(run / "curves.png")
    assert image.format == "PNG" and image.size[0] > 1000
    assert "3 epochs" in capsys.readouterr().out
    line = _one_line_error(capsys, main(["plot", str(tmp_path)]))
    assert "metrics.jsonl does not exist" in line


def test_help_documents_the_lr_rule_and_fine_tuning(capsys):
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    assert "per 1024 images of global batch" in text and "--pretrained official" in text and "--resume" in text


# --- evaluation folders matched by name, results kept, names that are not UTF-8 ------------------------------------


def test_eval_matches_folders_by_name_and_refuses_unknown_ones(trained, tmp_path, capsys):
    tree, run = trained
    best = str(run / "best.pth")
    shutil.copytree(tree / "val" / "dog", tmp_path / "only_dog" / "dog")  # one folder: sorted position 0 is "cat"
    assert main(["eval", "--checkpoint", best, "--data", str(tmp_path / "only_dog"), "--workers", "0"]) == 0
    record = json.loads((run / "best.eval.json").read_text())
    assert record["images"] == 4 and record["top1"] == 100.0  # labelled dog, as the model says
    shutil.copytree(tree / "val" / "fox", tmp_path / "zoo" / "zebra")
    shutil.copytree(tree / "val" / "dog", tmp_path / "zoo" / "dog")
    line = _one_line_error(capsys, main(["eval", "--checkpoint", best, "--data", str(tmp_path / "zoo")]))
    assert "class folders the model does not know: zebra" in line and "--class-map" in line
    argv = ["eval", "--checkpoint", best, "--data", str(tmp_path / "zoo"), "--workers", "0", "--json"]
    assert main([*argv, str(tmp_path / "zoo.json"), "--class-map", "zebra=fox"]) == 0
    assert json.loads((tmp_path / "zoo.json").read_text())["top1"] == 100.0
    assert main([*argv, str(tmp_path / "root.json"), "--data", str(tree)]) == 0  # a dataset root: its val/
    record = json.loads((tmp_path / "root.json").read_text())
    assert record["data"] == str(tree / "val") and record["images"] == 12


def test_eval_prints_its_figures_even_when_the_results_file_fails(trained, tmp_path, capsys):
    _, run = trained
    code = main(
        ["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(tmp_path / "no/e.json")]
    )
    captured = capsys.readouterr()
    assert code == 2 and "top-1 100.00%" in captured.out and "cannot write" in captured.err


def test_predict_writes_names_that_are_not_utf8_back_as_their_bytes(trained, tmp_path):
    _, run = trained
    folder = os.fsencode(tmp_path / "photos")
    os.mkdir(folder)
    name = os.path.join(folder, b"caf\xe9.png")  # Latin-1, as old cameras and archives write
    write_image(Path(os.fsdecode(name)), 0)
    out = tmp_path / "p.csv"
    assert (
        main(["predict", os.fsdecode(folder), "--checkpoint", str(run / "best.pth"), "--csv", "--output", str(out)])
        == 0
    )
    assert b"caf\xe9.png" in out.read_bytes()


def test_plot_and_resume_skip_a_damaged_metrics_line(trained, tmp_path, capsys):
    _, run = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    with (copy / "metrics.jsonl").open("ab") as f:
        f.write(b'{"epoch": 4, "train_loss": \xff\xfe cut')
    assert main(["plot", str(copy), "--output", str(tmp_path / "c.png")]) == 0
    assert "skipped 1 damaged lines" in capsys.readouterr().err
    assert main(["train", "--output", str(copy), "--resume", "auto", "--epochs", "4", "--workers", "0"]) == 0
    lines = (copy / "metrics.jsonl").read_bytes().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2, 3, 4]
