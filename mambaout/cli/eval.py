"""Evaluate a checkpoint on an ImageFolder tree: top-1/top-5, loss, images/s, written as JSON too.

Class folders are matched to the model's classes by name (a run's folder names, or ImageNet's WordNet ids); a
dataset root holding train/ and val/ is evaluated on val/. WebDataset shards (`wds:`) and Hugging Face datasets
(`hfds:`) are evaluated on their validation split, or on the shards a pattern names.

examples:
  mambaout eval --checkpoint runs/digits/best.pth                 # on the run's own val split
  mambaout eval --model mambaout_femto --checkpoint official --data /data/imagenet/val
  mambaout eval --checkpoint runs/pets/best.pth --data photos --class-map kitty=cat,pup=dog
  mambaout eval --checkpoint runs/in1k/best.pth --data 'wds:https://host/in1k/val-{000000..000049}.tar'
"""

import argparse
import json
import os
from pathlib import Path

from mambaout.cli.args import add_force, class_map, image_size, integer, number
from mambaout.data import digits_tree, parse_source_name, resolve_data
from mambaout.errors import UserError
from mambaout.fast import BACKENDS, inference_module
from mambaout.outputs import check_output
from mambaout.train.config import AMP_MODES
from mambaout.train.distributed import init_distributed
from mambaout.train.engine import resolve_amp
from mambaout.train.inference import evaluate_folder, load_classifier
from mambaout.weights.download import is_url
from mambaout.weights.io import atomic_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "--checkpoint",
        help="training checkpoint, hub folder (local-dir:DIR, hf-hub:ORG/NAME), weights file or URL, or "
        "'official'/'timm'",
    )
    parser.add_argument("--model", help="registered model name (default: the training checkpoint's)")
    parser.add_argument(
        "--data",
        help="ImageFolder tree <data>/<class>/<images>, a dataset root, a data name, wds:SHARDS or hfds:PATH "
        "(default: a run's own val split)",
    )
    parser.add_argument("--ema", action="store_true", help="evaluate the checkpoint's EMA weights")
    parser.add_argument(
        "--input-size", type=image_size, help="evaluate at this square size (default: the checkpoint's)"
    )
    parser.add_argument(
        "--crop-pct", type=number(0, 1, low_open=True), help="center-crop fraction in (0, 1] (default: checkpoint's)"
    )
    parser.add_argument(
        "--class-map", type=class_map, metavar="FOLDER=CLASS,...", help="name folders that differ from the classes"
    )
    parser.add_argument(
        "--by-position", action="store_true", help="take the sorted class folders as the outputs in order"
    )
    parser.add_argument("--batch-size", type=integer(1), default=128, help="images per batch (128)")
    parser.add_argument(
        "--workers", type=integer(0), default=min(4, os.cpu_count() or 1), help="data loading processes (up to 4)"
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="what runs the model: auto (the fastest for the batch, printed), torch, onnxruntime, openvino",
    )
    parser.add_argument("--json", metavar="PATH", help="results file (default: <checkpoint>.eval.json beside it)")
    add_force(parser, "--json", "an eval results file")


def _results_path(args: argparse.Namespace) -> tuple[Path, list[Path]]:
    """Where the JSON goes, and the local input files it must not overwrite."""
    ckpt = Path(args.checkpoint).expanduser() if args.checkpoint and not is_url(args.checkpoint) else None
    inputs = [ckpt] if ckpt is not None and ckpt.exists() else []
    if args.json:
        return Path(args.json), inputs
    if ckpt is not None and ckpt.is_file():
        return ckpt.with_name(f"{ckpt.stem}.eval.json"), inputs
    return Path(f"{args.model or 'model'}.eval.json"), inputs


def run(args: argparse.Namespace) -> int:
    out, inputs = _results_path(args)
    env = init_distributed(args.device)  # under torchrun, every process evaluates a shard
    try:
        amp_dtype = resolve_amp(args.amp, env.device)
        classifier = load_classifier(args.checkpoint, args.model, args.ema, env.device, args.input_size, args.crop_pct)
        data = args.data or classifier.val_data
        if data is None:
            raise UserError("--data is needed: an ImageFolder tree <data>/<class>/<images>")
        source = parse_source_name(data)
        data = resolve_data(data, "classification", digits_tree) if source is None else data
        # the data folder is an input as a whole: none of its images is ever written, not even with --force
        read = [data] if source is None else [source.local] if source.local else []
        out = check_output(out, "--json", "eval-json", inputs=[*inputs, *read], force=args.force)
        model, amp_dtype, backend = inference_module(classifier.model, args.backend, amp_dtype)
        result = evaluate_folder(
            classifier, data, env, args.batch_size, args.workers, amp_dtype, args.class_map, args.by_position, model
        )
    finally:
        env.shutdown()
    if not env.is_main:
        return 0
    record = {
        "model": classifier.model_name,
        "checkpoint": classifier.source,
        "ema": args.ema,
        "data": result.pop("data"),
        "input_size": classifier.data["input_size"][-1],
        "crop_pct": classifier.data["crop_pct"],
        "interpolation": classifier.data["interpolation"],
        "backend": backend,
        **result,
    }
    # the figures first: they are shown even when the results file cannot be written
    print(
        f"{classifier.model_name} on {record['data']}: top-1 {result['top1']:.2f}%  top-5 {result['top5']:.2f}%  "
        f"loss {result['loss']:.4f}  {result['images']} images  {result['images_per_sec']:.0f} images/s"
    )
    print(f"backend: {backend}")
    if result["unreadable"]:
        print(f"skipped {len(result['unreadable'])} unreadable files: {'; '.join(result['unreadable'][:10])}")
    if result["skipped_links"]:
        print(f"skipped {len(result['skipped_links'])} links: {'; '.join(result['skipped_links'][:10])}")
    with atomic_write(out) as f:
        f.write((json.dumps(record, indent=2) + "\n").encode())
    print(f"wrote {out}")
    return 0
