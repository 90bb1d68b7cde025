"""Plot a training run's loss, accuracy and learning-rate curves to a PNG (RUN_DIR/curves.png)."""

import argparse
from pathlib import Path

from mambaout.errors import UserError
from mambaout.train.curves import plot_curves
from mambaout.train.rundir import RunDir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (holding metrics.jsonl)")
    parser.add_argument("--output", metavar="PNG", help="image to write (default RUN_DIR/curves.png)")


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if not run_dir.metrics.is_file():
        raise UserError(f"{run_dir.metrics} does not exist: is {run_dir.path} a training run folder?")
    records = run_dir.read_metrics()
    if not records:
        raise UserError(f"{run_dir.metrics} has no complete epoch yet")
    out = plot_curves(records, Path(args.output) if args.output else run_dir.path / "curves.png", str(run_dir.path))
    print(f"wrote {out} ({len(records)} epochs)")
    return 0
