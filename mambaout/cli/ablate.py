"""The paper's experiment at a scale anyone can rerun: one network trained with each token mixer, over seeds.

Each (mixer, seed) is a normal `mambaout train` run in OUTPUT/runs/<mixer>-seed<k>/ under one recipe (default
ablate_digits: a small MambaOut on the bundled digits, CPU), so its checkpoints work with eval, predict and export.
OUTPUT gets results.jsonl (one line per run: mixer, seed, params, MACs, top-1, top-5, train and inference img/s,
wall time), results.md (mean ± std top-1 over seeds and each mixer's difference to conv) and ablation.png.
Rerunning the same command skips finished runs and resumes an unfinished one.

examples:
  mambaout ablate                                    # conv, conv_ssm, causal_conv, attention, causal_attention
  mambaout ablate --mixers conv,causal_conv --seeds 5 --output runs/causal
  mambaout ablate --data ~/pets --model mambaout_femto --epochs 30 --config femto_in1k --output runs/pets-ablate
"""

import argparse
import sys
from pathlib import Path

from mambaout.ablate import DEFAULT_MIXERS, AblationSettings, run_ablation
from mambaout.ablate.runner import DEFAULT_RECIPE
from mambaout.cli.args import integer, yaml_mapping
from mambaout.layers import TOKEN_MIXERS
from mambaout.train import TrainingInterrupted


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = AblationSettings()
    parser.add_argument(
        "--mixers",
        default=",".join(DEFAULT_MIXERS),
        metavar="A,B,...",
        help=f"token mixers, comma-separated, from {', '.join(TOKEN_MIXERS)} (default: {','.join(DEFAULT_MIXERS)})",
    )
    parser.add_argument("--config", default=DEFAULT_RECIPE, help=f"recipe every run starts from ({DEFAULT_RECIPE})")
    parser.add_argument("--model", metavar="NAME", help="train this registered model as it is (default: the recipe's)")
    parser.add_argument(
        "--model-kwargs",
        type=yaml_mapping,
        metavar="YAML",
        help="model constructor arguments, e.g. '{depths: [1, 1, 1, 1]}'",
    )
    parser.add_argument("--data", metavar="DIR", help="ImageFolder root with train/ and val/ (default: the digits)")
    parser.add_argument("--epochs", type=integer(1), metavar="N", help="epochs per run (default: the recipe's)")
    parser.add_argument("--seeds", type=integer(1), default=d.seeds, metavar="N", help=f"runs per mixer ({d.seeds})")
    parser.add_argument("--output", default=d.output, metavar="DIR", help=f"the ablation's folder ({d.output})")


def run(args: argparse.Namespace) -> int:
    kwargs = args.model_kwargs or {}
    settings = AblationSettings(
        mixers=tuple(m.strip() for m in args.mixers.split(",") if m.strip()),
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
