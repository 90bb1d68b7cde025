"""DistributedDataParallel: 2 CPU processes (gloo) end with the weights of 1 process at the same global batch."""

import subprocess
import sys

import pytest
import torch
from train_fixtures import flags, make_tree

from mambaout.cli import main
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint

# deterministic steps: no augmentation, dropout or drop path; SGD with momentum and weight decay
RECIPE = {"epochs": "2", "opt": "sgd", "lr": "0.05", "weight_decay": "1e-4", "smoothing": "0.1", "drop_path": "0"}


@pytest.mark.parametrize("accum_steps", [1, 2])
def test_two_gloo_processes_match_one_process(tmp_path, accum_steps):
    tree = make_tree(tmp_path / "data", classes=("a", "b", "c"), train=8, val=5)  # 15 val images: uneven shards
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(["train", "--data", str(tree), "--output", str(single), *flags(batch_size=8, **RECIPE)]) == 0

    # global batch 8 = 2 processes x (8 / 2 / accum) per micro-step x accum; accum 2 exercises DDP's no_sync
    per_process = str(8 // 2 // accum_steps)
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    argv = ["-m", "mambaout", "train", "--data", str(tree), "--output", str(ddp), "--device", "cpu"]
    argv += flags(batch_size=per_process, accum_steps=str(accum_steps), **RECIPE)
    done = subprocess.run([*launch, *argv], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("epoch 2/2  train_loss") == 1  # only rank 0 prints
    assert "global batch 8 = " + per_process + " per process × 2 process(es)" in done.stdout

    one, two = read_checkpoint(single / "last.pth"), read_checkpoint(ddp / "last.pth")
    assert one["step"] == two["step"] == 6 and len(two["rng"]) == 2  # every rank's random state is kept
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=1e-5, msg=name)
    # metrics are reduced over ranks: the sharded evaluation counts every validation image once
    for a, b in zip(RunDir(single).read_metrics(), RunDir(ddp).read_metrics(), strict=True):
        assert a["val_top1"] == b["val_top1"] and a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-4)
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
