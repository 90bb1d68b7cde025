"""A training run shared as a hub folder (`mambaout export --format hub`): timm, `mambaout predict` and `eval` read
it with the run's classes and preprocessing, and give the run's own outputs."""

import json

import pytest
import timm
import torch
from hostile_fixtures import assert_refused
from PIL import Image
from timm.data import create_transform, resolve_data_config
from train_fixtures import flags, make_tree

from mambaout.cli import main
from mambaout.data.transforms import eval_transform
from mambaout.train.inference import load_classifier

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    root = tmp_path_factory.mktemp("share")
    tree = make_tree(root / "data", classes=("cat", "dog", "owl"), train=8, val=6)
    # one short epoch: outputs far from one-hot, so any difference in preprocessing shows in the logits
    assert main(["train", "--data", str(tree), "--output", str(root / "run"), *flags(epochs=1, lr="1e-4")]) == 0
    assert main(["export", "--format", "hub", "--checkpoint", str(root / "run" / "best.pth"), "--output",
                 str(root / "hub")]) == 0  # fmt: skip
    return root, tree


def test_timm_reads_the_runs_classes_and_preprocessing_and_gives_its_logits(shared):
    root, tree = shared
    config = json.loads((root / "hub" / "config.json").read_text())
    assert config["pretrained_cfg"]["label_names"] == ["cat", "dog", "owl"]
    assert "tag" not in config["pretrained_cfg"]  # the published weights' tag is not the run's
    run = load_classifier(str(root / "run" / "best.pth"))  # what `mambaout eval` and `predict` run
    model = timm.create_model(f"local-dir:{root / 'hub'}", pretrained=True).eval()
    timm_transform = create_transform(**resolve_data_config(model=model), is_training=False)
    assert model.num_classes == 3 and resolve_data_config(model=model)["input_size"] == (3, 32, 32)
    ours = eval_transform(run.data)
    images = sorted((tree / "val").rglob("*.png"))
    with torch.no_grad():
        for path in images:
            photo = Image.open(path).convert("RGB")
            x_ours, x_timm = ours(photo).unsqueeze(0), timm_transform(photo).unsqueeze(0)
            torch.testing.assert_close(x_timm, x_ours)  # the same pixels in: crop, size, interpolation, mean/std
            torch.testing.assert_close(model(x_timm), run.model(x_ours), rtol=1e-5, atol=1e-5)


def test_mambaout_eval_and_predict_on_the_folder_agree_with_the_run(shared, capsys):
    root, tree = shared
    results = {}
    for name, checkpoint in (("run", root / "run" / "best.pth"), ("hub", f"local-dir:{root / 'hub'}")):
        out = root / f"{name}.json"
        assert main(["eval", "--checkpoint", str(checkpoint), "--data", str(tree / "val"), "--workers", "0",
                     "--json", str(out), "--force"]) == 0  # fmt: skip
        results[name] = json.loads(out.read_text())
        photos = sorted(str(p) for p in (tree / "val").rglob("*.png"))
        preds = root / f"{name}-predictions.json"
        assert main(["predict", *photos, "--checkpoint", str(checkpoint), "--output", str(preds), "--top", "3",
                     "--json"]) == 0  # fmt: skip
        results[name]["predictions"] = [
            [(c["label"], round(c["probability"], 5)) for c in entry["predictions"]]
            for entry in json.loads(preds.read_text())
        ]
    assert results["hub"]["top1"] == results["run"]["top1"] and results["hub"]["loss"] == pytest.approx(
        results["run"]["loss"], rel=1e-5
    )
    assert results["hub"]["predictions"] == results["run"]["predictions"]  # class names and probabilities


def test_transformers_timm_wrapper_reads_the_folder(shared):
    transformers = pytest.importorskip("transformers")  # optional: checked where it is installed
    root, tree = shared
    model = transformers.AutoModelForImageClassification.from_pretrained(str(root / "hub")).eval()
    processor = transformers.AutoImageProcessor.from_pretrained(str(root / "hub"))
    assert model.config.id2label == {0: "cat", 1: "dog", 2: "owl"}
    run = load_classifier(str(root / "run" / "best.pth"))
    photos = [Image.open(p).convert("RGB") for p in sorted((tree / "val").rglob("*.png"))]
    with torch.no_grad():
        theirs = model(**processor(photos, return_tensors="pt")).logits
        ours = run.model(torch.stack([eval_transform(run.data)(p) for p in photos]))
    torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-5)


def test_bad_hub_exports_are_refused(shared, tmp_path, capsys):
    root, _ = shared
    checkpoint = str(root / "run" / "best.pth")
    (tmp_path / "notes.txt").write_text("mine\n")
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "config.json").write_text('{"my": "settings"}\n')
    for argv, named in [
        (["export", "--format", "hub", "--output", str(tmp_path / "x")], "--checkpoint"),
        (["export", "--format", "hub", "--checkpoint", checkpoint, "--output", str(tmp_path / "notes.txt")], "a file"),
        (["export", "--format", "hub", "--checkpoint", checkpoint, "--output", str(tmp_path / "foreign")], "--force"),
        (["export", "--format", "hub", "--checkpoint", checkpoint, "--model", "mambaout_tiny", "--output",
          str(tmp_path / "y")], "mambaout_femto"),
        (["export", "--format", "onnx", "--output", str(tmp_path / "m.onnx")], "--model"),
    ]:  # fmt: skip
        assert_refused(tmp_path, capsys, argv, named)
