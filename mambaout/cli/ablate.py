"""The paper's experiment at a scale anyone can rerun: one network trained with each token mixer, over seeds.

The rows are every combination of the mixers and the --grid values (mixers first, then each KEY in the order
given). Each (row, seed) is a normal `mambaout train` run (--task segment: `mambaout segment train`, UperNet on the
MambaOut backbone) in OUTPUT/runs/<mixer>[-KEY=VALUE...]-seed<k>/ under one recipe (default ablate_digits: a small
MambaOut on the bundled digits, CPU; --task segment: ablate_pathfinder_seg, Pathfinder-segmentation at 32x32), so
its checkpoints work with the task's eval and predict. A grid KEY that is a run setting (epochs, iters, base_lr,
drop_path, input_size, crop_size, data, ...; see `mambaout train --help` or `mambaout segment train --help`)
overrides the recipe's; any other KEY is a model (backbone) constructor argument (kernel_size, conv_ratio, dims,
mixer_kwargs, ...). Values are YAML, split on the commas outside brackets.
OUTPUT gets results.jsonl (one line per run: its settings, seed, params, MACs, train and inference img/s, wall
time, and top-1 and top-5, or for segmentation mIoU, mAcc, aAcc and each class's IoU from evaluating the run's
last checkpoint as `mambaout segment eval` does), results.md (the --metric's mean ± std over seeds and each row's
difference to the first row, paired by seed, with its 95% interval) and ablation.png. Rerunning the same command
skips finished runs and resumes an unfinished one; more mixers, grid values or seeds train only the new runs; the
same command with another --metric and nothing to train rewrites results.md and ablation.png only.

examples:
  mambaout ablate                                    # conv, conv_ssm, causal_conv, attention, causal_attention
  mambaout ablate --mixers conv,causal_conv --seeds 5 --output runs/causal
  mambaout ablate --mixers conv --grid kernel_size=3,7,11 --seeds 3 --output runs/kernel
  mambaout ablate --mixers conv,conv_ssm --grid data=pathfinder:32-6,pathfinder:32-14 --output runs/pathfinder
  mambaout ablate --mixers conv --grid 'dims=[16,32,64,96],[24,48,96,144]' drop_path=0,0.1 --output runs/width
  mambaout ablate --data ~/pets --model mambaout_femto --epochs 30 --config femto_in1k --output runs/pets-ablate
  mambaout ablate --task segment --mixers conv,conv_ssm --data pathfinder-seg:32-6 --metric iou:target_joined \
      --seeds 3 --output runs/pathfinder-seg
  mambaout ablate --task segment --mixers conv --grid iters=1000,3000 --metric macc --output runs/seg-length
"""

import argparse
import sys
from pathlib import Path

from mambaout.ablate import DEFAULT_MIXERS, AblationSettings, parse_grid, run_ablation
from mambaout.ablate.runner import DEFAULT_METRICS, DEFAULT_RECIPES, TASKS
from mambaout.cli.args import add_force, integer, names, yaml_mapping
from mambaout.layers import TOKEN_MIXERS
from mambaout.train import TrainingInterrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = AblationSettings()
    parser.add_argument(
        "--task",
        choices=tuple(TASKS),
        default=d.task,
        help=f"what every run trains: classify (`mambaout train`) or segment (`mambaout segment train`) ({d.task})",
    )
    parser.add_argument(
        "--mixers",
        metavar="A,B,...",
        help=f"token mixers, comma-separated, from {', '.join(TOKEN_MIXERS)}; the first axis, and the first mixer's "
        f"row is the one the others are compared with (default: {','.join(DEFAULT_MIXERS)}; the same as "
        "--grid token_mixer=A,B,...)",
    )
    parser.add_argument(
        "--grid",
        nargs="+",
        metavar="KEY=V1,V2",
        help="further axes, each trained in combination with the others: a run setting (epochs, iters, drop_path, "
        "input_size, data, ...) or a model constructor argument (kernel_size, conv_ratio, dims, ...); values are "
        "YAML, split on the commas outside brackets, e.g. kernel_size=3,7,11 'dims=[16,32,64,96],[24,48,96,144]'",
    )
    recipes = "; ".join(f"--task {task}: {name}" for task, name in DEFAULT_RECIPES.items())
    parser.add_argument("--config", help=f"recipe every run starts from ({recipes})")
    parser.add_argument(
        "--model",
        metavar="NAME",
        help="train this registered model as it is (segment: as the backbone) (default: the recipe's)",
    )
    parser.add_argument(
        "--model-kwargs",
        type=yaml_mapping,
        metavar="YAML",
        help="model constructor arguments, e.g. '{depths: [1, 1, 1, 1]}'",
    )
    parser.add_argument(
        "--data",
        metavar="DIR|NAME",
        help="ImageFolder root with train/ and val/, or pathfinder:SIZE-LENGTH; --task segment: an ADE20K-style root, "
        "or pathfinder-seg:SIZE-LENGTH[:TRAIN[/VAL]] (default: the recipe's)",
    )
    parser.add_argument(
        "--epochs",
        type=integer(1),
        metavar="N",
        help="epochs per run (default: the recipe's); for recipes that train by iters steps, as the segment ones "
        "do, give --grid iters=N (or a recipe) instead",
    )
    parser.add_argument("--seeds", type=integer(1), default=d.seeds, metavar="N", help=f"runs per row ({d.seeds})")
    metrics = "; ".join(f"--task {task}: {name}" for task, name in DEFAULT_METRICS.items())
    parser.add_argument(
        "--metric",
        metavar="NAME",
        help="what results.md and ablation.png compare: top1 or top5; for --task segment miou, macc, aacc or "
        f"iou:CLASS, one class's IoU (e.g. iou:target_joined); only the report: the same runs can be reported with "
        f"another ({metrics})",
    )
    parser.add_argument("--output", default=d.output, metavar="DIR", help=f"the ablation's folder ({d.output})")
    add_force(parser, "--output folder's ablation.json, results.jsonl, results.md or ablation.png", "an ablation's")


def run(args: argparse.Namespace) -> int:
    kwargs = args.model_kwargs or {}
    mixers = None if args.mixers is None else names(args.mixers)
    settings = AblationSettings(
        task=args.task,
        mixers=mixers,
        grid=parse_grid(args.grid or []),
        config=args.config,
        model=args.model,
        model_kwargs=kwargs,
        data=args.data,
        epochs=args.epochs,
        seeds=args.seeds,
        metric=args.metric,
        output=args.output,
        force=args.force,
    )
    try:
        run_ablation(settings)
    except TrainingInterrupted as e:
        print(f"stopped: {e}; rerun the same `mambaout ablate` command to go on", file=sys.stderr)
        return 128 + e.signum
    print((Path(settings.output).expanduser() / "results.md").read_text(), end="")
    return 0
