"""List every MambaOut variant: depths, dims, parameters, GMACs at 224, published top-1 and weight sources.

With --dense: Mask R-CNN (COCO, 800×1280) and UperNet (ADE20K, 512×2048) on each variant, parameters and GMACs
beside the paper's (counted as mmdetection/mmsegmentation count them: see `mambaout.dense.complexity`).
"""

import argparse

from mambaout.cli.args import integer
from mambaout.dense.complexity import dense_table
from mambaout.errors import UserError
from mambaout.models import get_spec, list_models, model_complexity
from mambaout.train.config import MAX_INPUT_SIZE


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter on names, e.g. '*rw'")
    parser.add_argument(
        "--img-size", type=integer(32, MAX_INPUT_SIZE), default=224, help="square input size for the MAC count (224)"
    )
    parser.add_argument(
        "--dense", action="store_true", help="Mask R-CNN and UperNet on each variant, beside the paper's figures"
    )


def variant_table(pattern: str = "*", img_size: int = 224) -> str:
    """A Markdown table of the variants matching `pattern`, generated from the registry."""
    rows = [
        f"| model | depths | dims | params (M) | GMACs @{img_size} | top-1 (published) | weights |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in list_models(pattern):
        spec = get_spec(name)
        params, macs = model_complexity(name, (img_size, img_size))
        top1 = f"{spec.cfg.top1:.2f}" if spec.cfg.top1 is not None else "-"
        sources = ", ".join(s.name for s in spec.cfg.sources) or "-"
        depths = ",".join(map(str, spec.arch["depths"]))
        dims = ",".join(map(str, spec.arch["dims"]))
        rows.append(f"| {name} | {depths} | {dims} | {params / 1e6:.3f} | {macs / 1e9:.3f} | {top1} | {sources} |")
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if not list_models(args.pattern):
        raise UserError(f"no model matches '{args.pattern}': run `mambaout models` to list them all")
    if args.dense:
        print(dense_table(list_models(args.pattern)))
        return 0
    print(variant_table(args.pattern, args.img_size))
    return 0
