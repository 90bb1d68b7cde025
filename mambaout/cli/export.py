"""Export a model to ONNX, TorchScript or an ExportedProgram, then verify the file against PyTorch.

The file takes a dynamic batch (and any image size for ONNX and TorchScript, multiples of 32 for an
ExportedProgram). It is run after writing (ONNX through ONNX Runtime) on fresh inputs of other batch and image
sizes, and kept only when its outputs match PyTorch's to --atol.
"""

import argparse
from pathlib import Path

from torch import nn

from mambaout.errors import UserError
from mambaout.export import FORMATS, export_model
from mambaout.models import create_model, get_spec
from mambaout.train.checkpoint import is_run_checkpoint
from mambaout.weights import checkpoint_num_classes, load_checkpoint, our_layout, read_state_dict, unwrap_state_dict
from mambaout.weights.download import is_url
from mambaout.weights.io import read_file


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="NAME", help="variant name, see `mambaout models`")
    parser.add_argument("--checkpoint", metavar="PATH", help="weights in any layout (default: random init)")
    parser.add_argument("--format", required=True, choices=FORMATS, help="file format")
    parser.add_argument("--output", required=True, metavar="FILE", help="file to write (atomically)")
    parser.add_argument("--img-size", type=int, nargs="+", default=[224], metavar="N", help="H [W] to trace at")
    parser.add_argument("--num-classes", type=int, metavar="N", help="classifier outputs (default: checkpoint's)")
    parser.add_argument("--atol", type=float, default=1e-4, help="largest max |difference| accepted (1e-4)")
    parser.add_argument("--onnx-dynamo", action="store_true", help="use the torch.export-based ONNX exporter")
    parser.add_argument("--no-verify", action="store_true", help="skip running the written file")
    parser.add_argument(
        "--reference-graph",
        action="store_true",
        help="write the reference graph instead of the fused inference graph (same function, slower to run)",
    )


def build_model(name: str, checkpoint: str | None, num_classes: int | None) -> nn.Module:
    """Variant `name` with the checkpoint's weights (its number of classes unless `num_classes` is given), built
    with the model arguments a `mambaout train` checkpoint saved (its token mixer, say)."""
    get_spec(name)  # an unknown name fails before reading a possibly large checkpoint
    if checkpoint is None:
        return create_model(name, num_classes=num_classes)
    path = Path(checkpoint).expanduser()
    loaded = read_file(path) if not is_url(checkpoint) and path.is_file() else None
    model_kwargs = loaded["config"].get("model_kwargs") or {} if is_run_checkpoint(loaded) else {}
    state = unwrap_state_dict(loaded, name=checkpoint) if loaded is not None else read_state_dict(checkpoint)
    weights = our_layout(state, checkpoint)
    classes = checkpoint_num_classes(weights) if num_classes is None else num_classes
    model = create_model(name, num_classes=classes, **model_kwargs)
    load_checkpoint(model, weights, name=checkpoint)
    return model


def run(args: argparse.Namespace) -> int:
    if len(args.img_size) > 2 or min(args.img_size) < 32:
        raise UserError(f"--img-size takes H or H W, each at least 32, got {' '.join(map(str, args.img_size))}")
    if args.atol <= 0:
        raise UserError(f"--atol must be positive, got {args.atol}")
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
        fused=not args.reference_graph,
    )
    print(f"wrote {report.path} ({args.format}; dynamic: {', '.join(report.dynamic)})")
    for shape, diff in report.checks:
        print(f"verified on input {list(shape)}: max |difference| {diff:.2e} (<= {args.atol:g})")
    return 0
