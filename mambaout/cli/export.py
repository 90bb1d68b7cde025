"""Export a model to ONNX, TorchScript or an ExportedProgram, then verify the file against PyTorch; or share a
training run as a hub folder in timm's format (`--format hub`).

The file takes a dynamic batch (and any image size for ONNX and TorchScript; for an ExportedProgram, multiples of 32
from 64, a side traced at 32 staying fixed). It is run after writing (ONNX through ONNX Runtime) on fresh inputs of
other batch and image sizes, and kept only when its outputs match PyTorch's to --atol. A hub folder (`config.json` +
`model.safetensors`) carries the run's classes and preprocessing, so `timm.create_model("local-dir:DIR",
pretrained=True)` and `mambaout predict --checkpoint local-dir:DIR` classify as `mambaout eval` does
(`mambaout.train.share`).
"""

import argparse
from pathlib import Path

from torch import nn

from mambaout.cli.args import add_force, integer, number
from mambaout.errors import UserError
from mambaout.export import FORMATS, export_model
from mambaout.fast.fused import fused_graph
from mambaout.limits import MAX_INPUT_SIZE
from mambaout.models import create_model, get_spec
from mambaout.models.settings import create_configured_model
from mambaout.outputs import check_output
from mambaout.train.checkpoint import is_run_checkpoint
from mambaout.train.share import share_run
from mambaout.weights import checkpoint_num_classes, load_checkpoint, our_layout, read_state_dict, unwrap_state_dict
from mambaout.weights.download import is_url
from mambaout.weights.hub import CONFIG_NAME as HUB_CONFIG
from mambaout.weights.hub import WEIGHTS_NAME as HUB_WEIGHTS
from mambaout.weights.io import read_file

HUB = "hub"  # --format hub: a hub folder in timm's format


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--model", metavar="NAME", help="variant name, see `mambaout models` (--format hub: the checkpoint's)"
    )
    parser.add_argument("--checkpoint", metavar="PATH", help="weights in any layout (default: random init)")
    parser.add_argument("--format", required=True, choices=(*FORMATS, HUB), help="file format, or a hub folder")
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write (atomically); hub: a folder")
    add_force(parser, "--output", "an export file")
    parser.add_argument(
        "--img-size", type=integer(32, MAX_INPUT_SIZE), nargs="+", default=[224], metavar="N", help="H [W] to trace at"
    )
    parser.add_argument(
        "--num-classes", type=integer(0), metavar="N", help="classifier outputs, 0 for features (default: checkpoint's)"
    )
    parser.add_argument(
        "--atol", type=number(0, low_open=True), default=1e-4, help="largest max |difference| accepted (1e-4)"
    )
    parser.add_argument("--onnx-dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    parser.add_argument("--no-verify", action="store_true", help="skip running the written file")
    parser.add_argument(
        "--reference-graph",
        action="store_true",
        help="write the reference graph instead of the fused inference graph (same function, slower to run)",
    )


def build_model(name: str, checkpoint: str | None, num_classes: int | None) -> nn.Module:
    """Variant `name` with the checkpoint's weights (its number of classes unless `num_classes` is given).

    A `mambaout train` checkpoint brings its model's constructor arguments (`--model-kwargs`).
    """
    get_spec(name)  # an unknown name fails before reading a possibly large checkpoint
    if checkpoint is None:
        return create_model(name, num_classes=num_classes)
    loaded = None if is_url(checkpoint) else read_file(Path(checkpoint).expanduser())
    kwargs = {}
    if is_run_checkpoint(loaded):
        if loaded["model_name"] != name:
            raise UserError(
                f"{checkpoint} holds a {loaded['model_name']}, not a {name}: pass --model {loaded['model_name']}"
            )
        kwargs = loaded["config"].get("model_kwargs", {})
    weights = unwrap_state_dict(loaded, name=checkpoint) if loaded is not None else read_state_dict(checkpoint)
    weights = our_layout(weights, checkpoint)
    classes = checkpoint_num_classes(weights) if num_classes is None else num_classes
    model = create_configured_model(name, kwargs, f"{checkpoint}'s model_kwargs", num_classes=classes)
    load_checkpoint(model, weights, name=checkpoint)
    return model


def _share(args: argparse.Namespace) -> int:
    """`--format hub`: the run's classifier, classes and preprocessing as a hub folder."""
    if not args.checkpoint:
        raise UserError("--format hub shares a trained model: give its checkpoint with --checkpoint RUN/best.pth")
    folder = Path(args.output).expanduser()
    if folder.exists() and not folder.is_dir():
        raise UserError(f"--output {folder} is a file: --format hub writes a folder (config.json, model.safetensors)")
    inputs = [] if is_url(args.checkpoint) else [Path(args.checkpoint)]
    for name, kind in ((HUB_CONFIG, "hub-config"), (HUB_WEIGHTS, "checkpoint")):
        check_output(folder / name, "--output", kind, inputs=inputs, force=args.force)
    classifier = share_run(args.checkpoint, folder, model_name=args.model)
    size = "x".join(map(str, classifier.data["input_size"][1:]))
    print(
        f"wrote {folder} (hub folder: {HUB_CONFIG}, {HUB_WEIGHTS}): {classifier.model_name}, "
        f"{len(classifier.class_names)} classes, input {size}, crop_pct {classifier.data['crop_pct']:g}, "
        f'{classifier.data["interpolation"]}; load it with timm.create_model("local-dir:{folder}", pretrained=True)'
    )
    return 0


def run(args: argparse.Namespace) -> int:
    if args.format == HUB:
        return _share(args)
    if not args.model:
        raise UserError(f"--format {args.format} needs --model NAME (see `mambaout models`)")
    if len(args.img_size) > 2:
        raise UserError(f"--img-size takes H or H W, got {' '.join(map(str, args.img_size))}")
    inputs = [Path(args.checkpoint)] if args.checkpoint and not is_url(args.checkpoint) else []
    kind = "onnx" if args.format == "onnx" else "zip"
    check_output(args.output, "--output", kind, inputs=inputs, force=args.force)
    size = (args.img_size[0], args.img_size[-1])
    model = build_model(args.model, args.checkpoint, args.num_classes)
    report = export_model(
        model,
        args.format,
        args.output,
        size,
        verify=not args.no_verify,
        atol=args.atol,
        onnx_dynamo=args.onnx_dynamo,
        graph=None if args.reference_graph else fused_graph(model),
    )
    print(f"wrote {report.path} ({args.format}; dynamic: {', '.join(report.dynamic)})")
    for shape, diff in report.checks:
        print(f"verified on input {list(shape)}: max |difference| {diff:.2e} (<= {args.atol:g})")
    return 0
