"""Other inference engines for our fused graph: ONNX Runtime and OpenVINO running `mambaout export`'s ONNX file.

`optimize_for_inference(..., backend=...)` routes calls to them; `mambaout bench` times them (and timm's own export
in them, as peers). Both are optional: ONNX Runtime comes with the `export` extra, OpenVINO with `deploy`.

- The ONNX file is the fused inference graph written and verified by `mambaout.export.export_model` (verified
  against the reference model to 1e-4), cached under `<cache>/onnx/` by a hash of the architecture and weights,
  written atomically, so a model is exported once per machine. Beside it, `<key>.onnx.sha256` holds the SHA-256
  the file had when its export was verified: a file damaged since (cut short, overwritten) is exported again.
- ONNX Runtime: a session with the CPU provider (one per thread count, fitted to the free cores per call), any
  batch and image size.
- OpenVINO: compiled once per input shape (static shapes run 1.2-1.4× faster than the dynamic graph on the dev
  machine), with fp32 inference forced: on CPUs with AVX-512-BF16 or AMX its default precision is bf16, which
  differs from the reference by ~1e-2. The latency hint runs one request on every thread; the throughput hint runs
  the batch as several requests in parallel streams; by default single images take the first, batches the second.
"""

import contextlib
import ctypes
import hashlib
import importlib.util
import sys
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
from torch import nn

from mambaout.data.digits import cache_dir
from mambaout.errors import UserError
from mambaout.export import export_model
from mambaout.fast.fused import fused_graph
from mambaout.fast.threads import ThreadFitter
from mambaout.weights.io import atomic_write, file_sha256

__all__ = [
    "ENGINES",
    "OPENVINO_HINTS",
    "OnnxRuntimeEngine",
    "OpenVINOEngine",
    "engine_installed",
    "onnx_file",
    "require_engine",
]

ENGINES = ("onnxruntime", "openvino")
OPENVINO_HINTS = ("LATENCY", "THROUGHPUT")
_EXTRA = {"onnxruntime": "export", "openvino": "deploy"}
# compiled OpenVINO models kept per engine (one per input shape: a predict run has its batch and a last partial one)
_OPENVINO_SHAPES = 4


class _SignalStack(ctypes.Structure):
    """glibc's `stack_t`."""

    _fields_ = [("ss_sp", ctypes.c_void_p), ("ss_flags", ctypes.c_int), ("ss_size", ctypes.c_size_t)]


def _signal_stack() -> _SignalStack | None:
    """The calling thread's alternate signal stack (None off Linux or when it cannot be read)."""
    if not sys.platform.startswith("linux"):
        return None
    stack = _SignalStack()
    return stack if ctypes.CDLL(None).sigaltstack(None, ctypes.byref(stack)) == 0 else None


@contextlib.contextmanager
def _signal_stack_kept() -> Iterator[None]:
    """Give the calling thread back its alternate signal stack after the block (Linux; elsewhere a no-op).

    OpenVINO 2026.4's CPU plugin installs an alternate signal stack of its own when a Core first compiles and, when
    the plugin goes, restores the one it found, unmapping its own. With two Cores released in the order they were
    made, the second restores the first's unmapped stack, and the next signal Python handles (SIGCHLD of a
    subprocess, Ctrl-C) kills the process with a segfault. Restoring the caller's stack after each compile means
    every plugin finds, and later restores, the stack the thread really has.
    """
    saved = _signal_stack()
    try:
        yield
    finally:
        if saved is not None:
            ctypes.CDLL(None).sigaltstack(ctypes.byref(saved), None)


def engine_installed(name: str) -> bool:
    """True when the engine's Python package can be imported here (without importing it)."""
    return importlib.util.find_spec(name) is not None


def require_engine(name: str) -> None:
    """Raise a `UserError` naming the extra to install when engine `name` is missing."""
    if name not in ENGINES:
        raise ValueError(f"unknown engine {name!r}; expected one of {ENGINES}")
    if not engine_installed(name):
        raise UserError(f"backend {name!r} needs the {name} package: pip install 'mambaout[{_EXTRA[name]}]'")


def _weights_key(model: nn.Module) -> str:
    """A hash of what the exported file depends on: the architecture, the weights and the exporter's version."""
    digest = hashlib.sha256(f"{model!r}|torch {torch.__version__}".encode())
    for name, tensor in model.state_dict().items():
        digest.update(name.encode())
        digest.update(str(tuple(tensor.shape)).encode())
        digest.update(tensor.detach().float().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:32]


def onnx_file(model: nn.Module, img_size: tuple[int, int] = (224, 224), folder: Path | None = None) -> Path:
    """The verified fused ONNX export of `model` (exported on the first call for these weights, then reused while
    its SHA-256 is the one recorded after its verification; a damaged file is exported again).

    Args:
        model: A `MambaOut` (fp32 weights are exported whatever its dtype and device).
        img_size: The traced (H, W); the file takes any batch and image size.
        folder: Where the files are kept; default `<mambaout cache>/onnx`.

    Raises:
        UserError: The model cannot be exported to ONNX (the SSM mixer) or its export does not reproduce it.
    """
    folder = folder or cache_dir() / "onnx"
    path = folder / f"{_weights_key(model)}.onnx"
    digest = path.with_name(f"{path.name}.sha256")
    if not _intact(path, digest):
        # atomic: never a partial file at `path`; the digest is written only once the file is verified
        export_model(model, "onnx", path, img_size=img_size, verify=True, graph=fused_graph(model))
        with atomic_write(digest) as f:
            f.write(file_sha256(path).encode())
    return path


def _intact(path: Path, digest: Path) -> bool:
    """Whether the cached `path` is the file its verified export wrote: its SHA-256 is the one in `digest`."""
    try:
        return path.is_file() and digest.read_bytes().strip() == file_sha256(path).encode()
    except OSError:  # no digest (never verified, or cached before digests were kept), or unreadable
        return False


def _images_array(x: torch.Tensor) -> np.ndarray:
    return x.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()


class OnnxRuntimeEngine:
    """An ONNX file in ONNX Runtime (CPU provider): `[B, 3, H, W]` images -> outputs, any batch and size.

    Each call runs with one intra-op thread per core other processes leave free (`mambaout.fast.threads`), as the
    PyTorch path does: ONNX Runtime's pool splits each operator evenly too, and with one of two cores taken its
    2-thread session ran femto at batch 1 2× slower than a 1-thread one (57 against 29 ms, median; BENCHMARKS.md).
    A session is made for each thread count on first use (its own copy of the weights).

    Args:
        path: The ONNX file (one input, one output).
        threads: The most intra-op threads.
    """

    name = "onnxruntime"

    def __init__(self, path: Path, threads: int):
        require_engine(self.name)
        self.path, self.threads = path, threads
        self.fitter = ThreadFitter(threads)
        self._sessions: dict[int, object] = {}
        self._lock = threading.Lock()
        self.input_name = self._session(threads).get_inputs()[0].name

    def _session(self, threads: int) -> object:
        with self._lock:
            if threads not in self._sessions:
                import onnxruntime as ort

                options = ort.SessionOptions()
                options.intra_op_num_threads = threads
                self._sessions[threads] = ort.InferenceSession(
                    str(self.path), options, providers=["CPUExecutionProvider"]
                )
            return self._sessions[threads]

    def run(self, images: np.ndarray) -> np.ndarray:
        """fp32 NCHW array -> the first output."""
        return self._session(self.fitter.fitted()).run(None, {self.input_name: images})[0]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images (any float dtype, CPU) -> fp32 outputs as a tensor."""
        return torch.from_numpy(self.run(_images_array(x)))


class OpenVINOEngine:
    """An ONNX file in OpenVINO's CPU plugin at fp32, compiled per input shape: `[B, 3, H, W]` -> outputs.

    Args:
        path: The ONNX file (one input, one output).
        threads: Inference threads (all streams together).
        hint: "LATENCY" (one stream on every thread), "THROUGHPUT" (parallel streams; the batch is split across
            them as asynchronous requests), or None: the latency hint for single images, throughput for batches
            (the faster of the two for each on the dev machine, BENCHMARKS.md).
    """

    name = "openvino"

    def __init__(self, path: Path, threads: int, hint: str | None = None):
        require_engine(self.name)
        if hint is not None and hint not in OPENVINO_HINTS:
            raise ValueError(f"hint must be one of {OPENVINO_HINTS} or None, got {hint!r}")
        import openvino as ov

        self._ov = ov
        self.core = ov.Core()
        self.path, self.threads, self.hint = path, threads, hint
        # (hint, input shape) -> (compiled model, requests per batch, their queue)
        self._compiled: OrderedDict[tuple[str, tuple[int, ...]], tuple[object, int, object]] = OrderedDict()
        self._streams: int | None = None
        self._lock = threading.Lock()  # one call at a time through the shared queues (the demo serves threads)

    def _config(self, hint: str) -> dict[str, object]:
        return {
            "PERFORMANCE_HINT": hint,
            "INFERENCE_PRECISION_HINT": "f32",  # bf16 by default on CPUs with AVX-512-BF16 / AMX
            "INFERENCE_NUM_THREADS": self.threads,
        }

    def _compile_model(self, model: object, hint: str) -> object:
        """`model` compiled for the CPU at fp32 with `hint`, the thread's signal stack kept (`_signal_stack_kept`)."""
        with _signal_stack_kept():
            return self.core.compile_model(model, "CPU", self._config(hint))

    def _throughput_streams(self, model: object) -> int:
        """Parallel requests the throughput hint asks for on this machine (read once)."""
        if self._streams is None:
            compiled = self._compile_model(model.clone(), "THROUGHPUT")
            self._streams = max(1, int(compiled.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        return self._streams

    def _compile(self, shape: tuple[int, ...]) -> tuple[object, int, object]:
        """The compiled model for `shape`'s pieces, how many requests (pieces) a batch of `shape` becomes, and an
        asynchronous queue for them (None for one request)."""
        hint = self.hint or ("LATENCY" if shape[0] == 1 else "THROUGHPUT")
        key = (hint, shape)
        if key in self._compiled:
            self._compiled.move_to_end(key)
            return self._compiled[key]
        model = self.core.read_model(str(self.path))
        requests = min(self._throughput_streams(model), shape[0]) if hint == "THROUGHPUT" else 1
        model.reshape([-(-shape[0] // requests), *shape[1:]])
        compiled = self._compile_model(model, hint)
        queue = self._ov.AsyncInferQueue(compiled, requests) if requests > 1 else None
        self._compiled[key] = (compiled, requests, queue)
        if len(self._compiled) > _OPENVINO_SHAPES:
            self._compiled.popitem(last=False)
        return self._compiled[key]

    def run(self, images: np.ndarray) -> np.ndarray:
        """fp32 NCHW array -> the first output."""
        with self._lock:
            return self._run(images)

    def _run(self, images: np.ndarray) -> np.ndarray:
        compiled, requests, queue = self._compile(tuple(images.shape))
        if queue is None:
            return compiled(images)[0]
        piece = compiled.inputs[0].get_shape()[0]
        outputs: list[np.ndarray | None] = [None] * requests

        def done(request, index: int) -> None:
            outputs[index] = request.get_output_tensor(0).data.copy()

        queue.set_callback(done)
        for i in range(requests):
            part = images[i * piece : (i + 1) * piece]
            if part.shape[0] < piece:  # the last piece of an uneven batch: padded to the compiled shape
                part = np.concatenate([part, np.zeros((piece - part.shape[0], *part.shape[1:]), part.dtype)])
            queue.start_async({0: part}, i)
        queue.wait_all()
        return np.concatenate(outputs)[: images.shape[0]]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images (any float dtype, CPU) -> fp32 outputs as a tensor."""
        return torch.from_numpy(self.run(_images_array(x)))
