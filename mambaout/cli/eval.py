"""Evaluate a checkpoint on an ImageFolder tree: top-1/top-5, loss, images/s, written as JSON too.

examples:
  mambaout eval --checkpoint runs/digits/best.pth                 # on the run's own val split
  mambaout eval --model mambaout_femto --checkpoint official --data /data/imagenet/val
"""

import argparse
import json
import os
from pathlib import Path

from mambaout.errors import UserError
from mambaout.train.config import AMP_MODES
from mambaout.train.distributed import init_distributed
from mambaout.train.engine import resolve_amp
from mambaout.train.inference import evaluate_folder, load_classifier
from mambaout.weights.io import atomic_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", help="training checkpoint, weights file or URL, or 'official'/'timm'")
    parser.add_argument("--model", help="registered model name (default: the training checkpoint's)")
    parser.add_argument("--data", help="ImageFolder tree <data>/<class>/<images> (default: a run's own val split)")
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument("--input-size", type=int, help="evaluate at this square size (default: the checkpoint's)")
    parser.add_argument("--crop-pct", type=float, help="center-crop fraction (default: the checkpoint's)")
    parser.add_argument("--batch-size", type=int, default=128, help="images per batch (128)")
    parser.add_argument(
        "--workers", type=int, default=min(4, os.cpu_count() or 1), help="data loading processes (up to 4)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    parser.add_argument("--json", metavar="PATH", help="results file (default: <checkpoint>.eval.json beside it)")


def run(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1 (got {args.batch_size})")
    if args.workers < 0:
        raise UserError(f"--workers must be >= 0 (got {args.workers})")
    env = init_distributed(args.device)  # under torchrun, every process evaluates a shard
    try:
        amp_dtype = resolve_amp(args.amp, env.device)
        classifier = load_classifier(args.checkpoint, args.model, args.ema, env.device, args.input_size, args.crop_pct)
        data = args.data or classifier.val_data
        if data is None:
            raise UserError("--data is needed: an ImageFolder tree <data>/<class>/<images>")
        result = evaluate_folder(classifier, data, env, args.batch_size, args.workers, amp_dtype)
    finally:
        env.shutdown()
    if not env.is_main:
        return 0
    record = {
        "model": classifier.model_name,
        "checkpoint": classifier.source,
        "ema": args.ema,
        "data": str(data),
        "input_size": classifier.data["input_size"][-1],
        "crop_pct": classifier.data["crop_pct"],
        "interpolation": classifier.data["interpolation"],
        **result,
    }
    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint else None
    if args.json:
        out = Path(args.json)
    elif ckpt is not None and ckpt.is_file():
        out = ckpt.with_name(f"{ckpt.stem}.eval.json")
    else:
        out = Path(f"{classifier.model_name}.eval.json")
    with atomic_write(out) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())
    print(
        f"{classifier.model_name} on {data}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  {result['images']} images  {result['images_per_sec']:.0f} images/s"
    )
    if result["unreadable"]:
        print(f"skipped {len(result['unreadable'])} unreadable files: {'; '.join(result['unreadable'][:10])}")
    print(f"wrote {out}")
    return 0
