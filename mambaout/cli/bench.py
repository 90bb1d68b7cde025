"""Benchmark our fast paths against timm's MambaOut with the same weights; prints a Markdown table.

Every path runs in the same process on the same input, interleaved over --repeats rounds, so that other load on
the machine falls on all of them alike. The table gives params, MACs, images/s, latency p50/p90, peak memory and
the ratio to timm eager, with the machine, the date and the load average; BENCHMARKS.md keeps these tables.
With --token-mixer, the rows are our model built with each token mixer instead (what the SSM or attention costs).
--peers adds the engines a user would pick instead of ours (and names the fastest); --load N measures beside N
busy processes. --csv writes the rows in timm's `benchmark.py` columns, to set beside timm's published tables.
"""

import argparse
import os

from mambaout.bench import DTYPES, BenchSettings, run_benchmark, write_timm_csv
from mambaout.cli.args import add_force, integer, names
from mambaout.errors import UserError
from mambaout.layers import TOKEN_MIXERS
from mambaout.limits import MAX_INPUT_SIZE
from mambaout.outputs import check_output, same_file
from mambaout.weights.io import atomic_path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = BenchSettings()
    parser.add_argument("--model", default=d.model, metavar="NAME", help=f"variant ({d.model})")
    parser.add_argument(
        "--batch-size", type=integer(1), default=d.batch_size, metavar="N", help=f"images per call ({d.batch_size})"
    )
    parser.add_argument(
        "--img-size",
        type=integer(32, MAX_INPUT_SIZE),
        default=d.img_size,
        metavar="N",
        help=f"square input size ({d.img_size})",
    )
    parser.add_argument("--dtype", default=d.dtype, choices=tuple(DTYPES), help="fp32, or bf16 (timm under autocast)")
    parser.add_argument("--compile", action="store_true", help="add torch.compile'd timm and ours")
    parser.add_argument("--train", action="store_true", help="time a training step (forward, backward, AdamW)")
    parser.add_argument(
        "--onnx",
        action="store_true",
        help="add our exported model in ONNX Runtime (fused and reference graphs) and OpenVINO (both hints; fp32)",
    )
    parser.add_argument(
        "--peers",
        action="store_true",
        help="add timm compiled and timm's own ONNX export in ONNX Runtime and OpenVINO (fp32): the best peer is named",
    )
    parser.add_argument(
        "--levers",
        action="store_true",
        help="time our levers one at a time (fp32 inference; the training step's with --train)",
    )
    parser.add_argument(
        "--repeats", type=integer(1), default=d.repeats, metavar="N", help=f"interleaved rounds ({d.repeats})"
    )
    parser.add_argument(
        "--iters", type=integer(1), default=d.iters, metavar="N", help="timed calls per path per round (1)"
    )
    parser.add_argument(
        "--warmup", type=integer(0), default=d.warmup, metavar="N", help="untimed calls per path first (1)"
    )
    parser.add_argument("--device", default=d.device, help="cpu or cuda (cpu)")
    parser.add_argument("--threads", type=integer(1), metavar="N", help="intra-op threads (default: PyTorch's)")
    parser.add_argument(
        "--micro-batch", type=integer(1), metavar="N", help="our paths' micro-batch (default: automatic)"
    )
    parser.add_argument(
        "--token-mixer",
        metavar="A,B|all",
        help="instead of timm vs ours: our model with each of these token mixers, the first the baseline "
        "(conv_ssm, attention, causal forms; all: every one)",
    )
    parser.add_argument(
        "--load",
        type=integer(0, os.cpu_count() or 1),
        default=d.load,
        metavar="N",
        help="keep N other processes busy (a core each) beside the measurement (0)",
    )
    parser.add_argument("--output", metavar="FILE", help="also write the Markdown to FILE (atomically)")
    parser.add_argument(
        "--csv",
        metavar="FILE",
        help="also write the rows in timm's benchmark.py columns to FILE (atomically), to set beside timm's "
        "results/benchmark-*.csv",
    )
    add_force(parser, "--output or --csv", "what bench writes there")


def _mixers(flag: str | None) -> tuple[str, ...]:
    if flag is None:
        return ()
    return tuple(TOKEN_MIXERS) if flag == "all" else names(flag)


def run(args: argparse.Namespace) -> int:
    output = check_output(args.output, "--output", "bench", force=args.force) if args.output else None
    table_csv = check_output(args.csv, "--csv", "bench-csv", force=args.force) if args.csv else None
    if output is not None and table_csv is not None and same_file(output, table_csv):
        raise UserError(f"--csv {table_csv} is also the --output file: name two files")
    settings = BenchSettings(
        model=args.model,
        batch_size=args.batch_size,
        img_size=args.img_size,
        dtype=args.dtype,
        compile=args.compile,
        train=args.train,
        onnx=args.onnx,
        peers=args.peers,
        levers=args.levers,
        repeats=args.repeats,
        iters=args.iters,
        warmup=args.warmup,
        device=args.device,
        threads=args.threads,
        micro_batch=args.micro_batch,
        malloc=args.malloc,
        token_mixers=_mixers(args.token_mixer),
        load=args.load,
    )
    report = run_benchmark(settings)
    print(report.markdown)
    if output is not None:
        output.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(output) as tmp:
            tmp.write_text(report.markdown)
    if table_csv is not None:
        write_timm_csv(table_csv, report)
    return 0
