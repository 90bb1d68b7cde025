"""Hostile outputs: ExportedProgram files at every size from 32 (the sizes `torch.export` specialised), `mambaout
ablate --output` naming a file or a folder of foreign files, a damaged file in the engine cache, and eval's results
JSON on a full disk (simulated with RLIMIT_FSIZE in a subprocess, as in tests/test_files.py).
"""

import dataclasses
import json
import os
import resource
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from conftest import randomize_
from dense_fixtures import SEGMENT, make_ade
from dense_fixtures import flags as dense_flags
from hostile_fixtures import assert_refused
from train_fixtures import FAST, flags, make_tree, write_image

from mambaout.cli import main
from mambaout.export import load_exported
from mambaout.fast import optimize_for_inference
from mambaout.models import MambaOut
from mambaout.train import load_classifier

SSM_MODEL = "{depths: [1, 1, 1, 1], dims: [8, 16, 24, 32], token_mixer: conv_ssm}"
LIMIT = 256  # bytes a file may reach under the simulated full disk: less than any results JSON


@dataclasses.dataclass
class Workspace:
    root: Path
    tree: Path
    recipe: Path
    conv: Path
    ssm: Path
    segment: Path


@pytest.fixture(scope="module")
def ws(tmp_path_factory) -> Workspace:
    """One-epoch runs of the 40k-parameter model (conv and conv_ssm mixers), a segmentation run, an ablation recipe,
    and the foreign files that `ablate --output` must not touch."""
    root = tmp_path_factory.mktemp("outputs")
    tree = make_tree(root / "data", classes=("cat", "dog"), train=4, val=2)
    conv, ssm, segment = root / "conv", root / "ssm", root / "segment"
    assert main(["train", "--data", str(tree), "--output", str(conv), *flags(epochs=1)]) == 0
    assert main(["train", "--data", str(tree), "--output", str(ssm), *flags(epochs=1, model_kwargs=SSM_MODEL)]) == 0
    ade = make_ade(root / "ade", train=4, val=1)
    argv = ["segment", "train", "--data", str(ade), "--output", str(segment), *dense_flags(SEGMENT, iters=2)]
    assert main(argv) == 0
    recipe = root / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({"model": "mambaout_femto", **FAST}))
    (root / "notes.txt").write_text("my notes\n")
    foreign = {
        "text": ("ablation.json", b"hello\n"),
        "binary": ("ablation.json", b"\xff\xfe\x00{"),
        "list": ("ablation.json", b'[{"config": "x", "model_kwargs": {}}]'),
        "cut": ("ablation.json", b'{"config": "x", "model_kwargs": {'),  # looks like ours, is not JSON
        "results": ("results.jsonl", b'{"experiment": "mine", "score": 3}\n'),
        "table": ("results.md", b"# my own results\n"),
    }
    for folder, (name, content) in foreign.items():
        (root / folder).mkdir()
        (root / folder / name).write_bytes(content)
    (root / "photo").mkdir()
    write_image(root / "photo" / "ablation.png", 0)
    (root / "nested" / "ablation.json").mkdir(parents=True)
    return Workspace(root, tree, recipe, conv, ssm, segment)


# --- ExportedProgram sizes -------------------------------------------------------------------------------------------

# (run, --img-size, the dims the file says are dynamic, sizes it must then take)
EXPORTS = [
    ("conv", "64", "batch, height (x32 from 64), width (x32 from 64)", [(64, 64), (128, 64), (96, 160)]),
    ("ssm", "64", "batch, height (x32 from 64), width (x32 from 64)", [(64, 64), (128, 96)]),
    ("conv", "96", "batch, height (x32 from 64), width (x32 from 64)", [(64, 64), (160, 96)]),
    ("conv", "32", "batch", [(32, 32)]),
    ("ssm", "32 96", "batch, width (x32 from 64)", [(32, 64), (32, 128)]),
]


@pytest.mark.parametrize(("run", "size", "dynamic", "sizes"), EXPORTS, ids=[f"{e[0]}-{e[1]}" for e in EXPORTS])
def test_an_exported_program_takes_every_multiple_of_32(ws, tmp_path, capsys, one_thread, run, size, dynamic, sizes):
    checkpoint = getattr(ws, run) / "best.pth"
    out = tmp_path / "model.pt2"
    argv = ["export", "--model", "mambaout_femto", "--checkpoint", str(checkpoint), "--format", "exported-program"]
    assert main([*argv, "--img-size", *size.split(), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert f"(exported-program; dynamic: {dynamic})" in printed and printed.count("verified on input") == 2
    model, program = load_classifier(str(checkpoint)).model, load_exported(out, "exported-program")
    for height, width in sizes:
        x = torch.randn(2, 3, height, width)
        with torch.inference_mode():
            assert (program(x) - model(x)).abs().max().item() <= 1e-4, (height, width)


# --- ablate --output -------------------------------------------------------------------------------------------------


def _ablate(ws: Workspace, output: Path, *extra: str) -> list[str]:
    data = ["--config", str(ws.recipe), "--data", str(ws.tree), "--mixers", "conv", "--seeds", "1", "--epochs", "1"]
    return ["ablate", *data, "--output", str(output), *extra]


# (--output under the workspace, what the one error line must name)
ABLATE_OUTPUTS = [
    ("notes.txt", "{root}/notes.txt is a file, not a folder"),
    ("text", "ablation.json already exists and is not a `mambaout ablate` ablation.json"),
    ("binary", "ablation.json already exists and is not a `mambaout ablate` ablation.json"),
    ("list", "ablation.json already exists and is not a `mambaout ablate` ablation.json"),
    ("cut", "ablation.json is not the settings of a `mambaout ablate`"),
    ("nested", "ablation.json is a folder"),
    ("results", "results.jsonl already exists and is not a `mambaout ablate` results.jsonl"),
    ("table", "results.md already exists and is not a `mambaout ablate` results.md"),
    ("photo", "ablation.png already exists and is not"),
    ("data/abl", "is inside the input folder"),
]


@pytest.mark.parametrize(("output", "named"), ABLATE_OUTPUTS, ids=[o for o, _ in ABLATE_OUTPUTS])
def test_ablate_refuses_a_file_or_foreign_files_as_its_output(ws, capsys, output, named):
    assert_refused(ws.root, capsys, _ablate(ws, ws.root / output), named.format(root=ws.root))


def test_ablate_force_replaces_foreign_files_and_a_rerun_finds_its_own(ws, tmp_path, capsys, one_thread):
    out = tmp_path / "abl"
    out.mkdir()
    (out / "ablation.json").write_text("hello\n")
    (out / "results.jsonl").write_text('{"experiment": "mine"}\n')
    assert main(_ablate(ws, out, "--force")) == 0
    (record,) = map(json.loads, (out / "results.jsonl").read_text().splitlines())
    assert record["mixer"] == "conv" and record["seed"] == 0
    assert json.loads((out / "ablation.json").read_text())["epochs"] == 1
    capsys.readouterr()
    assert main(_ablate(ws, out)) == 0  # the ablation's own four files are recognised: nothing is refused
    assert "1 run(s) already recorded" in capsys.readouterr().out


# --- the engine cache ------------------------------------------------------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _zero_tail(path: Path) -> None:  # the same length, its last weights gone: loads, but computes something else
    data = bytearray(path.read_bytes())
    data[-4096:] = bytes(4096)
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _zero_tail], ids=["truncated", "zeroed-tail"])
def test_a_damaged_cached_onnx_file_is_exported_again(tmp_path, monkeypatch, one_thread, damage):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))
    torch.manual_seed(0)
    model = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=5)).eval()
    optimize_for_inference(model, backend="onnxruntime")
    (path,) = (tmp_path / "cache" / "onnx").glob("*.onnx")
    whole = path.stat().st_size
    damage(path)
    damaged = path.stat().st_mtime_ns
    fast = optimize_for_inference(model, backend="onnxruntime")
    assert path.stat().st_size == whole and path.stat().st_mtime_ns != damaged  # written again
    x = torch.randn(2, 3, 64, 64)
    with torch.inference_mode():
        assert (fast(x) - model(x)).abs().max().item() <= 1e-4


# --- results JSON on a full disk -------------------------------------------------------------------------------------


def _limited() -> None:
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG instead of a kill
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, LIMIT))


@pytest.mark.parametrize("command", ["eval", "segment eval"])
def test_results_json_on_a_full_disk_is_one_line_and_no_wrote(ws, tmp_path, command):
    out = tmp_path / "results.json"
    out.write_bytes(b"")  # the file to keep (an empty one: any command may replace it)
    argv = {
        "eval": ["eval", "--checkpoint", str(ws.conv / "best.pth"), "--data", str(ws.tree / "val")],
        "segment eval": ["segment", "eval", "--checkpoint", str(ws.segment / "best.pth")],
    }[command]
    argv += ["--workers", "0", "--json", str(out)] + (["--backend", "torch"] if command == "eval" else [])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MAMBAOUT_CACHE": str(tmp_path / "cache")}
    done = subprocess.run(
        [sys.executable, "-m", "mambaout", *argv], capture_output=True, text=True, timeout=300, env=env,
        preexec_fn=_limited,
    )  # fmt: skip
    errors = done.stderr.strip().splitlines()
    assert done.returncode == 2 and "Traceback" not in done.stderr and len(errors) == 1, done.stderr
    assert errors[0].startswith(f"error: cannot write {out}: File too large") and errors[0].endswith("is as it was")
    assert "wrote" not in done.stdout and out.read_bytes() == b""
    assert [p.name for p in tmp_path.iterdir() if ".tmp" in p.name] == []
