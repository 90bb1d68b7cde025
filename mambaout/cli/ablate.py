"""The paper's experiment at a scale anyone can rerun: one network trained with each token mixer, over seeds.

The rows are every combination of the mixers and the --grid values (mixers first, then each KEY in the order
given). Each (row, seed) is a normal `mambaout train` run in OUTPUT/runs/<mixer>[-KEY=VALUE...]-seed<k>/ under one
recipe (default ablate_digits: a small MambaOut on the bundled digits, CPU), so its checkpoints work with eval,
predict and export. A grid KEY that is a run setting (epochs, base_lr, drop_path, input_size, data, ...; see
`mambaout train --help`) overrides the recipe's; any other KEY is a model constructor argument (kernel_size,
conv_ratio, dims, mixer_kwargs, ...). Values are YAML, split on the commas outside brackets.
OUTPUT gets results.jsonl (one line per run: its settings, seed, params, MACs, top-1, top-5, train and inference
img/s, wall time), results.md (mean ± std top-1 over seeds and each row's difference to the first row, paired by
seed, with its 95% interval) and ablation.png. Rerunning the same command skips finished runs and resumes an
unfinished one; more mixers, grid values or seeds train only the new runs.

examples:
  mambaout ablate                                    # conv, conv_ssm, causal_conv, attention, causal_attention
  mambaout ablate --mixers conv,causal_conv --seeds 5 --output runs/causal
  mambaout ablate --mixers conv --grid kernel_size=3,7,11 --seeds 3 --output runs/kernel
  mambaout ablate --mixers conv,conv_ssm --grid data=pathfinder:32-6,pathfinder:32-14 --output runs/pathfinder
  mambaout ablate --mixers conv --grid 'dims=[16,32,64,96],[24,48,96,144]' drop_path=0,0.1 --output runs/width
  mambaout ablate --data ~/pets --model mambaout_femto --epochs 30 --config femto_in1k --output runs/pets-ablate
"""

import argparse
import sys
from pathlib import Path

from mambaout.ablate import DEFAULT_MIXERS, AblationSettings, parse_grid, run_ablation
from mambaout.ablate.runner import DEFAULT_RECIPE
from mambaout.cli.args import integer, yaml_mapping
from mambaout.layers import TOKEN_MIXERS
from mambaout.train import TrainingInterrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = AblationSettings()
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
        help="further axes, each trained in combination with the others: a run setting (epochs, drop_path, "
        "input_size, data, ...) or a model constructor argument (kernel_size, conv_ratio, dims, ...); values are "
        "YAML, split on the commas outside brackets, e.g. kernel_size=3,7,11 'dims=[16,32,64,96],[24,48,96,144]'",
    )
    parser.add_argument("--config", default=DEFAULT_RECIPE, help=f"recipe every run starts from ({DEFAULT_RECIPE})")
    parser.add_argument("--model", metavar="NAME", help="train this registered model as it is (default: the recipe's)")
    parser.add_argument(
        "--model-kwargs",
        type=yaml_mapping,
        metavar="YAML",
        help="model constructor arguments, e.g. '{depths: [1, 1, 1, 1]}'",
    )
    parser.add_argument(
        "--data", metavar="DIR|NAME", help="ImageFolder root with train/ and val/, or pathfinder:SIZE-LENGTH (digits)"
    )
    parser.add_argument("--epochs", type=integer(1), metavar="N", help="epochs per run (default: the recipe's)")
    parser.add_argument("--seeds", type=integer(1), default=d.seeds, metavar="N", help=f"runs per row ({d.seeds})")
    parser.add_argument("--output", default=d.output, metavar="DIR", help=f"the ablation's folder ({d.output})")


def run(args: argparse.Namespace) -> int:
    kwargs = args.model_kwargs or {}
    mixers = None if args.mixers is None else tuple(m.strip() for m in args.mixers.split(",") if m.strip())
    settings = AblationSettings(
        mixers=mixers,
        grid=parse_grid(args.grid or []),
        config=args.config,
        model=args.model,
        model_kwargs=kwargs,
        data=args.data,
        epochs=args.epochs,
        seeds=args.seeds,
        output=args.output,
    )
    try:
        run_ablation(settings)
    except TrainingInterrupted as e:
        print(f"stopped: {e}; rerun the same `mambaout ablate` command to go on", file=sys.stderr)
        return 128 + e.signum
    print((Path(settings.output).expanduser() / "results.md").read_text(), end="")
    return 0
