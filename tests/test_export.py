"""Exported files reproduce the model on fresh inputs of other batch and image sizes; writes are atomic."""

import pytest
import torch
from conftest import randomize_

import mambaout
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.export import FORMATS, export_model, load_exported
from mambaout.fast.fused import fused_graph
from mambaout.models import MambaOut
from mambaout.weights import convert_state_dict, save_state_dict

SUFFIX = {"onnx": ".onnx", "torchscript": ".ts", "exported-program": ".pt2"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def femto() -> MambaOut:
    torch.manual_seed(0)
    with torch.device("meta"):
        model = mambaout.create_model("mambaout_femto")
    return randomize_(model.to_empty(device="cpu")).eval()


@pytest.mark.parametrize("fmt", FORMATS)
def test_export_verifies_and_runs_at_new_sizes(femto, fmt, tmp_path):
    out = tmp_path / f"femto{SUFFIX[fmt]}"
    report = export_model(femto, fmt, out, img_size=(64, 96))
    assert out.is_file() and report.path == out and "batch" in report.dynamic
    assert len(report.checks) == 2 and report.max_abs_diff <= 1e-4
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary left behind
    exported = load_exported(out, fmt)
    x = torch.randn(4, 3, 128, 64)
    with torch.inference_mode():
        assert (exported(x) - femto(x)).abs().max().item() <= 1e-4


def test_the_fused_graph_is_written_when_given(femto, tmp_path):
    import onnx

    ops = {}
    for fused in (True, False):
        out = tmp_path / f"{fused}.onnx"
        graph = fused_graph(femto) if fused else None
        assert export_model(femto, "onnx", out, img_size=(64, 64), graph=graph).max_abs_diff <= 1e-4
        ops[fused] = {node.op_type for node in onnx.load(str(out)).graph.node}
    # the fused blocks never split or concatenate activations; the reference blocks do, once each
    assert not ops[True] & {"Split", "Concat", "Slice"}
    assert {"Split", "Concat"} <= ops[False]


def test_onnx_dynamo_exporter(tmp_path):
    torch.manual_seed(0)
    tiny = randomize_(MambaOut(depths=(1, 1), dims=(16, 32), num_classes=7)).eval()
    report = export_model(tiny, "onnx", tmp_path / "tiny.onnx", img_size=(64, 64), onnx_dynamo=True)
    assert report.max_abs_diff <= 1e-4 and "height (x32)" in report.dynamic


def test_failed_verification_keeps_the_old_file(femto, tmp_path, monkeypatch):
    out = tmp_path / "model.ts"
    out.write_bytes(b"previous")

    def wrong(*args, **kwargs):
        raise RuntimeError("exported torchscript differs from PyTorch")

    monkeypatch.setattr("mambaout.export.writers.verify_exported", wrong)
    with pytest.raises(RuntimeError, match="differs"):
        export_model(femto, "torchscript", out, img_size=(64, 64))
    assert out.read_bytes() == b"previous"
    assert [p.name for p in tmp_path.iterdir()] == ["model.ts"]


def test_bad_requests_raise_user_errors(femto, tmp_path):
    with pytest.raises(UserError, match="unknown export format"):
        export_model(femto, "tflite", tmp_path / "m.tflite")
    with pytest.raises(UserError, match="multiples of 32"):
        export_model(femto, "exported-program", tmp_path / "m.pt2", img_size=(100, 100))
    with pytest.raises(UserError, match=r"must end in \.pt2"):
        export_model(femto, "exported-program", tmp_path / "m.ep", img_size=(64, 64))


def test_cli_export_with_a_timm_checkpoint(tmp_path, capsys):
    torch.manual_seed(1)
    with torch.device("meta"):
        model = mambaout.create_model("mambaout_femto", num_classes=5)
    model = randomize_(model.to_empty(device="cpu")).eval()
    ckpt = tmp_path / "timm.safetensors"
    save_state_dict(convert_state_dict(model.state_dict(), to="timm"), ckpt)
    out = tmp_path / "femto.onnx"
    argv = ["export", "--model", "mambaout_femto", "--checkpoint", str(ckpt), "--format", "onnx"]
    assert main([*argv, "--output", str(out), "--img-size", "64"]) == 0
    printed = capsys.readouterr().out
    assert "wrote" in printed and printed.count("verified on input") == 2
    x = torch.randn(2, 3, 96, 64)
    with torch.inference_mode():
        logits = load_exported(out, "onnx")(x)
        assert logits.shape == (2, 5) and (logits - model(x)).abs().max().item() <= 1e-4
    reference = tmp_path / "reference.onnx"
    assert main([*argv, "--output", str(reference), "--img-size", "64", "--reference-graph"]) == 0
    with torch.inference_mode():
        assert (load_exported(reference, "onnx")(x) - logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--format", "onnx", "--img-size", "16"], "must be within [32, 4096], got 16"),
        (["--format", "exported-program", "--img-size", "64"], "must end in .pt2"),
        (["--format", "onnx", "--checkpoint", "missing.pth"], "missing.pth"),
    ],
)
def test_cli_bad_flags_are_one_line_errors(extra, message, tmp_path, capsys):
    argv = ["export", "--model", "mambaout_femto", "--output", str(tmp_path / "m.out"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (tmp_path / "m.out").exists()
