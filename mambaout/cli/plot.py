"""Plot a training run's loss, accuracy and learning-rate curves to a PNG (RUN_DIR/curves.png)."""

import argparse
import sys
from pathlib import Path

from mambaout.cli.args import add_force
from mambaout.errors import UserError
from mambaout.outputs import check_output
from mambaout.rundir import RunDir
from mambaout.train.curves import plot_curves


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("run_dir", metavar="RUN_DIR", help="a training run folder (holding metrics.jsonl)")
    parser.add_argument("--output", metavar="PNG", help="image to write (default RUN_DIR/curves.png)")
    add_force(parser, "--output", "a plot of ours")


def run(args: argparse.Namespace) -> int:
    run_dir = RunDir(args.run_dir)
    if not run_dir.metrics.is_file():
        raise UserError(f"{run_dir.metrics} does not exist: is {run_dir.path} a training run folder?")
    output = Path(args.output) if args.output else run_dir.path / "curves.png"
    # the run's own curves.png is replaced whatever wrote it (plots of older releases carry no mark of ours)
    check_output(output, "--output", "png", inputs=run_dir.files, force=args.force or not args.output)
    records = run_dir.read_metrics()
    if run_dir.damaged_lines:
        print(f"warning: skipped {run_dir.damaged_lines} damaged lines of {run_dir.metrics}", file=sys.stderr)
    if not records:
        raise UserError(f"{run_dir.metrics} has no complete epoch yet")
    out = plot_curves(records, output, str(run_dir.path))
    print(f"wrote {out} ({len(records)} epochs)")
    return 0
