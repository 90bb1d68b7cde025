"""Convert a checkpoint between key layouts (ours, timm, official) and file formats (.pth, .safetensors).

SRC is a path or URL in any layout, including a `mambaout train` checkpoint. `--to` picks the key layout of DST and
DST's extension its file format; `--to safetensors` is short for our layout in a `.safetensors` file. DST is written
atomically: a failed conversion leaves an existing DST as it was.
"""

import argparse
from pathlib import Path

import torch

from mambaout.cli.args import add_force
from mambaout.errors import UserError
from mambaout.models import create_model, get_spec
from mambaout.outputs import check_output
from mambaout.weights import (
    LAYOUTS,
    checkpoint_num_classes,
    convert_state_dict,
    load_checkpoint,
    our_layout,
    read_state_dict,
    save_state_dict,
)
from mambaout.weights.download import is_url


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("src", metavar="SRC", help="checkpoint path or http(s)/file URL, in any layout")
    parser.add_argument(
        "dst", metavar="DST", help="output file: '.safetensors' writes safetensors, anything else a torch file"
    )
    parser.add_argument(
        "--to",
        required=True,
        choices=(*LAYOUTS, "safetensors"),
        help="key layout of DST; 'safetensors' = our layout in a .safetensors file",
    )
    parser.add_argument("--model", metavar="NAME", help="check that the weights load strictly into this variant")
    parser.add_argument("--sha256", metavar="HEX", help="expected SHA-256 of SRC")
    parser.add_argument("--ema", action="store_true", help="take the EMA weights of a training checkpoint")
    add_force(parser, "DST", "a checkpoint file")


def _check_fits(name: str, state_dict: dict[str, torch.Tensor], src: str) -> None:
    """Load our-layout weights strictly into variant `name`, with the checkpoint's own number of classes.

    The model is built on the meta device: only names and shapes are checked, so this costs no memory or init time.
    """
    with torch.device("meta"):
        model = create_model(name, num_classes=checkpoint_num_classes(state_dict))
    load_checkpoint(model, state_dict, strict=True, name=src)


def run(args: argparse.Namespace) -> int:
    layout = "mambaout" if args.to == "safetensors" else args.to
    src = [] if is_url(args.src) else [Path(args.src)]
    dst = check_output(args.dst, "DST", "checkpoint", inputs=src, force=args.force)
    if args.to == "safetensors" and dst.suffix != ".safetensors":
        raise UserError(f"--to safetensors writes a .safetensors file, but DST is '{dst}'; name it '*.safetensors'")
    if args.model:
        get_spec(args.model)  # an unknown name fails before a possibly long download
    state_dict = read_state_dict(args.src, sha256=args.sha256, prefer_ema=args.ema)
    ours = our_layout(state_dict, args.src)
    converted = convert_state_dict(ours, to=layout, source="mambaout")
    if args.model:
        _check_fits(args.model, ours, args.src)
    save_state_dict(converted, dst)
    file_format = "safetensors" if dst.suffix == ".safetensors" else "torch"
    checked = f", checked against {args.model}" if args.model else ""
    print(f"wrote {dst}: {len(converted)} tensors, {layout} layout, {file_format} format{checked}")
    return 0
