"""Effective receptive fields: how far a stage's centre token sees, per token mixer (RepLKNet's and VMamba's ERF).

The map is |gradient| of stage K's centre output token (ReLU, summed over channels) with respect to the input images
(--wrt input, in pixels) or to the stage's own input tokens (--wrt tokens: its blocks' mixing alone, without the skip
connection), summed over images and normalised to sum 1; model in eval mode, float32. radius_20/50/90: the radius of
the smallest disc around the centre holding 20/50/90% of the map. With --model (default mambaout_femto) the model is
built at random init (seeded) once per --token-mixer; with --checkpoint each `mambaout train` run is measured as
trained, with its own model and mixer. Images: --data DIR (drawn at random), else a checkpoint's validation split,
else scikit-image's bundled photos (astronaut, chelsea, coffee, rocket, camera, coins, ...).
OUTPUT gets erf.json (one row per map: model, mixer, stage, wrt, file, radii, centre, images, ...), one .npy per map
(H×W float64) and erf.png (the maps side by side, colour log10 of share over peak, radii drawn).

examples:
  mambaout erf --output runs/erf                                   # femto: conv, conv_ssm, attention; stage 1
  mambaout erf --token-mixer conv,causal_conv,causal_attention --wrt tokens --img-size 64 --output runs/erf-causal
  mambaout erf --checkpoint runs/ablate/runs/*-seed0/best.pth --stage 2 --output runs/erf-trained
"""

import argparse

from mambaout.ablate import DEFAULT_ERF_MIXERS, ErfSettings, run_erf
from mambaout.ablate.erf import DEFAULT_MODEL, WRT, erf_table
from mambaout.cli.args import add_force, image_size, integer, names, yaml_mapping
from mambaout.layers import TOKEN_MIXERS


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    d = ErfSettings()
    parser.add_argument("--model", metavar="NAME", help=f"registered model at random init (default {DEFAULT_MODEL})")
    parser.add_argument("--checkpoint", nargs="+", metavar="PATH", help="`mambaout train` checkpoints, as trained")
    parser.add_argument(
        "--model-kwargs", type=yaml_mapping, metavar="YAML", help="constructor arguments, e.g. '{depths: [1, 1, 1, 1]}'"
    )
    parser.add_argument(
        "--token-mixer",
        metavar="A,B,...",
        help=f"mixers, comma-separated, from {', '.join(TOKEN_MIXERS)} (default: {','.join(DEFAULT_ERF_MIXERS)})",
    )
    parser.add_argument("--stage", type=integer(1), default=d.stage, metavar="K", help=f"stage 1-4 ({d.stage})")
    parser.add_argument("--wrt", choices=WRT, default=d.wrt, help=f"differentiate w.r.t. ({d.wrt})")
    parser.add_argument(
        "--img-size", type=image_size, metavar="S", help="square input size (default: a checkpoint's, else 224)"
    )
    parser.add_argument("--images", type=integer(1), default=d.images, metavar="N", help=f"images ({d.images})")
    parser.add_argument("--data", metavar="DIR", help="image folder (default: see above)")
    parser.add_argument("--seed", type=integer(0), default=d.seed, help=f"random init and image draw ({d.seed})")
    parser.add_argument("--device", default=d.device, help=f"auto, cpu, cuda or cuda:N ({d.device})")
    parser.add_argument("--output", required=True, metavar="DIR", help="folder for erf.json, erf.png and the maps")
    add_force(parser, "--output folder", "a `mambaout erf` folder")


def run(args: argparse.Namespace) -> int:
    kwargs = args.model_kwargs or {}
    mixers = None if args.token_mixer is None else names(args.token_mixer)
    settings = ErfSettings(
        model=args.model,
        checkpoint=tuple(args.checkpoint or ()),
        model_kwargs=kwargs,
        token_mixer=mixers,
        stage=args.stage,
        wrt=args.wrt,
        img_size=args.img_size,
        images=args.images,
        data=args.data,
        seed=args.seed,
        device=args.device,
        output=args.output,
        force=args.force,
    )
    maps = run_erf(settings)
    print(erf_table(maps), end="")
    return 0
