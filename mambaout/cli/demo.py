"""Serve a web page that classifies photos with any checkpoint: top classes, latency, where the model looked.

With no weights named it serves the newest runs/*/best.pth of the embedded default (`bash scripts/main.sh` makes
one). The page binds to 127.0.0.1 (this machine only) unless --host says otherwise, and opens no public share link
unless --share true. Needs the `demo` extra: pip install "mambaout[demo]".

examples:
  mambaout demo                                                   # the embedded default's newest run
  mambaout demo --checkpoint runs/pets-femto/best.pth --port 8080
  mambaout demo --model mambaout_femto --pretrained official      # ImageNet weights, scikit-image photos as examples
"""

import argparse
from pathlib import Path

from mambaout.cli.args import integer, number
from mambaout.errors import UserError
from mambaout.train.distributed import resolve_device


def _on_off(text: str) -> bool:
    if text.lower() not in ("true", "false"):
        raise argparse.ArgumentTypeError(f"expects true or false, got {text!r}")
    return text.lower() == "true"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.formatter_class = argparse.RawDescriptionHelpFormatter
    parser.add_argument("--checkpoint", help="a `mambaout train` checkpoint, or a weights file with --model")
    parser.add_argument("--model", help="registered model name (default: the training checkpoint's)")
    parser.add_argument("--pretrained", metavar="SOURCE", help="weights for --model: official, timm, a path or URL")
    parser.add_argument("--ema", action="store_true", help="use the checkpoint's EMA weights")
    parser.add_argument("--runs", default="runs", help="where to look for the embedded default's runs (runs)")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (127.0.0.1; 0.0.0.0 for the network)")
    parser.add_argument("--port", type=integer(1, 65535), help="port (default: the first free one from 7860)")
    parser.add_argument("--share", type=_on_off, default=False, metavar="true|false", help="gradio share link (false)")
    parser.add_argument(
        "--max-upload-mb", type=number(0, low_open=True), default=20, help="largest upload accepted, in MB (20)"
    )
    parser.add_argument(
        "--max-megapixels",
        type=number(0, low_open=True),
        help="largest image accepted (default: PIL's decompression-bomb limit, ~89)",
    )
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


def run(args: argparse.Namespace) -> int:
    try:
        from mambaout.demo.app import serve
    except ModuleNotFoundError as e:
        if e.name != "gradio" and not (e.name or "").startswith("gradio."):
            raise
        raise UserError('the demo needs gradio: pip install "mambaout[demo]"') from None
    from mambaout.demo import bundled_examples, load_demo_classifier

    device = resolve_device(args.device)
    classifier = load_demo_classifier(args.checkpoint, args.model, args.pretrained, args.ema, device, Path(args.runs))
    print(f"serving {classifier.model_name} from {classifier.source} on {device}", flush=True)
    serve(
        classifier,
        args.host,
        args.port,
        args.share,
        args.max_upload_mb,
        args.max_megapixels,
        bundled_examples(classifier),
    )
    return 0
