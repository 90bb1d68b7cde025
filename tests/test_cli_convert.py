"""`mambaout convert`: every target layout and format, the --model check, and one-line errors that leave DST alone."""

import os
from pathlib import Path

import pytest
import torch
from conftest import randomize_

from mambaout.cli import main
from mambaout.models import MambaOut, get_spec
from mambaout.weights import convert_state_dict, detect_layout, read_state_dict
from mambaout.weights.io import file_format


@pytest.fixture(scope="module")
def femto(tmp_path_factory) -> tuple[dict[str, torch.Tensor], Path]:
    """Random femto weights and a training-style checkpoint of them (model, optimizer, config, EMA)."""
    with torch.device("meta"):
        model = get_spec("mambaout_femto").build()
    weights = randomize_(model.to_empty(device="cpu")).state_dict()
    path = tmp_path_factory.mktemp("femto") / "last.pth"
    torch.save({"model": weights, "optimizer": {"state": {}}, "config": {"lr": 4e-3}, "ema": None, "epoch": 3}, path)
    return weights, path


def assert_same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    assert all(torch.equal(a[k], b[k]) for k in a)


def assert_one_error_line(capsys, *fragments: str) -> None:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize(
    "to, dst_name, layout, fmt",
    [
        ("mambaout", "out.pth", "mambaout", "torch"),
        ("official", "mambaout_femto.pth", "official", "torch"),
        ("timm", "model.safetensors", "timm", "safetensors"),
        ("safetensors", "femto.safetensors", "mambaout", "safetensors"),
    ],
)
def test_convert_to_each_layout(femto, tmp_path, capsys, to, dst_name, layout, fmt):
    weights, src = femto
    dst = tmp_path / dst_name
    assert main(["convert", str(src), str(dst), "--to", to, "--model", "mambaout_femto"]) == 0
    out = capsys.readouterr().out.strip()
    assert out == f"wrote {dst}: {len(weights)} tensors, {layout} layout, {fmt} format, checked against mambaout_femto"
    assert file_format(dst) == fmt
    converted = read_state_dict(dst)
    assert detect_layout(converted) == layout
    assert_same_tensors(convert_state_dict(converted, to="mambaout"), weights)


def test_convert_between_other_layouts(femto, tmp_path, capsys):
    weights, src = femto
    timm_file, official_file = tmp_path / "timm.safetensors", tmp_path / "official.pth"
    assert main(["convert", str(src), str(timm_file), "--to", "timm"]) == 0
    assert main(["convert", str(timm_file), str(official_file), "--to", "official", "--model", "mambaout_femto"]) == 0
    assert_same_tensors(convert_state_dict(read_state_dict(official_file), to="mambaout"), weights)
    assert capsys.readouterr().out.count("wrote") == 2


def test_convert_takes_ema_weights(femto, tmp_path, capsys):
    weights, _ = femto
    ema = {k: v + 1 for k, v in weights.items()}
    src = tmp_path / "ckpt.pth"
    torch.save({"model": weights, "ema": ema}, src)
    assert main(["convert", str(src), str(tmp_path / "ema.safetensors"), "--to", "safetensors", "--ema"]) == 0
    assert_same_tensors(read_state_dict(tmp_path / "ema.safetensors"), ema)


def _rw_checkpoint(tmp_path: Path) -> Path:
    rw = MambaOut(
        depths=(1, 1, 1, 1),
        dims=(8, 16, 24, 32),
        stem_mid_norm=False,
        downsample_norm_first=True,
        ls_init_value=1e-6,
        head_hidden_norm=False,
    )
    torch.save(rw.state_dict(), tmp_path / "rw.pth")
    return tmp_path / "rw.pth"


FAILURES = {
    "missing_src": (lambda d, src: ["missing.pth", "out.pth", "--to", "timm"], "no such file"),
    "text_src": (lambda d, src: ["notes.txt", "out.pth", "--to", "timm"], "not a PyTorch or safetensors"),
    "wrong_variant": (lambda d, src: [src, "out.pth", "--to", "timm", "--model", "mambaout_tiny"], "does not fit"),
    "unknown_model": (lambda d, src: [src, "out.pth", "--to", "timm", "--model", "mambaout_tinyy"], "unknown model"),
    "rw_to_official": (lambda d, src: [str(_rw_checkpoint(d)), "out.pth", "--to", "official"], "rw variant"),
    "safetensors_to_pth": (lambda d, src: [src, "out.pth", "--to", "safetensors"], "'*.safetensors'"),
    "bad_sha256": (lambda d, src: [src, "out.pth", "--to", "timm", "--sha256", "0" * 64], "SHA-256 mismatch"),
    "missing_dst_folder": (lambda d, src: [src, "nope/out.pth", "--to", "timm"], "cannot write"),
}


@pytest.mark.parametrize("case", list(FAILURES))
def test_failed_convert_is_one_line_and_leaves_dst_alone(femto, tmp_path, capsys, monkeypatch, case):
    _, src = femto
    monkeypatch.chdir(tmp_path)
    Path("notes.txt").write_text("not weights\n")
    torch.save({"older": torch.zeros(3)}, "out.pth")  # an older conversion
    before = Path("out.pth").read_bytes()
    argv, message = FAILURES[case]
    assert main(["convert", *argv(tmp_path, str(src))]) == 2
    assert_one_error_line(capsys, message)
    assert Path("out.pth").read_bytes() == before
    assert not [name for name in os.listdir() if ".tmp" in name]
