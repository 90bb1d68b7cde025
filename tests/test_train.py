"""mambaout.train: the engine learns, accumulation is exact, checkpoints hold everything, NaN stops cleanly."""

import json
import math

import pytest
import torch
from torch.utils.checkpoint import checkpoint
from train_fixtures import flags, make_tree

import mambaout
from mambaout.cli import main
from mambaout.models import mambaout as mambaout_module
from mambaout.train import trainer
from mambaout.train.checkpoint import read_checkpoint
from mambaout.weights.io import read_file


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    return make_tree(tmp_path_factory.mktemp("data"), classes=("a", "b", "c"), train=8, val=4)


def _train(tree, out, **overrides):
    return main(["train", "--data", str(tree), "--output", str(out), *flags(**overrides)])


def _weights(path):
    return read_checkpoint(path)["model"]


def test_a_run_learns_and_writes_its_records(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", epochs=4, lr=3e-3) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3, 4]
    for key in ("train_loss", "val_loss", "val_top1", "val_top5", "lr", "images_per_sec", "elapsed_s"):
        assert isinstance(lines[-1][key], float), key
    assert lines[-1]["val_top1"] == 100.0 and lines[-1]["train_loss"] < lines[0]["train_loss"]
    last = read_checkpoint(tmp_path / "run" / "last.pth")  # weights_only=True
    assert {"model", "ema", "optimizer", "scaler", "rng", "epoch", "step", "config", "class_names"} <= (last.keys())
    assert (last["epoch"], last["step"], last["class_names"], last["model_name"]) == (
        4,
        24,
        ["a", "b", "c"],
        "mambaout_femto",
    )
    assert last["config"]["lr"] == 3e-3 and last["config"]["input_size"] == 32 and last["config"]["num_classes"] == 3
    best = read_checkpoint(tmp_path / "run" / "best.pth")
    assert "optimizer" not in best and best["metrics"]["val_top1"] == 100.0
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "global batch 4 = 4 per process" in saved and "lr: 0.003" in saved
    out = capsys.readouterr().out
    assert "epoch 4/4" in out and "best val top-1 100.00%" in out
    assert "step: fused adamw update, forward/backward in pieces of 4 images, split linears on" in out


def test_gradient_accumulation_equals_the_big_batch(tree, tmp_path):
    common = {"opt": "sgd", "lr": "0.05", "weight_decay": "0", "smoothing": "0", "epochs": "1"}
    assert _train(tree, tmp_path / "big", batch_size=8, **common) == 0
    assert _train(tree, tmp_path / "accum", batch_size=4, accum_steps=2, **common) == 0
    big, accum = _weights(tmp_path / "big" / "last.pth"), _weights(tmp_path / "accum" / "last.pth")
    for name in big:
        torch.testing.assert_close(accum[name], big[name], rtol=1e-5, atol=1e-6, msg=name)


def test_ema_is_kept_evaluated_and_loadable(tree, tmp_path):
    assert _train(tree, tmp_path / "run", ema="true", ema_decay="0.5") == 0
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_top1_ema", "val_top5_ema", "val_loss_ema"} <= record.keys()
    checkpoint = read_file(tmp_path / "run" / "last.pth")
    assert checkpoint["ema"].keys() == checkpoint["model"].keys()
    assert any(not torch.equal(checkpoint["ema"][k], checkpoint["model"][k]) for k in checkpoint["model"])


class _NanAfter(torch.nn.Module):
    """A loss that turns NaN on its 3rd call."""

    calls = 0

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, logits, target):
        type(self).calls += 1
        loss = torch.nn.functional.cross_entropy(logits, target)
        return loss * float("nan") if type(self).calls >= 3 else loss


def test_nan_loss_stops_and_leaves_the_last_good_checkpoint(tree, tmp_path, monkeypatch, capsys):
    assert _train(tree, tmp_path / "run", epochs=1) == 0
    records = ("last.pth", "best.pth", "metrics.jsonl")  # config.yaml is rewritten: the resumed run has 3 epochs
    before = {name: (tmp_path / "run" / name).read_bytes() for name in records}
    monkeypatch.setattr(trainer, "LabelSmoothingCrossEntropy", _NanAfter)
    code = main(["train", "--output", str(tmp_path / "run"), "--resume", "auto", "--epochs", "3"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: loss is nan at epoch 2, step 3 of 6")
    assert f"{tmp_path / 'run' / 'last.pth'} holds the last good state" in err[0]
    assert {name: (tmp_path / "run" / name).read_bytes() for name in records} == before


def test_nan_loss_before_any_checkpoint_says_so(tree, tmp_path, monkeypatch, capsys):
    _NanAfter.calls = 0
    monkeypatch.setattr(trainer, "LabelSmoothingCrossEntropy", _NanAfter)
    assert _train(tree, tmp_path / "run", epochs=1) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoint was written yet" in err[0] and "last good state" not in err[0]
    assert not (tmp_path / "run" / "last.pth").exists()


def test_resume_refuses_a_damaged_last_pth_and_offers_best(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", epochs=2) == 0
    last = tmp_path / "run" / "last.pth"
    last.write_bytes(last.read_bytes()[:1000])  # cut short, as by a full disk under another tool
    code = main(["train", "--output", str(tmp_path / "run"), "--resume", "auto"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "truncated or corrupt" in err[0]
    assert "best.pth (epoch" in err[0] and "--pretrained" in err[0]


def test_resume_may_change_the_schedule_and_says_what_changed(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", epochs=1) == 0
    capsys.readouterr()
    assert main(["train", "--output", str(tmp_path / "run"), "--resume", "auto", "--epochs", "3"]) == 0
    assert "resuming with changed settings: --epochs 1 -> 3" in capsys.readouterr().out
    lines = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == [1, 2, 3]
    # the cosine runs over the new length: mid-way it is far above the end of the old one-epoch schedule (min_lr)
    assert lines[0]["lr"] == pytest.approx(1e-5) and lines[1]["lr"] > 10 * lines[0]["lr"]


def test_an_existing_run_is_never_overwritten(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", epochs=1) == 0
    before = {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()}
    assert _train(tree, tmp_path / "run", epochs=1) == 2
    assert "already holds a run: continue it with --resume auto" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in (tmp_path / "run").iterdir()} == before
    # resuming a finished run does nothing and says so
    assert main(["train", "--output", str(tmp_path / "run"), "--resume", "auto"]) == 0
    assert "already finished its 1 epochs" in capsys.readouterr().out


def test_fine_tuning_replaces_the_head_and_keeps_the_backbone(tree, tmp_path):
    assert _train(tree, tmp_path / "source", epochs=1) == 0
    two = make_tree(tmp_path / "two", classes=("x", "y"), train=4, val=2)
    with pytest.warns(UserWarning, match="its classifier has 3 classes and the model 2"):
        argv = ["train", "--data", str(two), "--output", str(tmp_path / "tuned"), *flags(epochs=1, lr=1e-12)]
        argv += ["--pretrained", str(tmp_path / "source" / "best.pth"), "--num-classes", "2", "--weight-decay", "0"]
        code = main(argv)
    assert code == 0
    source, tuned = _weights(tmp_path / "source" / "best.pth"), _weights(tmp_path / "tuned" / "last.pth")
    assert tuned["head.fc.weight"].shape[0] == 2 and source["head.fc.weight"].shape[0] == 3
    torch.testing.assert_close(tuned["stem.conv1.weight"], source["stem.conv1.weight"])


def test_num_classes_must_match_the_folders(tree, tmp_path, capsys):
    assert _train(tree, tmp_path / "run", num_classes=5) == 2
    assert "error: --num-classes 5 does not match the 3 class folders" in capsys.readouterr().err


def test_micro_batches_and_split_linears_give_the_plain_update(tree, tmp_path):
    # 8 images per batch run as pieces of 3, 3 and 2 through split-linear blocks: the same SGD update as one pass
    common = {"opt": "sgd", "lr": "0.05", "weight_decay": "0", "smoothing": "0", "epochs": "1", "batch_size": 8}
    assert _train(tree, tmp_path / "plain", micro_batch=8, split_linears="off", **common) == 0
    assert _train(tree, tmp_path / "fast", micro_batch=3, split_linears="on", **common) == 0
    plain, fast = _weights(tmp_path / "plain" / "last.pth"), _weights(tmp_path / "fast" / "last.pth")
    for name in plain:
        torch.testing.assert_close(fast[name], plain[name], rtol=1e-5, atol=1e-6, msg=name)
    plain_log = json.loads((tmp_path / "plain" / "metrics.jsonl").read_text())
    fast_log = json.loads((tmp_path / "fast" / "metrics.jsonl").read_text())
    assert fast_log["train_loss"] == pytest.approx(plain_log["train_loss"], rel=1e-5)


def test_the_fused_optimizer_gives_adamws_update_and_falls_back(tree, tmp_path):
    assert _train(tree, tmp_path / "fused", epochs=1) == 0
    assert _train(tree, tmp_path / "plain", epochs=1, fused_optimizer="false") == 0
    fused, plain = read_checkpoint(tmp_path / "fused" / "last.pth"), read_checkpoint(tmp_path / "plain" / "last.pth")
    assert fused["optimizer"]["param_groups"][0]["fused"] is True
    assert not plain["optimizer"]["param_groups"][0]["fused"]
    for name in plain["model"]:
        torch.testing.assert_close(fused["model"][name], plain["model"][name], rtol=1e-4, atol=1e-5, msg=name)
    # timm's LAMB has no fused step: the run uses the plain one
    assert _train(tree, tmp_path / "lamb", epochs=1, opt="lamb") == 0
    assert "fused" not in read_checkpoint(tmp_path / "lamb" / "last.pth")["optimizer"]["param_groups"][0]


def test_bf16_channels_last_clipping_and_checkpointing_train(tree, tmp_path, monkeypatch):
    # from known weights with plain SGD (lr 0.5, no momentum or decay), every step moves the weights by at most
    # lr × the clipped gradient norm
    init = mambaout.create_model("mambaout_femto", depths=[1, 1, 1, 1], dims=[8, 16, 24, 32], num_classes=3)
    torch.save(init.state_dict(), tmp_path / "init.pth")
    recomputed = []

    def counted(function, *args, **kwargs):
        recomputed.append(type(function).__name__)
        return checkpoint(function, *args, **kwargs)

    monkeypatch.setattr(mambaout_module, "checkpoint", counted)
    sgd = {"opt": "momentum", "momentum": "0", "weight_decay": "0", "lr": "0.5", "epochs": "1", "ema": "false"}
    options = {"amp": "bf16", "channels_last": "true", "pretrained": str(tmp_path / "init.pth"), **sgd}
    assert _train(tree, tmp_path / "clipped", clip_grad="1e-4", grad_checkpointing="true", **options) == 0
    steps = len(recomputed)
    assert _train(tree, tmp_path / "free", **options) == 0
    assert len(recomputed) == steps > 0  # blocks ran under torch's checkpoint only when asked to

    def moved(run: str) -> float:
        weights = _weights(tmp_path / run / "last.pth")
        return sum((weights[k].float() - v).square().sum() for k, v in init.state_dict().items()).sqrt().item()

    record = json.loads((tmp_path / "clipped" / "metrics.jsonl").read_text())
    assert math.isfinite(record["train_loss"]) and 0 <= record["val_top1"] <= 100
    assert moved("clipped") <= record["step"] * 0.5 * 1e-4 * 1.01 < moved("free") / 10


def test_fp16_needs_a_gpu(tree, tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert _train(tree, tmp_path / "run", amp="fp16") == 2
    assert "--amp fp16 needs a GPU" in capsys.readouterr().err
