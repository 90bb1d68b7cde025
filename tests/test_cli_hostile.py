"""Every subcommand under bad input: exit status 2, one `error:` line naming the flag or file, no traceback, and
nothing on disk changed.

Cases come from the parsers (every checked numeric or choice flag of every subcommand, with values out of range, not
finite or not numbers), from the training config (every setting), and from the paths each writer must refuse (a folder
for a file, a file for a folder, an output equal to an input through a symlink or `..`, a run's own files, a file of
another kind), plus the hostile files of issue 10 (a YAML bomb, bytes that are not UTF-8, crafted checkpoints).
"""

import argparse
import dataclasses
import os
import typing
from pathlib import Path

import pytest
from dense_fixtures import DETECT, SEGMENT, make_ade, make_coco
from dense_fixtures import flags as dense_flags
from hostile_fixtures import assert_refused
from train_fixtures import flags, make_tree, write_image

from mambaout.cli import SUBCOMMANDS, build_parser, main
from mambaout.dense.config import DetectConfig, SegmentConfig
from mambaout.train.checkpoint import read_checkpoint, save_checkpoint
from mambaout.train.config import TrainConfig

BAD_NUMBERS = ("nan", "inf", "-7", "abc", "")
YAML_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{b}: &{b} [*{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}, *{a}]\n"
    for a, b in zip("abcdefgh", "bcdefghi", strict=True)
)


@dataclasses.dataclass
class Workspace:
    root: Path
    tree: Path
    run: Path
    photo: Path
    coco: Path
    ade: Path
    detect: Path
    segment: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    root = tmp_path_factory.mktemp("hostile")
    tree = make_tree(root / "data", classes=("cat", "dog"), train=4, val=2)
    run = root / "run"
    assert main(["train", "--data", str(tree), "--output", str(run), *flags(epochs=1)]) == 0
    photo = write_image(root / "photo.png", 0)
    (root / "notes.txt").write_text("my notes\n")
    (root / "folder").mkdir()
    (root / "link.png").symlink_to(photo)
    (root / "link.pth").symlink_to(run / "last.pth")
    (root / "binary.yaml").write_bytes(b"epochs: \xff\xfe\x00\x81\n")
    (root / "bomb.yaml").write_text(YAML_BOMB + "opt: *i\n")
    (root / "pipes").mkdir()
    for name in ("pipe.pth", "pipe.yaml"):  # reading one would wait for a writer forever
        os.mkfifo(root / "pipes" / name)
    (root / "halfrun").mkdir()
    (root / "halfrun" / "metrics.jsonl").write_text('{"epoch": 1}\n')
    checkpoint = read_checkpoint(run / "last.pth")
    save_checkpoint({k: v for k, v in checkpoint.items() if k != "optimizer"} | {"optimizer": {}}, root / "crafted.pth")
    save_checkpoint(checkpoint | {"config": {**checkpoint["config"], "model_kwargs": [1, 2]}}, root / "kwargs.pth")
    save_checkpoint(checkpoint | {"config": {**checkpoint["config"], "model_kwargs": {"wings": 2}}}, root / "arg.pth")
    nan = {k: v.clone() for k, v in checkpoint["model"].items()}
    nan["head.fc.weight"][0, 0] = float("nan")
    save_checkpoint(checkpoint | {"model": nan}, root / "nan.pth")
    coco, ade = make_coco(root / "coco", train=4, val=1), make_ade(root / "ade", train=4, val=1)
    detect, segment = root / "detect-run", root / "segment-run"
    assert main(["detect", "train", "--data", str(coco), "--output", str(detect), *dense_flags(DETECT, epochs=1)]) == 0
    assert main(["segment", "train", "--data", str(ade), "--output", str(segment), *dense_flags(SEGMENT, iters=2)]) == 0
    return Workspace(root, tree, run, photo, coco, ade, detect, segment)


def _base(ws: Workspace, command: str) -> list[str]:
    """A valid command line for `command` (it would run and write), to which a case adds one bad part."""
    ckpt = str(ws.run / "best.pth")
    return {
        "models": ["models"],
        "convert": ["convert", ckpt, str(ws.root / "out.pth"), "--to", "timm"],
        "train": ["train", "--data", str(ws.tree), "--output", str(ws.root / "new"), *flags(epochs=1)],
        "eval": ["eval", "--checkpoint", ckpt, "--workers", "0", "--json", str(ws.root / "e.json")],
        "predict": ["predict", str(ws.photo), "--checkpoint", ckpt, "--output", str(ws.root / "p.json")],
        "plot": ["plot", str(ws.run), "--output", str(ws.root / "curves.png")],
        "bench": ["bench", "--model", "mambaout_femto", "--repeats", "1", "--batch-size", "1"],
        "export": ["export", "--model", "mambaout_femto", "--format", "onnx", "--output", str(ws.root / "m.onnx")],
        # a valid demo would serve until stopped: a checkpoint that is missing makes a case that slips through fail
        "demo": ["demo", "--checkpoint", str(ws.root / "missing.pth")],
        "tokens": ["tokens"],
        # as for demo: a case that slips through fails on the missing data, not by running an ablation
        "ablate": ["ablate", "--data", str(ws.root / "missing"), "--output", str(ws.root / "abl")],
        # a case that slips through measures one tiny size and fails on the JSON file it wrote
        "scaling": [
            "scaling", "--sizes", "32", "--mixers", "conv", "--repeats", "1", "--json", str(ws.root / "s.json"),
        ],
        "erf": ["erf", "--data", str(ws.root / "missing"), "--output", str(ws.root / "erf")],
        "data shards": ["data", "shards", str(ws.tree), str(ws.root / "shards")],
        "detect train": [
            "detect", "train", "--data", str(ws.coco), "--output", str(ws.root / "new-detect"),
            *dense_flags(DETECT, epochs=1),
        ],
        "detect eval": [
            "detect", "eval", "--checkpoint", str(ws.detect / "best.pth"), "--workers", "0", "--json",
            str(ws.root / "de.json"),
        ],
        "detect predict": [
            "detect", "predict", str(ws.photo), "--checkpoint", str(ws.detect / "best.pth"), "--output",
            str(ws.root / "detections"),
        ],
        "segment train": [
            "segment", "train", "--data", str(ws.ade), "--output", str(ws.root / "new-segment"),
            *dense_flags(SEGMENT, iters=2),
        ],
        "segment eval": [
            "segment", "eval", "--checkpoint", str(ws.segment / "best.pth"), "--workers", "0", "--json",
            str(ws.root / "se.json"),
        ],
        "segment predict": [
            "segment", "predict", str(ws.photo), "--checkpoint", str(ws.segment / "best.pth"), "--output",
            str(ws.root / "segments"),
        ],
    }[command]  # fmt: skip


# the commands whose settings are generated from a config class (`_config_cases`), not read from their parser
TRAINERS = {"train": TrainConfig, "detect train": DetectConfig, "segment train": SegmentConfig}


def _parser_cases() -> list[tuple[str, list[str], str]]:
    """(command, bad flag and value, the flag): every checked numeric flag and every choice flag of every parser."""
    subparsers = next(a for a in build_parser()._actions if a.dest == "command").choices
    parsers = {}
    for command in SUBCOMMANDS:  # `mambaout detect train` and the like: every action of a command with actions
        nested = [a for a in subparsers[command]._actions if isinstance(a, argparse._SubParsersAction)]
        parsers.update({f"{command} {n}": p for n, p in nested[0].choices.items()} if nested else {command: None})
        parsers[command] = parsers.get(command) or subparsers[command]
    cases = []
    for command, parser in parsers.items():
        if command in SUBCOMMANDS and any(c.startswith(f"{command} ") for c in parsers):
            continue  # a command of actions takes none of its own flags
        for action in parser._actions:
            name = next((o for o in action.option_strings if o.startswith("--")), None)
            if name is None or (command in TRAINERS and name not in ("--config", "--resume")):
                continue  # the trainers' settings are generated from their config classes below
            nargs = action.nargs if isinstance(action.nargs, int) else 1
            if getattr(action.type, "__module__", "") == "mambaout.cli.args":
                cases += [(command, [name, *[value] * nargs], name) for value in BAD_NUMBERS]
            elif action.choices:
                cases.append((command, [name, "bogus"], name))
    return cases


def _config_cases() -> list[tuple[str, list[str], str]]:
    """(command, bad flag and value, the flag) for every setting of every trainer that takes a value."""
    return [case for command, cls in TRAINERS.items() for case in _settings_cases(command, cls)]


def _settings_cases(command: str, cls: type) -> list[tuple[str, list[str], str]]:
    hints = typing.get_type_hints(cls)
    cases = []
    for field in dataclasses.fields(cls):
        name = "--" + field.name.replace("_", "-")
        hint = hints[field.name]
        if hint is bool:
            continue  # on/off switches take no value
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        inner = args[0] if typing.get_origin(hint) in (typing.Union, type(int | None)) else hint
        width = len(typing.get_args(inner)) if typing.get_origin(inner) is tuple else 1
        if inner in (int, float) or typing.get_origin(inner) is tuple:
            values = ["nan", "abc"] + ([] if field.name == "mean" else ["-7"])  # a negative mean is a mean
            cases += [(command, [name, *[v] * width], name) for v in values]
        elif inner is str and field.name not in ("output", "data", "pretrained"):
            cases.append((command, [name, "bogus"], name))
    return cases


def _path_cases(ws: Workspace) -> list[tuple[str, list[str], str]]:
    """(command, argv, what the line must name): outputs that would destroy something, hostile files and folders."""
    r, run, photo, best, last = ws.root, ws.run, str(ws.photo), str(ws.run / "best.pth"), str(ws.run / "last.pth")
    dotted = str(r / "data" / ".." / "run" / "best.pth")
    train = [*_base(ws, "train")]
    return [
        ("convert", ["convert", last, last, "--to", "mambaout"], "is also an input"),
        ("convert", ["convert", last, str(r / "link.pth"), "--to", "mambaout"], "is also an input"),
        ("convert", ["convert", best, dotted, "--to", "timm"], "is also an input"),
        ("convert", ["convert", best, last, "--to", "timm"], "training run"),
        ("convert", ["convert", best, str(r / "folder"), "--to", "timm"], "is a folder"),
        ("convert", ["convert", best, str(r / "notes.txt"), "--to", "timm"], "not a checkpoint"),
        ("convert", ["convert", best, str(r / "notes.txt" / "x.pth"), "--to", "timm"], "is a file, not a folder"),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", photo], "is also an input"),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", str(r / "link.png")], "is also an input"),
        ("predict", ["predict", str(r), "--checkpoint", best, "--output", photo], "is also an input"),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", str(r / "folder")], "is a folder"),
        (
            "predict",
            ["predict", photo, "--checkpoint", best, "--output", str(r / "notes.txt")],
            "mambaout predict` output",
        ),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", str(run / "metrics.jsonl")], "training run"),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", str(run / ".lock"), "--force"], "run"),
        ("predict", ["predict", photo, "--checkpoint", best, "--output", best], "is also an input"),
        ("predict", ["predict", photo, "--checkpoint", str(r / "kwargs.pth")], "model_kwargs must be a mapping"),
        ("predict", ["predict", photo, "--checkpoint", str(r / "arg.pth")], "wings"),
        ("predict", ["predict", str(r / "missing.png"), "--checkpoint", best], "no such file or folder"),
        ("predict", ["predict", photo, "--checkpoint", best, "--device", "tpu"], "--device tpu"),
        ("eval", ["eval", "--checkpoint", best, "--json", best], "is also an input"),
        ("eval", ["eval", "--checkpoint", best, "--json", dotted], "is also an input"),
        ("eval", ["eval", "--checkpoint", best, "--json", str(r / "folder")], "is a folder"),
        ("eval", ["eval", "--checkpoint", best, "--json", str(run / "metrics.jsonl")], "training run"),
        ("eval", ["eval", "--checkpoint", best, "--json", photo], "`mambaout eval` results file"),
        ("eval", ["eval", "--checkpoint", best, "--json", str(r / "notes.txt" / "e.json")], "is a file"),
        ("eval", ["eval", "--checkpoint", best, "--input-size", "0", "--json", str(r / "e.json")], "--input-size"),
        ("eval", ["eval", "--checkpoint", best, "--crop-pct", "0", "--json", str(r / "e.json")], "--crop-pct"),
        ("eval", ["eval", "--checkpoint", best, "--input-size", "100000"], "--input-size"),
        ("eval", ["eval", "--checkpoint", str(r / "kwargs.pth"), "--json", str(r / "e.json")], "model_kwargs"),
        ("eval", ["eval", "--checkpoint", best, "--input-size", "4096", "--batch-size", "100000"], "GiB free"),
        ("eval", ["eval", "--checkpoint", best, "--device", "tpu", "--json", str(r / "e.json")], "--device tpu"),
        ("eval", ["eval", "--checkpoint", str(r / "folder"), "--model", "mambaout_femto"], "folder"),
        ("plot", ["plot", str(run), "--output", str(run / "metrics.jsonl")], "is also an input"),
        ("plot", ["plot", str(run), "--output", last], "would destroy it"),
        ("plot", ["plot", str(run), "--output", str(r / "folder")], "is a folder"),
        ("plot", ["plot", str(run), "--output", photo], "`mambaout plot` image"),
        ("plot", ["plot", str(r / "folder")], "metrics.jsonl does not exist"),
        ("export", [*_base(ws, "export"), "--checkpoint", best, "--output", best], "is also an input"),
        ("export", [*_base(ws, "export"), "--output", str(r / "folder")], "is a folder"),
        ("export", [*_base(ws, "export"), "--output", str(r / "notes.txt")], "not an ONNX file"),
        ("export", [*_base(ws, "export"), "--checkpoint", str(r / "nan.pth")], "NaN or inf"),
        ("export", [*_base(ws, "export"), "--checkpoint", str(r / "arg.pth")], "wings"),
        ("bench", [*_base(ws, "bench"), "--output", str(r / "folder")], "is a folder"),
        ("bench", [*_base(ws, "bench"), "--output", str(r / "notes.txt" / "b.md")], "is a file, not a folder"),
        ("bench", [*_base(ws, "bench"), "--output", photo], "`mambaout bench` table"),
        ("models", ["models", "zzz*"], "no model matches"),
        ("train", [*train, "--config", str(r / "missing.yaml")], "--config"),
        ("train", [*train, "--config", str(r / "folder")], "--config"),
        ("train", [*train, "--config", str(r / "binary.yaml")], "not UTF-8"),
        ("train", [*train, "--config", str(r / "bomb.yaml")], "aliases"),
        ("train", [*train, "--config", str(r / "pipes" / "pipe.yaml")], "pipe.yaml is not a regular file"),
        ("train", ["train", "--resume", str(r / "pipes" / "pipe.pth")], "pipe.pth is a FIFO, not a checkpoint"),
        ("eval", ["eval", "--checkpoint", str(r / "pipes" / "pipe.pth")], "pipe.pth is a FIFO, not a checkpoint"),
        ("predict", ["predict", photo, "--checkpoint", str(r / "pipes" / "pipe.pth")], "pipe.pth is a FIFO"),
        ("train", [*train, "--model-kwargs", "{dims: [-1, 2, 3, 4]}"], "--model-kwargs"),
        ("train", [*train, "--model-kwargs", "{depths: [1, 1]}"], "--model-kwargs"),
        ("train", [*train, "--model-kwargs", "{wings: 2}"], "--model-kwargs"),
        ("train", [*train, "--model-kwargs", "[1, 2]"], "--model-kwargs"),
        ("train", [*train, "--model-kwargs", "{depths: &x [1, 1, 1, 1], dims: *x}"], "aliases"),
        ("train", [*train, "--seed", str(2**70)], "--seed"),
        ("train", [*train, "--opt", "x" * 100_000], "--opt"),  # echoed cut short: the line stays short
        ("train", [*train, "--model", "mambaout_base", "--model-kwargs", "{}", "--input-size", "4096"], "GiB free"),
        ("train", [*train, "--std", "0", "0", "0"], "--std"),
        ("train", [*train, "--opt-betas", "2", "2"], "--opt-betas"),
        ("train", [*train, "--opt", "sgd", "--momentum", "0"], "--opt sgd"),  # Nesterov needs a momentum
        ("train", [*train, "--output", str(r / "notes.txt")], "--output"),
        ("train", [*train, "--output", str(run)], "already holds a run"),
        ("train", [*train, "--data", str(r / "notes.txt")], "--data"),
        ("train", [*train, "--pretrained", "bogus"], "--pretrained bogus"),
        ("train", [*train, "--epochs", "2", "--warmup-epochs", "3"], "--warmup-epochs"),
        ("train", ["train", "--output", str(r / "halfrun"), "--resume", "auto"], "no last.pth"),
        ("train", ["train", "--resume", str(r / "crafted.pth")], "param_groups"),
        ("train", ["train", "--resume", str(r / "missing.pth")], "--resume"),
        ("train", ["train", "--output", str(run), "--resume", "auto", "--opt", "sgd"], "cannot change"),
        ("train", ["train", "--output", str(run), "--resume", "auto", "--layer-decay", "0.8"], "--layer-decay"),
        *_dense_path_cases(ws),
    ]


def _dense_path_cases(ws: Workspace) -> list[tuple[str, list[str], str]]:
    """The dense commands' outputs that would destroy something, and their hostile inputs."""
    r, photo, det, seg = ws.root, str(ws.photo), ws.detect / "best.pth", ws.segment / "best.pth"
    predict = ["detect", "predict", photo, "--checkpoint", str(det)]
    return [
        ("detect eval", ["detect", "eval", "--checkpoint", str(det), "--json", str(det)], "is also an input"),
        ("detect eval", ["detect", "eval", "--checkpoint", str(det), "--json", photo], "eval` results file"),
        ("detect eval", ["detect", "eval", "--checkpoint", str(seg)], "is a segmentation checkpoint"),
        ("detect eval", ["detect", "eval", "--checkpoint", str(r / "pipes" / "pipe.pth")], "pipe.pth is a FIFO"),
        ("detect eval", ["detect", "eval", "--checkpoint", str(ws.run / "best.pth")], "is a classification"),
        ("detect predict", [*predict, "--output", str(r / "notes.txt")], "is a file"),
        ("detect predict", [*predict, "--output", str(r)], "is also an input"),  # photo.png over the photo
        ("detect predict", ["detect", "predict", str(r / "missing.png"), "--checkpoint", str(det)], "missing.png"),
        ("segment predict", ["segment", "predict", photo, "--checkpoint", str(det)], "is a detection checkpoint"),
        ("segment eval", ["segment", "eval", "--checkpoint", str(seg), "--json", str(ws.segment / "last.pth")],
         "training run"),
        ("detect train", [*_base(ws, "detect train"), "--data", str(ws.ade)], "no annotation file"),
        ("detect train", [*_base(ws, "detect train"), "--min-size", "64", "--max-size", "32"], "--max-size"),
        ("detect train", [*_base(ws, "detect train"), "--output", str(ws.detect)], "already holds a run"),
        ("segment train", [*_base(ws, "segment train"), "--batch-size", "1", "--head-norm", "batch"], "--batch-size"),
        ("segment train", [*_base(ws, "segment train"), "--num-classes", "7"], "--num-classes 7"),
        ("segment train", ["segment", "train", "--output", str(ws.detect), "--resume", "auto"], "detection run"),
        ("segment train", ["segment", "train", "--output", str(ws.segment), "--resume", "auto", "--head-norm",
                           "group"], "cannot change"),
    ]  # fmt: skip


def _assert_refused(ws: Workspace, capsys, argv: list[str], named: str) -> None:
    assert_refused(ws.root, capsys, argv, named)


@pytest.mark.parametrize(("command", "extra", "named"), _parser_cases() + _config_cases())
def test_bad_flag_values_are_refused(ws, capsys, command, extra, named):
    _assert_refused(ws, capsys, [*_base(ws, command), *extra], named)


@pytest.mark.filterwarnings("ignore:.*holds non-finite weights")  # nan.pth's warning, before its refusal
def test_bad_paths_and_files_are_refused(ws, capsys):
    for _command, argv, named in _path_cases(ws):
        _assert_refused(ws, capsys, argv, named)
