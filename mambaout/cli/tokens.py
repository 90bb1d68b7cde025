"""The paper's long-sequence analysis: tokens L, τ = 6·D, and a Transformer block's linear vs attention FLOPs.

With no arguments: the paper's table (ViT-S and ViT-B at 16² patches, and MambaOut-Tiny's four stages, on ImageNet
224², COCO 800×1280 and ADE20K 512×2048). `--dim D` analyses one token width on `--img-size` cut into `--patch`
pixels; `--model NAME` takes a registered model's stage widths and strides. A block costs 24·D²·L FLOPs in its
linear layers and 4·D·L² in attention (2·D·L² causal); attention dominates when L > τ = 6·D.
"""

import argparse
import json

from mambaout.ablate.tokens import PAPER_TASKS, PATCH, markdown, model_rows, paper_table, token_row
from mambaout.cli.args import integer
from mambaout.errors import UserError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--dim", type=integer(1), metavar="D", help="token width D (e.g. 384 for ViT-S)")
    parser.add_argument("--model", metavar="NAME", help="a registered model: one row per stage")
    parser.add_argument(
        "--img-size", type=integer(1), nargs="+", metavar="N", help="H [W] in pixels (default: the paper's three tasks)"
    )
    parser.add_argument("--patch", type=integer(1), default=PATCH, metavar="P", help=f"patch size with --dim ({PATCH})")
    parser.add_argument("--causal", action="store_true", help="causal attention: 2·D·L² instead of 4·D·L²")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")


def run(args: argparse.Namespace) -> int:
    if args.dim is not None and args.model:
        raise UserError("--dim and --model: give one (a token width, or a model's stage widths)")
    if args.img_size is not None and len(args.img_size) > 2:
        raise UserError(f"--img-size takes H or H W, got {' '.join(map(str, args.img_size))}")
    if args.img_size:
        sizes = [(f"{args.img_size[0]}×{args.img_size[-1]}", args.img_size[0], args.img_size[-1])]
    else:
        sizes = list(PAPER_TASKS)
    if args.dim is not None:
        rows = [token_row(task, f"D={args.dim}", args.dim, h, w, args.patch, args.causal) for task, h, w in sizes]
    elif args.model:
        rows = [row for task, h, w in sizes for row in model_rows(args.model, task, h, w, args.causal)]
    elif args.img_size:
        raise UserError("--img-size needs --dim D or --model NAME (without either: the paper's table)")
    else:
        rows = paper_table(args.causal)
    print(json.dumps([r.record() for r in rows], indent=2) if args.json else markdown(rows, args.causal))
    return 0
