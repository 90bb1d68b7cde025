"""List every MambaOut variant (depths, dims, parameters, GMACs at 224, published top-1, weight sources), or with
`--tags` every pretrained tag (`name.tag`: classes, input sizes, crop)."""

import argparse

from mambaout.models import get_spec, list_models, model_complexity


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("pattern", nargs="?", default="*", help="shell-style filter on names, e.g. '*rw'")
    parser.add_argument("--img-size", type=int, default=224, help="square input size for the MAC count (224)")
    parser.add_argument("--tags", action="store_true", help="list the pretrained tags (name.tag) and their configs")


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
    print(tag_table(args.pattern) if args.tags else variant_table(args.pattern, args.img_size))
    return 0
