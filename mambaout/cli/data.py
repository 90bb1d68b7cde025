"""Convert data for training past one folder: `shards` writes an ImageFolder tree as WebDataset shards.

`mambaout data shards SRC DST --shard-size N` writes SRC's train/ and val/ splits, shuffled, as
DST/train-000000.tar ... and DST/val-000000.tar ... with DST/_info.json (classes and shard sizes), the layout that
`--data wds:DST` (or the same files served over http(s)) reads; see `mambaout.data.shards`. Needs the `data` extra:
pip install 'mambaout[data]' (for reading the shards).

examples:
  mambaout data shards /data/pets shards/pets --shard-size 1000
  mambaout train --data wds:shards/pets --output runs/pets
  mambaout train --data 'wds:https://host/pets/train-{000000..000007}.tar' --output runs/pets
"""

import argparse
from pathlib import Path

from mambaout.cli.args import add_force, integer
from mambaout.data import digits_tree, resolve_data
from mambaout.data.shard_writer import write_shards


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    actions = parser.add_subparsers(dest="action", required=True, metavar="ACTION", parser_class=type(parser))
    shards = actions.add_parser("shards", help="write an ImageFolder tree (train/, val/) as WebDataset shards")
    shards.add_argument("src", metavar="SRC", help="ImageFolder root (train/<class>/, val/<class>/) or a data name")
    shards.add_argument("dst", metavar="DST", help="folder for the shards and _info.json (created)")
    shards.add_argument("--shard-size", type=integer(1), default=1000, help="samples per shard (1000)")
    shards.add_argument("--seed", type=integer(0), default=0, help="seed of the order samples are shuffled into (0)")
    add_force(shards, "DST file", "a shard or an _info.json")
    shards.set_defaults(run=_shards)


def run(args: argparse.Namespace) -> int:
    return args.run(args)


def _shards(args: argparse.Namespace) -> int:
    src = resolve_data(args.src, "classification", digits_tree)
    written = write_shards(src, Path(args.dst).expanduser(), args.shard_size, args.seed, args.force)
    for split, shards in written.shards.items():
        print(f"{split}: {written.samples[split]} samples in {len(shards)} shards")
    if written.unreadable:
        shown = "; ".join(f"{p} ({r})" for p, r in written.unreadable[:10])
        print(f"left out {len(written.unreadable)} unreadable files: {shown}")
    print(f"wrote {written.info}")
    return 0
