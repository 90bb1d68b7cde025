"""Numerical checks of our fast paths on a CUDA GPU (CI has none; tests/test_fast*.py hold the same logic on CPU).

Prints one line per check and exits non-zero if any fails:
- `optimize_for_inference` fp32 (eager and compiled) equals the reference model (max abs logit difference ≤ 1e-4,
  TF32 off), and its stage features too;
- bf16 top-1 agrees with fp32 on most images;
- `make_train_step` (micro-batches, split linears, channels-last) gives the plain step's gradients.

Usage: python scripts/gpu_check.py [--models mambaout_femto mambaout_tiny] [--compile] [--device cuda]
"""

import argparse
import copy
import sys
from pathlib import Path

import torch
from torch import nn

# the tests' helper that gives every parameter a random value (norm affines and LayerScales too)
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import randomize_

from mambaout import create_model, optimize_for_inference
from mambaout.fast.train_step import TrainStepConfig, make_train_step


def check(name: str, value: float, limit: float, higher_is_better: bool = False) -> bool:
    ok = value >= limit if higher_is_better else value <= limit
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value:.3g} ({'≥' if higher_is_better else '≤'} {limit})", flush=True)
    return ok


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["mambaout_femto", "mambaout_tiny"])
    parser.add_argument("--compile", action="store_true", help="also check compile=True")
    parser.add_argument("--device", default="cuda", help="cuda (cpu runs the same checks here)")
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    device = torch.device(args.device)
    torch.manual_seed(0)
    ok = True
    for name in args.models:
        model = randomize_(create_model(name)).to(device).eval()
        x = torch.randn(8, 3, 224, 192, device=device)
        with torch.no_grad():
            ref = model(x)
            ref_feats = model.forward_intermediates(x, intermediates_only=True)
        fast = optimize_for_inference(model)
        ok &= check(f"{name} fp32 logits |fast - ref|", (fast(x) - ref).abs().max().item(), 1e-4)
        feats = fast.forward_intermediates(x, intermediates_only=True)
        diff = max((a - b).abs().max().item() for a, b in zip(feats, ref_feats, strict=True))
        ok &= check(f"{name} fp32 stage features |fast - ref|", diff, 1e-4)
        if args.compile:
            compiled = optimize_for_inference(model, compile=True)
            ok &= check(f"{name} compiled fp32 logits |fast - ref|", (compiled(x) - ref).abs().max().item(), 1e-4)
        images = torch.randn(256, 3, 224, 224, device=device)
        with torch.no_grad():
            top1 = model(images).argmax(-1)
        agree = (optimize_for_inference(model, torch.bfloat16)(images).argmax(-1) == top1).float().mean().item()
        ok &= check(f"{name} bf16 top-1 agreement with fp32 (random images)", agree, 0.9, higher_is_better=True)

    # SGD with lr 1 turns each step's update into its gradient: compare the gradients of the two steps
    model = randomize_(create_model("mambaout_femto", num_classes=10)).to(device).train()
    twin = copy.deepcopy(model)
    images = torch.randn(16, 3, 64, 64, device=device)
    targets = torch.randint(0, 10, (16,), device=device)
    loss_fn = nn.CrossEntropyLoss()
    loss_fn(twin(images), targets).backward()
    torch.optim.SGD(twin.parameters(), lr=1.0).step()
    step = make_train_step(
        model, torch.optim.SGD(model.parameters(), lr=1.0), loss_fn, TrainStepConfig(micro_batch=4, split_linears=True)
    )
    step(images, targets)
    diff = max(
        (a - b).abs().max().item() / max(1.0, b.abs().max().item())
        for a, b in zip(model.parameters(), twin.parameters(), strict=True)
    )
    ok &= check("femto train step (micro-batch 4, split linears) |Δ weights| vs plain step", diff, 1e-5)
    print("all checks passed" if ok else "SOME CHECKS FAILED", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
