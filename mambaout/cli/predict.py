"""Classify images: the top classes with their probabilities, as text, JSON or CSV.

Class names come from the checkpoint: a fine-tuned run's folder names, or ImageNet's for ImageNet weights.

examples:
  mambaout predict cat.jpg photos/ --model mambaout_femto --top 5          # published ImageNet weights
  mambaout predict digits/ --checkpoint runs/digits/best.pth --top 3 --csv --output predictions.csv
"""

import argparse
import csv
import io
import json
import sys
from pathlib import Path
from typing import Any

from mambaout.cli.args import add_force, integer
from mambaout.fast import BACKENDS, inference_module
from mambaout.outputs import check_output
from mambaout.train.config import AMP_MODES
from mambaout.train.distributed import resolve_device
from mambaout.train.engine import resolve_amp
from mambaout.train.inference import find_images, load_classifier, predict_files
from mambaout.weights.download import is_url
from mambaout.weights.io import atomic_write


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument(
        "images", nargs="+", metavar="IMAGES_OR_DIRS", help="image files and folders (recursive), or a data name"
    )
    parser.add_argument("--model", help="registered model name (default: the training checkpoint's)")
    parser.add_argument(
        "--checkpoint",
        help="training checkpoint, hub folder (local-dir:DIR, hf-hub:ORG/NAME), weights file or URL, "
        "'official'/'timm' (default)",
    )
    parser.add_argument("--top", type=integer(1), default=5, help="classes shown per image (5)")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print JSON: one object per image")
    output.add_argument("--csv", action="store_true", help="print CSV: path,rank,label,index,probability")
    parser.add_argument("--output", metavar="PATH", help="write to this file instead of printing")
    add_force(parser, "--output", "predict's own output")
    parser.add_argument("--batch-size", type=integer(1), default=32, help="images per batch (32)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    parser.add_argument("--amp", default="auto", choices=AMP_MODES, help="mixed precision")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=BACKENDS,
        help="what runs the model: auto (the fastest for the batch, printed), torch, onnxruntime, openvino",
    )


def _as_text(results: list[dict[str, Any]]) -> str:
    lines = []
    for result in results:
        lines.append(result["path"])
        lines.extend(f"  {p['probability']:7.2%}  {p['label']}" for p in result["predictions"])
    return "\n".join(lines) + "\n"


def _as_csv(results: list[dict[str, Any]]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["path", "rank", "label", "index", "probability"])
    for result in results:
        for p in result["predictions"]:
            writer.writerow([result["path"], p["rank"], p["label"], p["index"], f"{p['probability']:.6f}"])
    return buffer.getvalue()


def run(args: argparse.Namespace) -> int:
    files, skipped_links = find_images(args.images)
    if args.output:
        local = [Path(args.checkpoint)] if args.checkpoint and not is_url(args.checkpoint) else []
        check_output(args.output, "--output", "predictions", inputs=[*files, *local], force=args.force)
    device = resolve_device(args.device)
    classifier = load_classifier(args.checkpoint, args.model, args.ema, device)
    model, amp_dtype, backend = inference_module(classifier.model, args.backend, resolve_amp(args.amp, device))
    results, unreadable = predict_files(classifier, files, args.top, args.batch_size, amp_dtype=amp_dtype, model=model)
    print(f"backend: {backend}", file=sys.stderr)
    for what, items in (("unreadable files", unreadable), ("links", skipped_links)):
        if items:
            shown = "; ".join(f"{path} ({reason})" for path, reason in items[:10])
            print(f"warning: skipped {len(items)} {what}: {shown}", file=sys.stderr)
    if args.json:
        text = json.dumps(results, indent=2) + "\n"
    elif args.csv:
        text = _as_csv(results)
    else:
        text = _as_text(results)
    # file names that are not UTF-8 reach Python as surrogate escapes: written back as the same bytes
    data = text.encode("utf-8", "surrogateescape")
    if args.output:
        with atomic_write(Path(args.output)) as f:
            f.write(data)
        print(f"wrote {len(results)} predictions to {args.output}", file=sys.stderr)
    else:
        sys.stdout.flush()
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()
    return 0
