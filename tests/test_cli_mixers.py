"""A model trained with another token mixer goes through `mambaout train / eval / predict / export` end to end: the
mixer name lives in the run config's model_kwargs and comes back from the checkpoint."""

import json

import pytest
import torch
from train_fixtures import flags, make_tree

import mambaout
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.export import export_model, load_exported
from mambaout.layers import AttentionMixer, SSMMixer
from mambaout.models import MambaOut
from mambaout.train import load_classifier
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint

TINY_SSM = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], token_mixer: conv_ssm, mixer_kwargs: {scan_directions: 2}}"


@pytest.fixture(scope="module")
def ssm_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("mixers")
    tree = make_tree(root / "data", classes=("a", "b"), train=8, val=4)
    argv = ["train", "--data", str(tree), "--output", str(root / "run"), *flags(epochs=1, model_kwargs=TINY_SSM)]
    assert main(argv) == 0
    return tree, root / "run"


def test_the_checkpoint_keeps_the_mixer_and_eval_and_predict_rebuild_it(ssm_run, tmp_path, capsys):
    tree, run = ssm_run
    saved = read_checkpoint(run / "best.pth")
    assert saved["config"]["model_kwargs"]["token_mixer"] == "conv_ssm"
    classifier = load_classifier(str(run / "best.pth"))
    mixers = [m for m in classifier.model.modules() if isinstance(m, SSMMixer)]
    assert len(mixers) == 4 and all(len(m.orders) == 2 for m in mixers)
    record = tmp_path / "eval.json"
    assert main(["eval", "--checkpoint", str(run / "best.pth"), "--workers", "0", "--json", str(record)]) == 0
    assert json.loads(record.read_text())["top1"] == pytest.approx(saved["metrics"]["val_top1"])
    capsys.readouterr()
    image = next((tree / "val" / "a").iterdir())
    assert main(["predict", str(image), "--checkpoint", str(run / "best.pth"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["predictions"][0]["label"] in ("a", "b")


def test_create_model_with_checkpoint_path_builds_the_runs_mixer(ssm_run):
    _, run = ssm_run
    model = mambaout.create_model("mambaout_femto", checkpoint_path=run / "best.pth").eval()
    mixers = [m for m in model.modules() if isinstance(m, SSMMixer)]
    assert len(mixers) == 4 and all(len(m.orders) == 2 for m in mixers)  # the run's mixer, as it was trained
    assert model.model_args["token_mixer"] == "conv_ssm"  # what save_pretrained records for rebuilding
    reference = load_classifier(str(run / "best.pth")).model
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=0)
    # a given argument wins over the run's: here one that does not fit its weights
    with pytest.raises(UserError, match="does not fit"):
        mambaout.create_model("mambaout_femto", checkpoint_path=run / "best.pth", dims=[16, 16, 24, 32])


def test_a_run_checkpoint_whose_model_kwargs_cannot_build_is_one_line(ssm_run, tmp_path):
    _, run = ssm_run
    saved = read_checkpoint(run / "best.pth")
    for bad, says in (({"dims": "wide"}, "cannot build mambaout_femto from its model_args"), (["x"], "not a mapping")):
        path = tmp_path / "bad.pth"
        save_checkpoint({**saved, "config": {**saved["config"], "model_kwargs": bad}}, path)
        with pytest.raises(UserError, match=f"^{path}: .*{says}"):
            mambaout.create_model("mambaout_femto", checkpoint_path=path)


def test_resume_auto_continues_the_mixer_run(ssm_run):
    tree, run = ssm_run
    argv = [
        "train",
        "--data",
        str(tree),
        "--output",
        str(run),
        "--resume",
        "auto",
        *flags(epochs=2, model_kwargs=TINY_SSM),
    ]
    assert main(argv) == 0
    assert read_checkpoint(run / "last.pth")["epoch"] == 2


def test_export_rebuilds_the_mixer_from_the_run_checkpoint(ssm_run, tmp_path, capsys):
    _, run = ssm_run
    out = tmp_path / "ssm.ts"
    argv = ["export", "--model", "mambaout_femto", "--checkpoint", str(run / "best.pth"), "--format", "torchscript"]
    assert main([*argv, "--output", str(out), "--img-size", "64"]) == 0
    assert "verified" in capsys.readouterr().out
    model = load_classifier(str(run / "best.pth")).model
    x = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        assert (load_exported(out, "torchscript")(x) - model(x)).abs().max() <= 1e-4


def test_the_ssm_exports_as_an_exported_program(tmp_path):
    model = MambaOut(depths=(1,), dims=(8,), num_classes=3, token_mixer="conv_ssm").eval()
    report = export_model(model, "exported-program", tmp_path / "ssm.pt2", img_size=(64, 64))
    assert report.max_abs_diff <= 1e-4 and "batch" in report.dynamic


def test_onnx_export_of_the_ssm_is_refused_in_one_line(ssm_run, tmp_path, capsys):
    _, run = ssm_run
    argv = ["export", "--model", "mambaout_femto", "--checkpoint", str(run / "best.pth"), "--format", "onnx"]
    assert main([*argv, "--output", str(tmp_path / "m.onnx")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "selective-scan (SSM) token mixer has no ONNX operator" in err[0]
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("mixer", ["causal_conv", "attention", "causal_attention"])
def test_other_mixers_export_to_onnx(tmp_path, mixer):
    model = MambaOut(depths=(1, 1), dims=(16, 32), num_classes=5, token_mixer=mixer).eval()
    if "attention" in mixer:
        assert isinstance(model.stages[0].blocks[0].mixer, AttentionMixer)
    report = export_model(model, "onnx", tmp_path / "m.onnx", img_size=(64, 64))
    assert report.max_abs_diff <= 1e-4
