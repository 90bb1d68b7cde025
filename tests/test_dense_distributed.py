"""DistributedDataParallel for the dense tasks: 2 CPU processes (gloo) end with the weights of 1 process."""

import subprocess
import sys

import pytest
import torch
from dense_fixtures import DETECT, SEGMENT, flags, make_ade, make_coco

from mambaout.cli import main
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import read_checkpoint

# Deterministic steps. Detection: every anchor and proposal sampled (no random subsets), one image per forward
# pass (torchvision normalizes its losses over the images of a pass, and pads them to one size), so one process
# accumulates the two images that two processes take one each. Segmentation: GroupNorm (no batch statistics, which
# would be per process on the CPU: SyncBatchNorm is CUDA's) and no dropout; crops of one size, so a batch's loss
# is the mean of its images'. SGD: Adam would divide rounding noise in near-zero gradients by their own magnitude.
SGD = {"opt": "sgd", "lr": "0.02", "weight_decay": "1e-4"}
CASES = {
    "detect": (DETECT, {"rpn_batch_size": "100000", "box_batch_size": "100000", "epochs": "2"}, "1", "2"),
    "segment": (SEGMENT, {"head_norm": "group", "head_dropout": "0", "iters": "6"}, "2", "1"),
}


@pytest.mark.parametrize("task", sorted(CASES))
def test_two_gloo_processes_match_one_process(tmp_path, task):
    settings, deterministic, batch, accum = CASES[task]
    data = make_coco(tmp_path / "data", train=8) if task == "detect" else make_ade(tmp_path / "data", train=8)
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    common = flags(settings, **deterministic, **SGD)
    argv = [task, "train", "--data", str(data), *common]
    assert main([*argv, "--output", str(single), "--batch-size", batch, "--accum-steps", accum]) == 0

    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    command = [*launch, "-m", "mambaout", *argv, "--output", str(ddp), "--device", "cpu", "--batch-size", "1"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "global batch 2 = 1 per process × 2 process(es)" in done.stdout

    one, two = read_checkpoint(single / "last.pth"), read_checkpoint(ddp / "last.pth")
    assert one["step"] == two["step"] > 0 and len(two["rng"]) == 2
    # the two runs sum the same gradients in another order; through group norm on 32² crops that leaves up to 1e-4
    # after six SGD steps on an AVX-512 Xeon (2.5e-5 on Zen 5), while the last epoch's two steps alone move them by up
    # to 1.5e-2, so a wrong average still fails
    for name, value in one["model"].items():
        torch.testing.assert_close(two["model"][name], value, rtol=1e-4, atol=2e-4, msg=name)
    metric = "val_bbox_ap" if task == "detect" else "val_miou"
    for a, b in zip(RunDir(single).read_metrics(), RunDir(ddp).read_metrics(), strict=True):
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-4)
        assert a[metric] == pytest.approx(b[metric], abs=1e-6)  # the sharded evaluation counts every image once
