"""Measure each token mixer's time and peak memory per image against the token count; prints a Markdown table.

For each mixer and input size, one process times every (mixer, size) warm through the benchmark harness (the
mixers interleaved at each size), fits each mixer's growth exponent (log ms/img against log stage-1 tokens) and
reports where attention's cost passes the SSM's and the conv's, beside the paper's τ = 6·D of each stage. A size
estimated to pass --memory-limit or --time-limit is skipped with the reason, before it runs.
--json writes the rows, fits and crossovers; --output DIR gets scaling.png (log-log, τ marked).

examples:
  mambaout scaling --sizes 64,128,224 --threads 1
  mambaout scaling --mixers conv,attention --pass both --json scaling.json --output runs/scaling
"""

import argparse
import functools
import sys
from pathlib import Path

from mambaout.ablate.scaling import (
    DEFAULT_SIZES,
    SCALING_MIXERS,
    ScalingSettings,
    plot_scaling,
    run_scaling,
    scaling_markdown,
    write_scaling_json,
)
from mambaout.cli.args import add_force, integer, names, number
from mambaout.layers import TOKEN_MIXERS
from mambaout.outputs import check_output

PLOT_NAME = "scaling.png"


def _sizes(text: str) -> tuple[int, ...]:
    """An argparse type: comma-separated integers (their range is the settings' to check)."""
    try:
        return tuple(int(item) for item in text.split(",") if item.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expects comma-separated integers, got {text!r}") from None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = ScalingSettings()
    parser.add_argument("--model", default=d.model, metavar="NAME", help=f"variant ({d.model})")
    parser.add_argument(
        "--mixers",
        default=",".join(SCALING_MIXERS),
        metavar="A,B,...",
        help=f"token mixers from {', '.join(TOKEN_MIXERS)} (default: {','.join(SCALING_MIXERS)})",
    )
    parser.add_argument(
        "--sizes",
        type=_sizes,
        default=DEFAULT_SIZES,
        metavar="N,N,...",
        help=f"square input sizes, multiples of 32 (default: {','.join(map(str, DEFAULT_SIZES))})",
    )
    parser.add_argument(
        "--batch-size", type=integer(1), default=d.batch_size, metavar="N", help=f"images per call ({d.batch_size})"
    )
    parser.add_argument(
        "--pass",
        dest="passes",
        choices=("inference", "train", "both"),
        default=d.passes,
        help="inference (eval mode, no grad), train (forward, backward, AdamW: the bench's step) or both",
    )
    parser.add_argument(
        "--threads", type=integer(1), metavar="N", help="intra-op threads (default: fitted to the free cores)"
    )
    parser.add_argument(
        "--memory-limit",
        type=number(0, low_open=True),
        metavar="GiB",
        help="skip a size estimated to need more extra memory (default: the available memory less a margin: 10%%, at "
        "least 1 GiB)",
    )
    parser.add_argument(
        "--time-limit",
        type=number(0, low_open=True),
        default=d.time_limit_s,
        metavar="S",
        help=f"skip a size estimated to take longer per call, in seconds ({d.time_limit_s:g})",
    )
    parser.add_argument(
        "--repeats", type=integer(1), default=d.repeats, metavar="N", help=f"timed calls per size ({d.repeats})"
    )
    parser.add_argument("--json", metavar="FILE", help="write the rows, fits and crossovers as JSON (atomically)")
    parser.add_argument("--output", metavar="DIR", help=f"write the log-log plot to DIR/{PLOT_NAME}")
    add_force(parser, "--json / --output", "this command's own")


def run(args: argparse.Namespace) -> int:
    settings = ScalingSettings(
        model=args.model,
        mixers=names(args.mixers),
        sizes=args.sizes,
        batch_size=args.batch_size,
        passes=args.passes,
        threads=args.threads,
        memory_limit_gib=args.memory_limit,
        time_limit_s=args.time_limit,
        repeats=args.repeats,
    )
    json_path = check_output(args.json, "--json", "scaling-json", force=args.force) if args.json else None
    plot = check_output(Path(args.output) / PLOT_NAME, "--output", "png", force=args.force) if args.output else None
    result = run_scaling(settings, log=functools.partial(print, file=sys.stderr))
    print(scaling_markdown(result), end="")
    if json_path is not None:
        json_path.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {write_scaling_json(result, json_path)}")
    if plot is not None:
        plot.parent.mkdir(parents=True, exist_ok=True)
        print(f"wrote {plot_scaling(result, plot)}")
    return 0
