"""Where commands write: one check, run before any work, that an output will not destroy anything.

Every command that writes a file calls `check_output` on it first. It refuses, with one line naming the flag:
a folder given where a file is due, a file given where its folder is due, an output that is one of the command's
inputs (compared as real paths: symlinks, `..`, hard links) or lies inside an input folder (a dataset is read whole),
a file of a training run (its checkpoints, metrics, config or lock), and an existing file that is not of the kind the
command writes (a photo or notes where predictions would go), unless `force`. `force` never lifts the others.
The write itself is atomic (`mambaout.weights.io.atomic_path`): an old file stays whole until the new one is complete.
"""

import os
import re
from collections.abc import Iterable
from pathlib import Path

from mambaout.errors import UserError
from mambaout.rundir import RunDir

__all__ = ["OUTPUT_KINDS", "PNG_SOFTWARE", "check_output", "same_file"]

_SNIFF_BYTES = 8192
_ZIP = b"PK\x03\x04"
_PNG = b"\x89PNG\r\n\x1a\n"
PNG_SOFTWARE = "mambaout"  # the Software text chunk of the PNGs we write, which tells them from a user's photos
_PREDICTION_TEXT = re.compile(rb"^[^\n]+\n +\d+\.\d+%  ")  # predict's text: a path, then "  93.40%  label" lines


def _predictions(head: bytes) -> bool:
    text = head.lstrip()
    json_list = text.startswith(b"[") and (b'"predictions"' in text or text.rstrip() == b"[]")
    return json_list or text.startswith(b"path,rank,label,index,probability") or bool(_PREDICTION_TEXT.match(text))


def _checkpoint(head: bytes) -> bool:
    return head.startswith((_ZIP, b"\x80")) or head[8:9] == b"{"  # torch zip / legacy pickle / safetensors


# Each kind of file a command writes, told from an existing file's first bytes: a file of the command's own kind
# may be replaced, anything else (a photo, notes, another tool's output) only with --force. An empty file is any kind.
OUTPUT_KINDS = {
    "eval-json": lambda head: head.lstrip().startswith(b"{") and b'"top1"' in head and b'"checkpoint"' in head,
    "predictions": _predictions,
    "bench": lambda head: head.startswith(b"### ") and b"mambaout bench" in head,
    "bench-csv": lambda head: (  # timm's benchmark columns, then our own last (a timm CSV is not ours)
        head.startswith(b"model,") and head.split(b"\n", 1)[0].rstrip().endswith(b",mambaout_path")
    ),
    "png": lambda head: head.startswith(_PNG) and PNG_SOFTWARE.encode() in head,
    "checkpoint": _checkpoint,
    "onnx": lambda head: head[:1] == b"\x08",  # an ONNX ModelProto opens with field 1, ir_version
    "zip": lambda head: head.startswith(_ZIP),  # TorchScript and ExportedProgram archives
    "dense-eval-json": lambda head: head.lstrip().startswith(b"{") and b'"checkpoint"' in head and b'"task"' in head,
    "dense-predictions": lambda head: (
        (head.lstrip().startswith(b"[") and b'"file_name"' in head) or head.strip() == b"[]"
    ),
    "scaling-json": lambda head: head.lstrip().startswith(b"{") and b'"kind": "mambaout scaling"' in head,
    "erf-json": lambda head: head.lstrip().startswith(b"{") and b'"kind": "mambaout erf"' in head,
    "npy": lambda head: head.startswith(b"\x93NUMPY"),
    "ablation-json": lambda head: head.lstrip().startswith(b"{") and b'"config"' in head and b'"model_kwargs"' in head,
    "ablation-results": lambda head: (  # results.jsonl: one run a line, each naming its mixer and seed
        head.lstrip().startswith(b"{") and b'"mixer": ' in head.split(b"\n", 1)[0] and b'"seed": ' in head
    ),
    "ablation-md": lambda head: head.startswith(b"### Ablation: "),
    "shard": lambda head: head[257:262] == b"ustar",  # a tar archive's header magic
    "shard-info": lambda head: head.lstrip().startswith(b"{") and b'"splits"' in head,
    "hub-config": lambda head: head.lstrip().startswith(b"{") and b'"architecture"' in head,
}
_DESCRIBED = {
    "eval-json": "a `mambaout eval` results file",
    "predictions": "a `mambaout predict` output",
    "bench": "a `mambaout bench` table",
    "bench-csv": "a `mambaout bench --csv` table",
    "png": "a `mambaout plot` image",
    "checkpoint": "a checkpoint",
    "onnx": "an ONNX file",
    "zip": "a TorchScript or ExportedProgram archive",
    "dense-eval-json": "a `mambaout detect|segment eval` results file",
    "dense-predictions": "a `mambaout detect|segment predict` JSON",
    "scaling-json": "a `mambaout scaling` JSON",
    "erf-json": "a `mambaout erf` JSON",
    "npy": "a NumPy .npy array",
    "ablation-json": "a `mambaout ablate` ablation.json",
    "ablation-results": "a `mambaout ablate` results.jsonl",
    "ablation-md": "a `mambaout ablate` results.md",
    "shard": "a tar shard",
    "shard-info": "a shards' _info.json",
    "hub-config": "a hub folder's config.json",
}


def same_file(a: str | os.PathLike, b: str | os.PathLike) -> bool:
    """Whether two paths name the same file: one inode (symlinks, hard links), or the same real path."""
    try:
        return os.path.samefile(a, b)
    except OSError:  # one of them does not exist (yet)
        return os.path.realpath(a) == os.path.realpath(b)


def _run_file(path: Path) -> bool:
    run = RunDir(path.parent)
    return path.name == run.lock_file.name or (path.name in {p.name for p in run.files} and run.holds_run())


def check_output(
    path: str | os.PathLike,
    flag: str,
    kind: str,
    inputs: Iterable[str | os.PathLike] = (),
    force: bool = False,
) -> Path:
    """`path` as a `Path`, once it is safe to write there; else a `UserError` naming `flag`.

    Args:
        path: The output file.
        flag: How the user gave it (`--output`, `DST`), for the message.
        kind: One of `OUTPUT_KINDS`: what the command writes there.
        inputs: The command's input files (checkpoints, images, configs) and folders (datasets: nothing inside one
            may be written).
        force: Replace an existing file of another kind (never an input, a file in an input folder, or a run's own
            file).

    Raises:
        UserError: The output is a folder, its parent is a file, it is an input or inside an input folder, it is a
            run's checkpoint, metrics or config, or it is an existing file of another kind and `force` is off.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        raise UserError(f"{flag} {path} is a folder: name a file (e.g. {path / 'out'}{_suffix(kind)})")
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise UserError(f"{flag} {path}: {parent} is a file, not a folder")
    for given in inputs:
        given = Path(given).expanduser()
        if same_file(path, given):
            raise UserError(f"{flag} {path} is also an input ({given}): writing it would destroy it; pick another name")
        if given.is_dir() and os.path.realpath(path).startswith(os.path.join(os.path.realpath(given), "")):
            raise UserError(
                f"{flag} {path} is inside the input folder {given}: writing there could destroy the data it reads; "
                "pick a path outside it"
            )
    if _run_file(path):
        raise UserError(
            f"{flag} {path} is a file of the training run in {path.parent}; writing it would destroy the run: pick "
            "another name"
        )
    if path.is_file() and not force:
        try:
            with path.open("rb") as f:
                head = f.read(_SNIFF_BYTES)
        except OSError as e:
            raise UserError(f"{flag} {path}: cannot read the existing file ({e.strerror})") from None
        if head and not OUTPUT_KINDS[kind](head):
            raise UserError(
                f"{flag} {path} already exists and is not {_DESCRIBED[kind]}: pick another name, or pass --force "
                "to replace it"
            )
    return path


def _suffix(kind: str) -> str:
    suffixes = {
        "eval-json": ".json",
        "predictions": ".json",
        "dense-eval-json": ".json",
        "dense-predictions": ".json",
        "scaling-json": ".json",
        "erf-json": ".json",
        "npy": ".npy",
        "bench": ".md",
        "bench-csv": ".csv",
        "png": ".png",
        "checkpoint": ".pth",
    }
    return suffixes.get(kind, {"onnx": ".onnx", "zip": ".pt"}.get(kind, ""))
