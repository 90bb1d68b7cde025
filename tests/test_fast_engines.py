"""Every backend of `optimize_for_inference` computes the reference function; auto routes by shape; threads fit the
free cores; the ONNX file is exported once per weights. Results within 1e-4 of the reference on fresh inputs."""

import json
import subprocess
import sys
import time

import pytest
import torch
from conftest import randomize_
from train_fixtures import write_image

import mambaout
from mambaout.cli import main
from mambaout.errors import UserError
from mambaout.fast import AUTO_RULE, AUTO_TRIALS, BACKENDS, KernelSet, inference_module, optimize_for_inference
from mambaout.fast import engines as engines_module
from mambaout.fast import optimize as optimize_module
from mambaout.fast import threads as threads_module
from mambaout.fast.engines import OnnxRuntimeEngine, OpenVINOEngine, onnx_file
from mambaout.fast.threads import ThreadFitter
from mambaout.models import MambaOut

ATOL = 1e-4

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(autouse=True)
def _cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MAMBAOUT_CACHE", str(tmp_path / "cache"))


def tiny(seed: int = 0, **kwargs) -> MambaOut:
    torch.manual_seed(seed)
    return randomize_(MambaOut(depths=(1, 2), dims=(16, 32), num_classes=10, **kwargs)).eval()


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape and a.dtype == b.dtype
    return (a - b).abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_every_backend_matches_the_reference(backend):
    ref = tiny()
    fast = optimize_for_inference(ref, backend=backend)
    assert fast.backend == backend
    for shape in ((1, 3, 64, 96), (3, 3, 72, 40)):
        images = torch.randn(shape)
        with torch.inference_mode():
            assert max_diff(fast(images), ref(images)) <= ATOL
            if backend == "auto":
                chosen = fast.tune(images)  # every candidate has now run this shape
                assert fast.tuner.chosen(shape) == chosen == fast.backend_for(images)
                assert max_diff(fast(images), ref(images)) <= ATOL
            else:
                assert fast.backend_for(images) == backend
    if backend == "torch":
        assert fast.engine is None and fast.tuner is None and fast.describe_backend() == "torch"


def test_auto_times_each_backend_on_a_new_shape_then_keeps_the_fastest(monkeypatch):
    ref = tiny()
    fast = optimize_for_inference(ref)
    assert fast.auto_engine and not fast.engines  # exported on the first call that goes to an engine
    candidates = fast.tuner.candidates
    assert candidates[0] == "torch" and AUTO_RULE.engine in candidates
    small, large = torch.randn(2, 3, 64, 64), torch.randn(1, 3, 288, 256)
    assert AUTO_RULE.routes(small.shape) and not AUTO_RULE.routes(large.shape)
    assert fast.backend_for(small) == AUTO_RULE.engine and fast.backend_for(large) == "torch"  # the first tries
    winner = candidates[-1]  # every other backend is made slower by 50 ms a call
    real_run, calls = fast._run_on, []

    def run_on(backend, x):
        calls.append(backend)
        if backend != winner:
            time.sleep(0.05)
        return real_run(backend, x)

    monkeypatch.setattr(fast, "_run_on", run_on)
    order = [AUTO_RULE.engine, *(c for c in candidates if c != AUTO_RULE.engine)]
    with torch.inference_mode():
        for i in range(len(candidates) * AUTO_TRIALS):
            assert max_diff(fast(small), ref(small)) <= ATOL
            if i == 0:
                assert f"2x3x64x64: still measuring (fastest calls: {AUTO_RULE.engine} " in fast.describe_backend()
        assert calls == [c for c in order for _ in range(AUTO_TRIALS)]  # each backend's tries in a row
        assert fast.tuner.chosen(small.shape) == winner == fast.backend_for(small)
        assert max_diff(fast(small), ref(small)) <= ATOL and calls[-1] == winner
        assert fast.tune(large) == winner and calls[len(candidates) * AUTO_TRIALS + 1] == "torch"
    assert f"2x3x64x64: {winner} (fastest calls: " in fast.describe_backend()
    assert set(fast.engines) == set(candidates) - {"torch"}
    # options only PyTorch has keep auto on PyTorch
    for options in ({"micro_batch": 2}, {"kernels": KernelSet()}, {"dtype": torch.bfloat16}):
        kept = optimize_for_inference(ref, **options)
        assert not kept.auto_engine and kept.tuner is None
        assert kept.backend_for(small) == "torch" and "torch" in kept.describe_backend()


def test_auto_falls_back_to_torch_when_the_engine_cannot_be_built(monkeypatch):
    def no_room(*args):
        raise UserError("cannot write model.onnx: No space left on device")

    monkeypatch.setattr(optimize_module, "_engine", no_room)
    ref, images = tiny(), torch.randn(1, 3, 64, 64)
    fast = optimize_for_inference(ref)
    with torch.inference_mode(), pytest.warns(RuntimeWarning, match="stays on torch: UserError: cannot write"):
        assert max_diff(fast(images), ref(images)) <= ATOL
    assert fast.backend_for(images) == "torch" and "torch" in fast.describe_backend()
    with torch.inference_mode():
        assert fast.tune(images) == "torch"  # and the shape is measured on torch alone


def test_auto_stays_on_torch_where_onnx_cannot_hold_the_model():
    ssm = tiny(token_mixer="conv_ssm")
    assert not optimize_for_inference(ssm).auto_engine
    with pytest.raises(UserError, match="selective-scan"):
        optimize_for_inference(ssm, backend="onnxruntime")


def test_openvino_throughput_hint_splits_uneven_batches():
    ref = tiny()
    engine = OpenVINOEngine(onnx_file(ref), threads=2, hint="THROUGHPUT")
    images = torch.randn(5, 3, 64, 64)
    with torch.inference_mode():
        assert max_diff(engine(images), ref(images)) <= ATOL
        assert max_diff(engine(images[:1]), ref(images[:1])) <= ATOL


# Two OpenVINO Cores released in the order they were made, then a signal Python handles (as a subprocess's SIGCHLD
# is in a gradio app), in a fresh interpreter with faulthandler's alternate stack, as under pytest.
_TWO_CORES = """
import faulthandler, gc, os, signal, sys
import numpy as np
from mambaout.fast.engines import OpenVINOEngine, _signal_stack
faulthandler.enable()
def stack():
    s = _signal_stack()
    return s.ss_sp, s.ss_flags, s.ss_size
before = stack()
first = OpenVINOEngine(sys.argv[1], threads=1)
first.run(np.zeros((1, 3, 32, 32), np.float32))
second = OpenVINOEngine(sys.argv[1], threads=1)
second.run(np.zeros((1, 3, 32, 32), np.float32))
del first; gc.collect()
del second; gc.collect()
assert stack() == before, f"alternate signal stack {stack()} after OpenVINO, {before} before"
handled = []
signal.signal(signal.SIGUSR1, lambda *_: handled.append(True))
os.kill(os.getpid(), signal.SIGUSR1)
assert handled
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sigaltstack through glibc")
def test_openvino_leaves_the_threads_signal_stack_as_it_found_it():
    # OpenVINO's CPU plugin restores a stale (unmapped) alternate stack here; the next handled signal was a segfault
    path = onnx_file(tiny())
    run = subprocess.run([sys.executable, "-c", _TWO_CORES, str(path)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"exit {run.returncode}: {run.stderr[-2000:]}"


def test_onnx_file_is_exported_once_per_weights(tmp_path, monkeypatch):
    ref, changed = tiny(), tiny(seed=1)
    first = onnx_file(ref, folder=tmp_path)
    export = engines_module.export_model
    written = []
    monkeypatch.setattr(engines_module, "export_model", lambda *a, **k: written.append(a[2]) or export(*a, **k))
    assert onnx_file(ref, folder=tmp_path) == first and not written  # the same weights: the file is reused
    second = onnx_file(changed, folder=tmp_path)  # other weights: a new file, exported now
    assert written == [second] and second != first and second.is_file()
    files = [first.name, second.name, f"{first.name}.sha256", f"{second.name}.sha256"]  # each with its digest
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(files)  # no temporary left
    images = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want, old = changed(images), ref(images)
    got = OnnxRuntimeEngine(second, threads=1)(images)
    assert max_diff(got, want) <= ATOL < max_diff(got, old)  # the new file holds the changed weights


def test_bad_backend_requests_raise():
    ref = tiny()
    with pytest.raises(ValueError, match="backend must be one of"):
        optimize_for_inference(ref, backend="tensorrt")
    with pytest.raises(ValueError, match="runs fp32 on the CPU"):
        optimize_for_inference(ref, dtype=torch.bfloat16, backend="openvino")
    with pytest.raises(UserError, match="--backend onnxruntime runs fp32"):
        inference_module(ref, "onnxruntime", torch.bfloat16)


def test_a_missing_engine_names_the_extra(monkeypatch):
    monkeypatch.setattr(engines_module, "engine_installed", lambda name: False)
    with pytest.raises(UserError, match=r"pip install 'mambaout\[deploy\]'"):
        optimize_for_inference(tiny(), backend="openvino")


def test_thread_fitter_gives_up_the_cores_others_keep_busy(monkeypatch):
    clock = {"wall": 0.0, "machine": 0.0, "own": 0.0}
    monkeypatch.setattr(threads_module.time, "perf_counter", lambda: clock["wall"])
    monkeypatch.setattr(threads_module, "_machine_busy_s", lambda: clock["machine"])
    monkeypatch.setattr(threads_module, "_own_busy_s", lambda: clock["own"])
    fitter = ThreadFitter(threads=2)
    monkeypatch.setattr(fitter, "_cores", lambda: 2)
    assert fitter.fitted() == 2  # nothing measured yet
    clock.update(wall=1.0, machine=1.9, own=1.0)  # over 1 s: 1.9 busy core-seconds, 1.0 of them ours
    assert fitter.free_cores() == 1 and fitter.fitted() == 1
    clock.update(wall=1.1, machine=2.0, own=1.1)  # a window too short to measure: the estimate is kept
    assert fitter.fitted() == 1
    clock.update(wall=2.1, machine=4.0, own=3.0)  # the other process ended: ours used both cores
    assert fitter.fitted() == 2
    assert ThreadFitter(threads=2, fit=False).fitted() == 2


def test_onnxruntime_runs_each_call_on_a_session_with_the_fitted_thread_count(monkeypatch):
    ref = tiny()
    engine = OnnxRuntimeEngine(onnx_file(ref), threads=2)
    images = torch.randn(2, 3, 64, 64)
    free = {"cores": None}
    monkeypatch.setattr(engine.fitter, "free_cores", lambda: free["cores"])
    quiet = engine(images)
    free["cores"] = 1  # another process took a core
    loaded = engine(images)
    assert sorted(engine._sessions) == [1, 2]
    assert [s.get_session_options().intra_op_num_threads for _, s in sorted(engine._sessions.items())] == [1, 2]
    with torch.no_grad():
        expected = ref(images)
    assert max_diff(quiet, expected) <= ATOL and max_diff(loaded, expected) <= ATOL


def test_thread_fitter_restores_the_thread_count():
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(3)
        with ThreadFitter(threads=1, fit=False)() as count:  # fewer threads than the caller runs: it changes them
            assert count == 1 and torch.get_num_threads() == 1
        assert torch.get_num_threads() == 3  # and gives them back
        with pytest.raises(RuntimeError), ThreadFitter(threads=2, fit=False)():
            assert torch.get_num_threads() == 2
            raise RuntimeError("a failed call")
        assert torch.get_num_threads() == 3  # also after an error inside the block
    finally:
        torch.set_num_threads(before)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A femto-layout classifier's weights file (random, 4 classes) and two images."""
    folder = tmp_path_factory.mktemp("engines")
    torch.manual_seed(0)
    model = randomize_(mambaout.create_model("mambaout_femto", num_classes=4)).eval()
    path = folder / "femto.pth"
    torch.save(model.state_dict(), path)
    images = [write_image(folder / "img" / f"{i}.png", i, size=48, seed=i) for i in range(2)]
    return path, images


@pytest.mark.parametrize("backend", ["torch", "onnxruntime", "openvino"])
def test_cli_predict_backends_agree(checkpoint, backend, capsys):
    path, images = checkpoint
    argv = ["predict", *map(str, images), "--model", "mambaout_femto", "--checkpoint", str(path), "--json"]
    assert main([*argv, "--backend", "torch"]) == 0
    want = json.loads(capsys.readouterr().out)
    assert main([*argv, "--backend", backend]) == 0
    captured = capsys.readouterr()
    assert f"backend: {backend}" in captured.err
    got = json.loads(captured.out)
    for a, b in zip(got, want, strict=True):
        assert [p["index"] for p in a["predictions"]] == [p["index"] for p in b["predictions"]]
        pairs = zip(a["predictions"], b["predictions"], strict=True)
        assert max(abs(p["probability"] - q["probability"]) for p, q in pairs) < ATOL


def test_cli_eval_records_its_backend(checkpoint, tmp_path, capsys):
    path, _ = checkpoint
    for i in range(4):  # one class folder per output, taken in order (the weights file names no classes)
        write_image(tmp_path / "data" / f"class_{i}" / "0.png", i, size=48, seed=i)
    record = tmp_path / "eval.json"
    argv = ["eval", "--model", "mambaout_femto", "--checkpoint", str(path), "--data", str(tmp_path / "data")]
    assert main([*argv, "--workers", "0", "--json", str(record), "--backend", "openvino"]) == 0
    assert "backend: openvino" in capsys.readouterr().out
    assert json.loads(record.read_text())["backend"] == "openvino"
