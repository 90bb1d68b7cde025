"""Semantic segmentation: UperNet (pyramid pooling, FPN fuse, auxiliary FCN head) on a MambaOut backbone.

`train` runs the one training engine on an ADE20K-style dataset (ROOT/images/{training,validation}/*.jpg,
ROOT/annotations/{training,validation}/*.png, label 0 ignored; class names from ROOT/classes.txt or --num-classes;
with no --data, the embedded immunohistochemistry photo of scikit-image, on the CPU, in a few minutes); `eval` gives
mIoU, mAcc, aAcc and per-class IoU; `predict` writes label maps and class maps blended on the images.
"""

import argparse

from mambaout.cli.dense import add_actions
from mambaout.dense.tasks import Segmentation

EXAMPLES = """examples:
  mambaout segment train --output runs/ihc                       # the embedded default: IHC, femto, CPU
  mambaout segment train --model mambaout_tiny --data /data/ADEChallengeData2016 --output runs/upernet-tiny
  torchrun --nproc_per_node 8 -m mambaout segment train --model mambaout_tiny --data /data/ade --output runs/t
  mambaout segment train --data /data/ade --crop-size 256 --iters 2000 --output runs/short   # a small run
  mambaout segment eval --checkpoint runs/ihc/best.pth           # mIoU on the run's val split, JSON beside it
  mambaout segment predict photo.jpg --checkpoint runs/ihc/best.pth --output preds/
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_actions(parser, Segmentation, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    return args.run(args)
