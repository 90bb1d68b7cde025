"""List every MambaOut variant (depths, dims, parameters, GMACs at 224, published top-1, weight sources) or tag.

With `--tags`: every pretrained tag (`name.tag`: classes, input sizes, crop).

With --token-mixer: the variants built with other token mixers (the Mamba block's SSM, attention, causal forms),
their parameters and MACs beside the depthwise conv's.

With --dense: Mask R-CNN (COCO, 800×1280) and UperNet (ADE20K, 512×2048) on each variant, parameters and GMACs
beside the paper's (counted as mmdetection/mmsegmentation count them: see `mambaout.dense.complexity`).
"""

import argparse

from mambaout.cli.args import integer
from mambaout.dense.complexity import dense_table
from mambaout.errors import UserError
from mambaout.layers import TOKEN_MIXERS
from mambaout.limits import MAX_INPUT_SIZE
from mambaout.models import get_spec, list_models, model_complexity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter on names, e.g. '*rw'")
    parser.add_argument(
        "--img-size", type=integer(32, MAX_INPUT_SIZE), default=224, help="square input size for the MAC count (224)"
    )
    parser.add_argument(
        "--token-mixer",
        metavar="A,B|all",
        help=f"also build each variant with these token mixers ({', '.join(TOKEN_MIXERS)}, or all)",
    )
    parser.add_argument("--tags", action="store_true", help="list the pretrained tags (name.tag) and their configs")
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


def mixer_table(pattern: str = "*", img_size: int = 224, mixers: tuple[str, ...] = tuple(TOKEN_MIXERS)) -> str:
    """Params and MACs of the variants matching `pattern` with each token mixer, and the MACs over conv's."""
    rows = [
        f"| model | token mixer | params (M) | GMACs @{img_size} | × conv's MACs |",
        "|---|---|---|---|---|",
    ]
    for name in list_models(pattern):
        conv_macs = model_complexity(name, (img_size, img_size))[1]
        for mixer in mixers:
            params, macs = model_complexity(name, (img_size, img_size), token_mixer=mixer)
            rows.append(f"| {name} | {mixer} | {params / 1e6:.3f} | {macs / 1e9:.3f} | {macs / conv_macs:.2f} |")
    rows += [
        "",
        "MACs = FlopCounterMode FLOPs / 2. FlopCounterMode counts matrix multiplies and convolutions only, so the "
        "SSM's selective scan is added by its analytic count, B·L·D·(4N + 1) per scan (Δ·u, and per state Δ·A, "
        "Δu·B, the update and the read-out; exponentials not counted); attention's L×L products are counted in "
        "full, causal or not (a causal kernel can skip half).",
    ]
    return "\n".join(rows)


def tag_table(pattern: str = "*") -> str:
    """A Markdown table of the pretrained tags of the variants matching `pattern` (the first is the default)."""
    rows = [
        "| model.tag | classes | input | test input | crop_pct | crop mode | top-1 (published) | weights |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for spec in map(get_spec, list_models(pattern)):
        for cfg in spec.tags:
            top1 = f"{cfg.top1:.2f}" if cfg.top1 is not None else "-"
            sources = ", ".join(s.name for s in cfg.sources) or "-"
            sizes = [f"{size[1]}x{size[2]}" for size in (cfg.input_size, cfg.test_input_size)]
            rows.append(
                f"| {spec.name}.{cfg.tag} | {cfg.num_classes} | {sizes[0]} | {sizes[1]} | {cfg.crop_pct} | "
                f"{cfg.crop_mode} | {top1} | {sources} |"
            )
    return "\n".join(rows)


def run(args: argparse.Namespace) -> int:
    if not list_models(args.pattern):
        raise UserError(f"no model matches '{args.pattern}': run `mambaout models` to list them all")
    if args.dense:
        print(dense_table(list_models(args.pattern)))
        return 0
    if args.tags or args.token_mixer is None:
        print(tag_table(args.pattern) if args.tags else variant_table(args.pattern, args.img_size))
        return 0
    wanted = list(TOKEN_MIXERS) if args.token_mixer == "all" else [m.strip() for m in args.token_mixer.split(",")]
    unknown = [m for m in wanted if m not in TOKEN_MIXERS]
    if unknown:
        raise UserError(
            f"--token-mixer: unknown token mixer {', '.join(unknown)} (mixers: {', '.join(TOKEN_MIXERS)}, or all)"
        )
    print(mixer_table(args.pattern, args.img_size, tuple(wanted)))
    return 0
