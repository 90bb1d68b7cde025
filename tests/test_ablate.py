"""`mambaout ablate`: tiny two-mixer ablations on a synthetic tree through the real engine; results, table and plot;
finished runs skipped, an interrupted run resumed, other settings in the same folder refused."""

import json
import os
import signal

import pytest
import yaml
from train_fixtures import FAST, make_tree

from mambaout.ablate import AblationSettings, results_markdown, run_ablation, summarize
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.train import TrainingInterrupted, load_classifier
from mambaout.train.rundir import RunDir

MIXERS = ("conv", "conv_ssm")


@pytest.fixture(scope="module")
def recipe(tmp_path_factory):
    """A 40k-parameter recipe (1-2 s per run) and a 2-class tree."""
    root = tmp_path_factory.mktemp("ablate")
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump({"model": "mambaout_femto", **FAST}))
    return path, make_tree(root / "data", classes=("a", "b"), train=8, val=4)


def settings(recipe, output, **kw) -> AblationSettings:
    path, tree = recipe
    return AblationSettings(**{"mixers": MIXERS, "config": str(path), "data": str(tree), "epochs": 2, "seeds": 1,
                               "output": str(output), **kw})  # fmt: skip


def test_interrupted_ablation_resumes_and_a_finished_one_is_skipped(recipe, tmp_path, monkeypatch, capsys):
    out = tmp_path / "abl"
    original = RunDir.append_metrics

    def stop_after_the_ssm_runs_first_epoch(self, record):
        original(self, record)
        if self.path.name == "conv_ssm-seed0" and record["epoch"] == 1:
            os.kill(os.getpid(), signal.SIGINT)  # the trainer saves last.pth and stops after this epoch

    monkeypatch.setattr(RunDir, "append_metrics", stop_after_the_ssm_runs_first_epoch)
    with pytest.raises(TrainingInterrupted):
        run_ablation(settings(recipe, out))
    monkeypatch.undo()
    assert [r["mixer"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())] == ["conv"]
    conv_last = out / "runs" / "conv-seed0" / "last.pth"
    conv_mtime = conv_last.stat().st_mtime_ns

    results = run_ablation(settings(recipe, out))  # conv skipped, conv_ssm resumed at epoch 2
    assert conv_last.stat().st_mtime_ns == conv_mtime
    ssm = RunDir(out / "runs" / "conv_ssm-seed0")
    assert [r["epoch"] for r in ssm.read_metrics()] == [1, 2]
    assert [(r["mixer"], r["seed"], r["epochs"]) for r in results] == [("conv", 0, 2), ("conv_ssm", 0, 2)]
    for r in results:
        assert 0 <= r["top5"] <= 100 and r["top1"] <= r["top5"]
        assert r["params"] > 0 and r["macs"] > 0 and r["infer_img_per_s"] > 0 and r["train_img_per_s"] > 0
        assert r["wall_s"] > 0 and r["model_kwargs"]["token_mixer"] == r["mixer"]
    by_mixer = {r["mixer"]: r for r in results}
    assert by_mixer["conv_ssm"]["macs"] > by_mixer["conv"]["macs"]  # the scan's MACs are counted
    # each run is an ordinary checkpoint: it reloads with its mixer
    model = load_classifier(str(out / "runs" / "conv_ssm-seed0" / "best.pth")).model
    assert type(model.stages[0].blocks[0].mixer).__name__ == "SSMMixer"

    table = (out / "results.md").read_text()
    assert "| conv | 1 |" in table and "| conv_ssm | 1 |" in table and "Δ top-1 vs conv" in table
    assert (out / "ablation.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    capsys.readouterr()  # the CLI on the finished ablation trains nothing and prints the table
    argv = ["ablate", "--mixers", ",".join(MIXERS), "--config", str(recipe[0]), "--data", str(recipe[1])]
    assert main([*argv, "--epochs", "2", "--seeds", "1", "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2 run(s) already recorded" in printed and "| conv_ssm | 1 |" in printed
    assert conv_last.stat().st_mtime_ns == conv_mtime

    with pytest.raises(UserError, match="holds an ablation with other settings"):
        run_ablation(settings(recipe, out, epochs=3))


def test_summary_is_mean_and_sample_std_over_seeds_with_the_difference_to_conv():
    def run(mixer, seed, top1):
        speeds = {"train_img_per_s": 50.0, "infer_img_per_s": 200.0 + seed, "wall_s": 9.0, "load": "1.0/1.0/1.0"}
        return {"mixer": mixer, "seed": seed, "top1": top1, "top5": 100.0, "params": 10, "macs": 2_000_000, **speeds}

    results = [run("conv", 0, 90.0), run("conv", 1, 92.0), run("causal_conv", 0, 85.0), run("causal_conv", 1, 86.0)]
    conv, causal = summarize(results)
    assert (conv.mixer, conv.runs, conv.top1, conv.top1_std) == ("conv", 2, 91.0, pytest.approx(2**0.5))
    assert causal.top1 == 85.5 and causal.infer_img_per_s == 200.5
    table = results_markdown(results, "title", "mambaout ablate")
    assert "| causal_conv | 2 | 85.50 ± 0.71 | -5.50 |" in table and "| conv | 2 | 91.00 ± 1.41 | - |" in table


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--mixers", "conv,mamba"], "--mixers mamba: choose from conv, conv_ssm"),
        (["--seeds", "0"], "--seeds: must be >= 1, got 0"),
        (["--model-kwargs", "[1, 2]"], "--model-kwargs: expects a YAML mapping"),
        (["--model-kwargs", "{token_mixer: conv}"], "leave token_mixer out"),
    ],
)
def test_bad_flags_are_one_line(tmp_path, capsys, argv, message):
    assert main(["ablate", *argv, "--output", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
