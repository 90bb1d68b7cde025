"""Train or fine-tune a MambaOut classifier on an ImageFolder tree (with no --data: the bundled digits, on the CPU).

The recipe comes from --config (default: digits_cpu without --data, else <variant>_in1k, from mambaout/configs/);
every setting below overrides it. The run folder gets config.yaml (resolved), metrics.jsonl (one line per epoch),
last.pth (resumable) and best.pth (best val top-1).

examples:
  mambaout train                                        # the embedded default: digits, femto at 32 px, ~2 min
  mambaout train --model mambaout_tiny --data /data/imagenet --output runs/tiny   # the paper's tiny recipe
  torchrun --nproc_per_node 4 -m mambaout train --model mambaout_tiny --data /data/imagenet --output runs/tiny
  mambaout train --output runs/tiny --resume auto       # continue after a crash, kill or preemption

learning rate: --base-lr is per 1024 images of global batch (batch size × processes × accumulation steps), so the
recipe keeps its behaviour on 1 or 64 GPUs: 1e-3 per 1024 gives 4e-3 at the paper's 4096. --lr sets it outright.

fine-tuning: start from published or your own weights and replace the classifier, e.g. 37 pet breeds in
~/pets/{train,val}/<breed>/*.jpg:
  mambaout train --model mambaout_femto --pretrained official --data ~/pets --num-classes 37 \\
      --epochs 30 --warmup-epochs 2 --base-lr 2e-4 --drop-path 0.05 --batch-size 64 --output runs/pets-femto
  mambaout eval --checkpoint runs/pets-femto/best.pth --data ~/pets/val
  mambaout predict my_cat.jpg --checkpoint runs/pets-femto/best.pth --top 3
"""

import argparse
import sys

from mambaout.train.config import add_config_arguments, config_overrides
from mambaout.train.trainer import TrainingInterrupted, prepare_run, train


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.usage = (
        "mambaout train [--config RECIPE] [--resume auto|PATH] [--data DIR] [--output RUN_DIR] [--SETTING ...]"
    )
    parser.add_argument(
        "--config", help="recipe YAML: a path or a name in mambaout/configs/ (femto_in1k, digits_cpu, ...)"
    )
    parser.add_argument(
        "--resume",
        metavar="auto|PATH",
        help="continue a run: 'auto' resumes --output's last.pth if there is one (else starts it), or a checkpoint",
    )
    add_config_arguments(parser)


def run(args: argparse.Namespace) -> int:
    config, checkpoint = prepare_run(args.config, config_overrides(args), args.resume)
    try:
        train(config, checkpoint)
    except TrainingInterrupted as e:
        print(f"stopped: {e}", file=sys.stderr)
        return 128 + e.signum
    return 0
