"""Object detection and instance segmentation: Mask R-CNN / Faster R-CNN with an FPN on a MambaOut backbone.

`train` runs the one training engine on a COCO-format dataset (ROOT/train2017/, ROOT/val2017/,
ROOT/annotations/instances_{train,val}2017.json; with no --data, the embedded coins of scikit-image's photo, on the
CPU, in a few minutes); `eval` gives pycocotools' box and mask AP; `predict` draws boxes, classes, scores and masks.
"""

import argparse

from mambaout.cli.dense import add_actions
from mambaout.dense.tasks import Detection

EXAMPLES = """examples:
  mambaout detect train --output runs/coins                      # the embedded default: coins, femto, CPU
  mambaout detect train --model mambaout_tiny --data /data/coco --output runs/mrcnn-tiny   # Mask R-CNN 1x recipe
  torchrun --nproc_per_node 8 -m mambaout detect train --model mambaout_tiny --data /data/coco --output runs/t
  mambaout detect train --output runs/mrcnn-tiny --resume auto   # continue after a crash, kill or preemption
  mambaout detect train --data /data/coco --min-size 320 --max-size 512 --epochs 1 --output runs/small-run
  mambaout detect eval --checkpoint runs/coins/best.pth          # COCO AP on the run's val split, JSON beside it
  mambaout detect predict photo.jpg photos/ --checkpoint runs/coins/best.pth --output preds/
  mambaout models --dense                                         # params/GMACs beside the paper's
"""


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_actions(parser, Detection, EXAMPLES)


def run(args: argparse.Namespace) -> int:
    return args.run(args)
