"""`optimize_for_inference`: a reference `MambaOut` turned into a fused, micro-batched inference module.

The result computes the reference function (held to it by `tests/test_fast.py`) with:
- every Gated CNN block replaced by a `FusedGatedCNNBlock` (folded LayerScale, fused kernels, no split/cat copies);
  a token mixer other than MambaOut's conv (SSM, attention, causal conv) is kept as its module inside it;
- weights stored in the compute dtype (bf16 weights rather than autocast, which re-casts every weight per call);
- channels-last images into the stem, so every convolution takes oneDNN's NHWC path;
- each stage run in its own micro-batches (each image is independent at inference): a few images at a time in the
  first stages, so that their large activations stay in cache, many in the last, so that their GEMMs are tall.

Its `backend` says what runs a call: "torch" (the above), "onnxruntime" or "openvino" (the same fused graph
exported to ONNX and verified, `mambaout.fast.engines`), or "auto", which runs each new input shape's first calls
on every backend in turn, timing them, and keeps the fastest for that shape (`AutoTuner`; `AUTO_RULE` orders the
first tries). `backend_for(x)` tells which one a call on `x` takes.
"""

import threading
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from mambaout.errors import UserError, describe
from mambaout.fast.engines import ENGINES, OnnxRuntimeEngine, OpenVINOEngine, engine_installed, onnx_file
from mambaout.fast.fused import FusedGatedCNNBlock, fuse_blocks
from mambaout.fast.kernels import KernelSet, cpu_has_kernels, select_kernels
from mambaout.fast.threads import ThreadFitter
from mambaout.layers import SSMMixer
from mambaout.models import MambaOut

__all__ = [
    "AUTO_RULE",
    "AUTO_TRIALS",
    "BACKENDS",
    "AutoTuner",
    "FastMambaOut",
    "auto_micro_batch",
    "inference_module",
    "micro_batches",
    "optimize_for_inference",
]

BACKENDS = ("auto", "torch", *ENGINES)

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16)
# Bytes of activations one stage's micro-batch may hold. A block keeps ~7 values of width C per pixel alive
# (input, normed, gate/product, identity, conv in/out, output). Each stage gets its own micro-batch: the first
# stages, with many pixels, run a few images at a time so their activations stay in cache, the last ones many
# images at once so their small matrices grow tall enough for efficient matrix multiplies.
MICRO_BATCH_BYTES = 32 * 2**20
LIVE_VALUES_PER_CHANNEL = 7


@dataclass(frozen=True)
class AutoRule:
    """Where `backend="auto"` tries a new input shape first: small calls on an engine, the rest in PyTorch (before
    `AutoTuner` has timed every backend on it; a single call of a shape runs only there).

    Why (BENCHMARKS.md, issue 14; `python scripts/cpu_probes.py engines`): a PyTorch forward pays a fixed cost per
    call, the dispatch of its ~400 operators (~5 ms for femto on the dev machine's Zen 5, 1 thread), which the
    engines' compiled graphs do not. It dominates small calls: up to 64k pixels per call (one 224² image, four of
    128², sixteen of 64²) ONNX Runtime ran our graph 1.2-2.4× faster than PyTorch at 1 thread and 1.1-5× at 2;
    from ~800k pixels (16 images of 224²) PyTorch, whose oneDNN GEMMs are the fastest here, was 1.1-1.3× faster.
    ONNX Runtime rather than OpenVINO: about as fast, with no compilation per input shape (OpenVINO's 0.2-0.3 s).

    Attributes:
        engine: The engine small calls try first.
        max_pixels: Calls of at most this many pixels (batch × height × width) try it first.
    """

    engine: str = "onnxruntime"
    max_pixels: int = 65536

    def routes(self, shape: Sequence[int]) -> bool:
        """True when a call on images of `shape` `[B, 3, H, W]` tries the engine first."""
        return shape[0] * shape[-2] * shape[-1] <= self.max_pixels


AUTO_RULE = AutoRule()
_ENGINE_LOCK = threading.Lock()
# calls of each backend `auto` times on a new input shape; the fastest of them counts (an engine's first call on a
# shape includes compiling it: OpenVINO compiles per shape)
AUTO_TRIALS = 2


class AutoTuner:
    """Which backend `backend="auto"` runs for each input shape, measured: the first calls of a shape go to each
    candidate in turn (`AUTO_RULE`'s pick first), `trials` in a row, timed; from then on the shape runs on the one
    whose fastest call was fastest. Every backend computes the same function (within 1e-4), so the timed calls are real
    calls, not extra work.

    Why measure: which engine is fastest depends on the CPU, the shape and the load. On the dev machines OpenVINO's
    throughput streams ran femto at batch 32 1.07× faster than our PyTorch path on an AMD Zen 4 and 0.82× on an Intel
    Xeon; ONNX Runtime led at 64² single images, OpenVINO at 224² (BENCHMARKS.md).

    Args:
        candidates: The backends to choose among ("torch" and the engines that can run the model here).
        trials: Timed calls per candidate and shape.
    """

    def __init__(self, candidates: Sequence[str], trials: int = AUTO_TRIALS):
        self.candidates = tuple(candidates)
        self.trials = trials
        self._times: dict[tuple[int, ...], dict[str, list[float]]] = {}
        self._chosen: dict[tuple[int, ...], str] = {}
        self._lock = threading.Lock()

    def next(self, shape: Sequence[int]) -> str:
        """The backend a call on images of `shape` runs: the chosen one, or the next candidate to time."""
        shape = tuple(shape)
        with self._lock:
            if shape in self._chosen:
                return self._chosen[shape]
            first = AUTO_RULE.engine if AUTO_RULE.routes(shape) else "torch"
            times = self._times.get(shape, {})
            # each candidate's tries in a row: a backend's first call can be slowed by the previous one's threads,
            # which spin on after a call (ONNX Runtime's pool, OpenMP's), its next call not
            return next(
                c for c in sorted(self.candidates, key=lambda c: c != first) if len(times.get(c, ())) < self.trials
            )

    def chosen(self, shape: Sequence[int]) -> str | None:
        """The backend kept for `shape`, or None while it is still being measured."""
        with self._lock:
            return self._chosen.get(tuple(shape))

    def record(self, shape: Sequence[int], backend: str, seconds: float) -> None:
        """Count one timed call; once every candidate has `trials`, keep the fastest for `shape`."""
        shape = tuple(shape)
        with self._lock:
            if shape in self._chosen:
                return
            times = self._times.setdefault(shape, {})
            times.setdefault(backend, []).append(seconds)
            if all(len(times.get(c, ())) >= self.trials for c in self.candidates):
                self._chosen[shape] = min(self.candidates, key=lambda c: min(times[c]))

    def describe(self) -> str:
        """The candidates, and for each shape met so far what was kept (or that it is still being measured), with
        each candidate's fastest call."""
        with self._lock:
            text = f"the fastest of {', '.join(self.candidates)} for each input shape, timed on its first calls"
            for shape, times in self._times.items():  # a shape is kept only after its calls were timed
                best = ", ".join(f"{c} {1e3 * min(t):.1f} ms" for c, t in times.items())
                kept = self._chosen.get(shape, "still measuring")
                text += f"; {'x'.join(map(str, shape))}: {kept} (fastest calls: {best})"
        return text


def auto_micro_batch(model: MambaOut, image_size: tuple[int, int], dtype: torch.dtype) -> list[int]:
    """Images per micro-batch for each stage, so that one block's live activations fit `MICRO_BATCH_BYTES`.

    Args:
        model: The reference model (its stage widths are read).
        image_size: Input (H, W) in pixels.
        dtype: Compute dtype (its size scales the activations).

    Returns:
        One micro-batch size (at least 1) per stage.
    """
    height, width = -(-image_size[0] // 4), -(-image_size[1] // 4)  # the stem's two stride-2 convs round up
    sizes = []
    for i, info in enumerate(model.feature_info):
        if i:
            height, width = -(-height // 2), -(-width // 2)
        per_image = height * width * info["num_chs"] * LIVE_VALUES_PER_CHANNEL * torch.finfo(dtype).bits // 8
        sizes.append(max(1, MICRO_BATCH_BYTES // max(per_image, 1)))
    return sizes


def micro_batches(x: torch.Tensor, limit: int) -> tuple[torch.Tensor, ...]:
    """`x` split along dim 0 into the fewest pieces of at most `limit`, as even as possible (views, no copy).

    Even pieces keep every piece's matrices equally tall: 32 images at a limit of 31 become 16 + 16, not 31 + 1.
    """
    pieces = -(-x.shape[0] // max(limit, 1))
    base, extra = divmod(x.shape[0], pieces)
    return x.split([base + 1] * extra + [base] * (pieces - extra))


def _in_chunks(fn, x: torch.Tensor, chunk: int) -> torch.Tensor:
    """`fn` over `x` in micro-batches of at most `chunk`, concatenated (`fn` is per-image, so this is `fn(x)`)."""
    if chunk >= x.shape[0]:
        return fn(x)
    return torch.cat([fn(part) for part in micro_batches(x, chunk)])


class FastMambaOut(nn.Module):
    """The inference-only twin of a `MambaOut`: same call signature and outputs, fused and micro-batched.

    Inputs are NCHW images of any floating dtype; they are cast to the compute dtype and the outputs are cast back
    to the input's dtype. Build it with `optimize_for_inference`. Only `forward` (logits) runs on an engine; features,
    the head and intermediates always run in PyTorch.

    Args:
        model: A fused copy of the reference model (blocks already replaced), in the compute dtype, eval mode.
        dtype: Compute dtype.
        micro_batch: Images per micro-batch for `forward` (every stage), or None to choose one per stage from the
            image size (`auto_micro_batch`) on CPU and to run whole batches elsewhere.
        compile: Run `forward` through `torch.compile` with weight freezing (in micro-batches of the first stage's
            size: the compiled graph is the whole network).
        backend: One of `BACKENDS` (see the module's docstring).
        engine: The engine that "onnxruntime"/"openvino" run calls on, built already; for "auto", None (auto's
            engines are built on their first call, from the fused model's verified export, into `engines`).
        auto_engine: Whether "auto" may run calls on the engines (False where they cannot run this model: then
            every call stays in PyTorch).
    """

    def __init__(
        self,
        model: MambaOut,
        dtype: torch.dtype,
        micro_batch: int | None = None,
        compile: bool = False,
        backend: str = "torch",
        engine: OnnxRuntimeEngine | OpenVINOEngine | None = None,
        auto_engine: bool = False,
    ):
        super().__init__()
        self.model = model
        # compiled with weight freezing: inductor folds and pre-packs the weights and fuses the elementwise work;
        # kept out of the module tree so that the state dict holds the weights once
        compiled = torch.compile(model, options={"freezing": True}) if compile else model
        object.__setattr__(self, "_run", compiled)
        self.dtype = dtype
        self.micro_batch = micro_batch
        self.backend = backend
        self.engine = engine
        self.auto_engine = auto_engine
        self.engines: dict[str, OnnxRuntimeEngine | OpenVINOEngine] = {}  # auto's, by name
        candidates = ("torch", *(name for name in ENGINES if engine_installed(name)))
        self.tuner = AutoTuner(candidates) if backend == "auto" and auto_engine else None
        # CPU calls run one thread per core that other processes leave free (`mambaout.fast.threads`)
        self.threads = ThreadFitter()

    def backend_for(self, x: torch.Tensor) -> str:
        """What a `forward` on images `x` runs on: "torch" or the engine's name ("onnxruntime", "openvino"); under
        "auto" while `x`'s shape is still being measured, the backend its next call tries."""
        if not _engines_may_run(x):
            return "torch"
        if self.backend in ENGINES:
            return self.backend
        if self.tuner is not None:
            return self.tuner.next(x.shape)
        return "torch"

    def describe_backend(self) -> str:
        """The backend in words, for a command's output: what was asked and what runs."""
        if self.backend != "auto":
            return self.backend
        if self.tuner is None:
            return "auto: torch (no engine for this model, dtype, device or options, or none could be built here)"
        return f"auto: {self.tuner.describe()}"

    def tune(self, x: torch.Tensor) -> str:
        """Run `forward` on `x` until "auto" has chosen a backend for its shape (at most `AUTO_TRIALS` calls per
        backend), so that later calls are all on that one; returns it. A benchmark calls this before timing."""
        with torch.no_grad():
            while self._measuring(x):
                self(x)
        return self.backend_for(x)

    def _measuring(self, x: torch.Tensor) -> bool:
        """True when a call on `x` is one of auto's timed tries of its shape."""
        return self.tuner is not None and _engines_may_run(x) and self.tuner.chosen(x.shape) is None

    def _engine_for_auto(self, name: str) -> OnnxRuntimeEngine | OpenVINOEngine | None:
        """Auto's engine `name`, built on first use; None (and torch from then on) when it cannot be built here."""
        with _ENGINE_LOCK:  # one export and session, whichever thread calls first
            if name not in self.engines and self.auto_engine:
                try:
                    self.engines[name] = _engine(self.model, name, torch.get_num_threads())
                except (
                    UserError,
                    OSError,
                    ImportError,
                    RuntimeError,
                ) as e:  # no room, read-only cache, a broken install
                    self.auto_engine, self.tuner = False, None  # every shape on torch from now on
                    warnings.warn(f"backend auto stays on torch: {describe(e)}", RuntimeWarning, stacklevel=4)
        return self.engines.get(name) if self.auto_engine else None

    # the reference model's description, read through (not copied) from the fused model
    @property
    def num_classes(self) -> int:
        return self.model.num_classes

    @property
    def num_features(self) -> int:
        return self.model.num_features

    @property
    def head_hidden_size(self) -> int:
        return self.model.head_hidden_size

    @property
    def feature_info(self) -> list[dict]:
        return self.model.feature_info

    @property
    def pretrained_cfg(self) -> dict | None:
        return getattr(self.model, "pretrained_cfg", None)

    def _images(self, x: torch.Tensor) -> torch.Tensor:
        # NHWC memory for the stem's convs; the tensor is still indexed [B, 3, H, W]
        return x.to(self.dtype).contiguous(memory_format=torch.channels_last)

    def _chunks(self, x: torch.Tensor) -> list[int]:
        stages = len(self.model.stages)
        if self.micro_batch is not None:
            return [self.micro_batch] * stages
        if x.device.type != "cpu":
            return [x.shape[0]] * stages
        return auto_micro_batch(self.model, tuple(x.shape[-2:]), self.dtype)

    @torch.no_grad()
    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images -> `[B, H/32, W/32, C]` channels-last map of the last stage."""
        return self.model.forward_features(self._images(x)).to(x.dtype)

    @torch.no_grad()
    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-stage map `[B, h, w, C]` -> logits `[B, num_classes]` (or the head's hidden features)."""
        return self.model.forward_head(x.to(self.dtype), pre_logits=pre_logits).to(x.dtype)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images -> logits `[B, num_classes]`: on the engine `backend_for(x)` names, or in PyTorch
        with each stage run in micro-batches."""
        backend = self.backend_for(x)
        if not self._measuring(x):
            return self._run_on(backend, x)
        start = time.perf_counter()
        out = self._run_on(backend, x)
        if self.tuner is not None:  # (None now when the engine could not be built and the call ran on torch)
            self.tuner.record(x.shape, backend, time.perf_counter() - start)
        return out

    def _run_on(self, backend: str, x: torch.Tensor) -> torch.Tensor:
        if backend != "torch":
            engine = self.engine if self.backend in ENGINES else self._engine_for_auto(backend)
            if engine is not None:
                return engine(x).to(x.dtype)
        if x.device.type != "cpu":
            return self._forward(x)
        with self.threads():
            return self._forward(x)

    def _forward(self, x: torch.Tensor) -> torch.Tensor:
        chunks = self._chunks(x)
        if self._run is not self.model:
            return _in_chunks(self._run, self._images(x), chunks[0]).to(x.dtype)
        model, last = self.model, len(self.model.stages) - 1
        out = self._images(x)
        for i, stage in enumerate(model.stages):

            def step(t: torch.Tensor, i: int = i, stage: nn.Module = stage) -> torch.Tensor:
                t = stage(model.stem(t) if i == 0 else t)
                return model.forward_head(t) if i == last else t

            out = _in_chunks(step, out, chunks[i])
        return out.to(x.dtype)

    @torch.no_grad()
    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense heads; arguments and returns as `MambaOut.forward_intermediates`."""
        out = self.model.forward_intermediates(
            self._images(x), indices, norm, stop_early, output_fmt, intermediates_only
        )
        if intermediates_only:
            return [f.to(x.dtype) for f in out]
        final, feats = out
        return final.to(x.dtype), [f.to(x.dtype) for f in feats]

    @property
    def kernels(self) -> KernelSet:
        """The kernel set the fused blocks use on CPU (the composed ops when no block could be fused)."""
        block = next((m for m in self.modules() if isinstance(m, FusedGatedCNNBlock)), None)
        return block.kernels if block is not None else KernelSet()


def _engines_may_run(x: torch.Tensor) -> bool:
    """Whether a call on `x` may leave PyTorch: CPU images, not inside a trace or a `torch.compile`."""
    return x.device.type == "cpu" and not torch.jit.is_tracing() and not torch.compiler.is_compiling()


def _engine(model: MambaOut, name: str, threads: int) -> OnnxRuntimeEngine | OpenVINOEngine:
    """Engine `name` on `model`'s verified fused ONNX export (exported once per weights, `engines.onnx_file`);
    `model` may be the reference or its fused copy (the export writes the same fused graph from either)."""
    path = onnx_file(model)
    return OnnxRuntimeEngine(path, threads) if name == "onnxruntime" else OpenVINOEngine(path, threads)


def optimize_for_inference(
    model: MambaOut,
    dtype: torch.dtype = torch.float32,
    micro_batch: int | None = None,
    compile: bool = False,
    kernels: KernelSet | None = None,
    backend: str = "auto",
) -> FastMambaOut:
    """A fused inference module computing the same function as `model` (which is left untouched).

    Build it on the device it will run on: the fused CPU kernels are probed for that device and dtype.

    Args:
        model: A reference `MambaOut` (any registered variant, any weights).
        dtype: torch.float32, or torch.bfloat16 (weights stored in bf16; fastest on CPUs with AMX/AVX-512-BF16).
        micro_batch: Images per micro-batch in `forward`; None picks one from the image size on CPU.
        compile: Also `torch.compile` the forward (with weight freezing). The blocks then use the composed ops,
            which inductor fuses itself (its freezing pass cannot take oneDNN's fused ops); the first call of each
            input shape compiles, which takes a minute or more.
        kernels: The fused blocks' kernels on CPU; default `select_kernels(device, dtype)`. `KernelSet()` forces
            the composed ops; `dataclasses.replace(select_kernels(...), min_rows=0)` uses oneDNN on every input.
        backend: What runs `forward`: "torch"; "onnxruntime" or "openvino" (fp32 on the CPU: the model is exported
            to ONNX, verified, and cached); or "auto" (the default), which times the first calls of each input
            shape on torch and on each installed engine and keeps the fastest for that shape (`AutoTuner`; the
            export happens on the first call that goes to an engine). "auto" stays on torch for options only torch
            has (`micro_batch`, `compile`, `kernels`), off the CPU, for bf16, for models ONNX cannot hold (the SSM
            mixer) and when onnxruntime is not installed.

    Returns:
        A `FastMambaOut` in eval mode: NCHW images in, logits out; `forward_features`, `forward_head` and
        `forward_intermediates` as the reference (always in PyTorch).

    Raises:
        UserError: An engine backend asked for that is not installed or cannot hold the model.
    """
    if dtype not in SUPPORTED_DTYPES:
        raise ValueError(f"dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    if micro_batch is not None and micro_batch < 1:
        raise ValueError(f"micro_batch must be >= 1, got {micro_batch}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    device = next(model.parameters()).device
    if backend in ENGINES and (device.type != "cpu" or dtype != torch.float32 or compile):
        raise ValueError(f"backend {backend!r} runs fp32 on the CPU without compile; use backend='torch'")
    torch_only = micro_batch is not None or compile or kernels is not None
    if compile:
        kernels = KernelSet()
    elif kernels is None:
        kernels = select_kernels(device, dtype)
    if device.type == "cpu" and dtype == torch.bfloat16 and not cpu_has_kernels(dtype):
        warnings.warn(
            "this CPU has no bf16 matrix kernels (oneDNN needs AVX-512-BF16, AMX or AVX2-VNNI-2): bf16 runs far "
            "slower than fp32 here; use dtype=torch.float32",
            RuntimeWarning,
            stacklevel=2,
        )
    fast = fuse_blocks(model, dtype, kernels)
    # channels-last conv weights: oneDNN's NHWC convolution would otherwise reorder them on every call
    fast = fast.to(dtype=dtype, memory_format=torch.channels_last)
    fast.requires_grad_(False)
    engine = _engine(model, backend, torch.get_num_threads()) if backend in ENGINES else None
    auto_engine = (
        backend == "auto"
        and not torch_only
        and device.type == "cpu"
        and dtype == torch.float32
        and not any(isinstance(m, SSMMixer) for m in model.modules())  # ONNX has no selective scan
        and engine_installed(AUTO_RULE.engine)
    )
    return FastMambaOut(fast, dtype, micro_batch, compile, backend, engine, auto_engine).eval()


def inference_module(
    model: MambaOut, backend: str = "auto", amp_dtype: torch.dtype | None = None
) -> tuple[FastMambaOut, torch.dtype | None, str]:
    """The module `mambaout predict/eval --backend` run: `model`'s `optimize_for_inference` twin on `backend`.

    Args:
        model: The reference model, on the device it will run on.
        backend: One of `BACKENDS`.
        amp_dtype: The `--amp` autocast dtype: bf16 becomes the twin's own dtype (weights in bf16, no autocast);
            fp16 (GPU) stays an autocast around it.

    Returns:
        The twin, the autocast dtype still to apply around it (or None), and its backend in words.

    Raises:
        UserError: An engine asked for off the CPU or with mixed precision, not installed, or unable to hold the model
            (the SSM token mixer, which ONNX has no operator for, is refused first).
    """
    device = next(model.parameters()).device
    if backend in ENGINES and any(isinstance(m, SSMMixer) for m in model.modules()):
        raise UserError(
            f"--backend {backend} runs an ONNX export of the model, and ONNX has no selective scan (the SSM token "
            "mixer): use --backend torch"
        )
    if backend in ENGINES and device.type != "cpu":
        raise UserError(f"--backend {backend} runs on the CPU: add --device cpu, or use --backend torch")
    if backend in ENGINES and amp_dtype is not None:
        raise UserError(f"--backend {backend} runs fp32: use --amp none, or --backend torch")
    dtype = torch.float32
    if amp_dtype == torch.bfloat16:
        dtype, amp_dtype = torch.bfloat16, None
    fast = optimize_for_inference(model, dtype=dtype, backend=backend)
    return fast, amp_dtype, fast.describe_backend()
