"""`run_benchmark`: build the paths a `BenchSettings` asks for, measure them interleaved, return what it measured
(a `BenchReport`: the results and their Markdown)."""

import contextlib
import shlex
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from mambaout.bench.harness import (
    PathResult,
    busy_processes,
    load_average,
    machine_summary,
    markdown_table,
    measure,
    peak_memory_mib,
    synchronize,
)
from mambaout.bench.paths import engine_paths, inference_paths, lever_paths, mixer_paths, peer_paths, train_paths
from mambaout.errors import UserError
from mambaout.fast.allocator import MALLOC_MODES, tune_cpu_allocator
from mambaout.fast.engines import engine_installed
from mambaout.fast.kernels import KernelSet, cpu_has_kernels
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import create_model, get_spec, model_complexity
from mambaout.train.distributed import check_device

__all__ = ["DTYPES", "BenchReport", "BenchSettings", "matmul_peak_gflops", "run_benchmark"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@dataclass
class BenchSettings:
    """One benchmark; maps 1:1 to `mambaout bench` flags.

    Attributes:
        model: Registry name (timm's `mambaout_*` of the same name is the baseline).
        batch_size: Images per call.
        img_size: Square input size.
        dtype: "fp32" or "bf16".
        compile: Add `torch.compile`d timm and ours.
        train: Time a training step (forward, backward, AdamW) instead of inference.
        onnx: Add our exported model in ONNX Runtime (fused and reference graphs) and OpenVINO (latency and
            throughput hints, where installed); fp32 inference only.
        peers: Add the engines a user would pick instead of ours: timm compiled, and timm's own ONNX export in
            ONNX Runtime and OpenVINO (both hints); fp32 inference only. The table names the fastest peer.
        levers: Time our levers one at a time (an ablation) instead of the usual paths: fp32 inference, or the
            training step's with `train`.
        repeats: Interleaved rounds; each path runs `iters` timed calls per round.
        iters: Timed calls per path per round.
        warmup: Untimed calls per path first.
        device: "cpu" or "cuda".
        threads: Intra-op threads (torch and ONNX Runtime); None keeps PyTorch's default.
        micro_batch: Our paths' micro-batch; None for automatic.
        malloc: "tuned" (`tune_cpu_allocator` first, so that no path pays page faults for its large tensors on
            every call) or "system" (the allocator as the process has it); the table names the one in use.
        seed: Seed of the random weights and images.
        token_mixers: Instead of timm against ours: our model built with each of these token mixers
            (`mambaout.layers.TOKEN_MIXERS`), inference or (with `train`) the training step, the first the baseline.
        load: Other processes kept busy (one core each) beside the whole measurement.
    """

    model: str = "mambaout_femto"
    batch_size: int = 32
    img_size: int = 224
    dtype: str = "fp32"
    compile: bool = False
    train: bool = False
    onnx: bool = False
    peers: bool = False
    levers: bool = False
    repeats: int = 5
    iters: int = 1
    warmup: int = 1
    device: str = "cpu"
    threads: int | None = None
    micro_batch: int | None = None
    malloc: str = MALLOC_MODES[0]
    seed: int = 0
    token_mixers: tuple[str, ...] = ()
    load: int = 0

    def __post_init__(self) -> None:
        get_spec(self.model)
        if self.dtype not in DTYPES:
            raise UserError(f"--dtype {self.dtype}: choose one of {', '.join(DTYPES)}")
        for flag, value, low in (
            ("--batch-size", self.batch_size, 1),
            ("--img-size", self.img_size, 32),
            ("--repeats", self.repeats, 1),
            ("--iters", self.iters, 1),
            ("--warmup", self.warmup, 0),
            ("--load", self.load, 0),
        ):
            if value < low:
                raise UserError(f"{flag} must be at least {low}, got {value}")
        if self.threads is not None and self.threads < 1:
            raise UserError(f"--threads must be at least 1, got {self.threads}")
        if self.micro_batch is not None and self.micro_batch < 1:
            raise UserError(f"--micro-batch must be at least 1, got {self.micro_batch}")
        if self.malloc not in MALLOC_MODES:
            raise UserError(f"--malloc {self.malloc}: choose one of {', '.join(MALLOC_MODES)}")
        if self.device == "auto":
            raise UserError("--device auto: bench times one named device; choose cpu or cuda")
        check_device(self.device)
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise UserError("--device cuda: no CUDA GPU is visible to PyTorch on this machine")
        for flag, on in (("--onnx", self.onnx), ("--peers", self.peers)):
            if on and (self.train or self.levers or self.dtype != "fp32" or self.device != "cpu"):
                raise UserError(f"{flag} times fp32 inference on the CPU; drop --train / --levers, use --dtype fp32")
            if on and not engine_installed("onnxruntime"):
                raise UserError(f"{flag} needs onnxruntime: pip install 'mambaout[export]'")
        unknown = [m for m in self.token_mixers if m not in TOKEN_MIXERS]
        if unknown:
            raise UserError(f"--token-mixer {','.join(unknown)}: choose from {', '.join(TOKEN_MIXERS)}, or all")
        if self.token_mixers and (self.onnx or self.peers or self.levers or self.compile):
            raise UserError("--token-mixer compares our model's mixers: drop --onnx, --peers, --levers and --compile")
        if self.levers and not self.train and self.dtype != "fp32":
            raise UserError("--levers times fp32 inference levers (or training levers with --train); use --dtype fp32")

    def command(self) -> str:
        """The `mambaout bench` command line that reproduces these settings."""
        args = ["mambaout", "bench", "--model", self.model, "--batch-size", str(self.batch_size)]
        args += ["--img-size", str(self.img_size), "--dtype", self.dtype, "--repeats", str(self.repeats)]
        args += [f"--{f}" for f in ("compile", "train", "onnx", "peers", "levers") if getattr(self, f)]
        if self.iters != 1:
            args += ["--iters", str(self.iters)]
        if self.warmup != 1:
            args += ["--warmup", str(self.warmup)]
        if self.device != "cpu":
            args += ["--device", self.device]
        if self.threads is not None:
            args += ["--threads", str(self.threads)]
        if self.micro_batch is not None:
            args += ["--micro-batch", str(self.micro_batch)]
        if self.malloc != MALLOC_MODES[0]:
            args += ["--malloc", self.malloc]
        if self.token_mixers:
            args += ["--token-mixer", ",".join(self.token_mixers)]
        if self.load:
            args += ["--load", str(self.load)]
        return shlex.join(args)


@dataclass
class BenchReport:
    """What `run_benchmark` measured.

    Attributes:
        settings: The benchmark that ran.
        results: One per path, in the table's order.
        params: Parameters of the model (a result with its own `params` has its own).
        macs: Multiply-accumulates per image of the model (likewise).
        markdown: The Markdown section: heading, how and where it ran, the table, notes.
    """

    settings: BenchSettings
    results: list[PathResult]
    params: int
    macs: int
    markdown: str


def _square_multiplies(dtype: torch.dtype, device: str) -> dict[str, object]:
    """The ways PyTorch multiplies two matrices here: `a @ b`, and on the CPU also oneDNN's inner product, which
    runs AVX-512 kernels on AMD CPUs where MKL (behind `@`) stays at AVX2 (1.6× faster on the dev machine)."""
    ways = {"torch.matmul": lambda a, b: a @ b}
    if device == "cpu" and cpu_has_kernels(dtype):
        onednn = KernelSet(onednn=True, min_rows=0)
        ways["oneDNN"] = lambda a, b: onednn.linear(a, b, None)  # a @ b.T: the same FLOPs
    return ways


def matmul_peak_gflops(
    dtype: torch.dtype, device: str = "cpu", max_n: int | None = None, budget_s: float = 0.25
) -> float:
    """The machine's matmul peak as PyTorch reaches it: best GFLOP/s of square n×n×n multiplies, by any of its
    matrix-multiply kernels (MKL/cuBLAS through `a @ b`, oneDNN on the CPU).

    n doubles from 256 up to `max_n` (default 2048 on CPU, 8192 on a GPU, which needs larger matrices to fill)
    while one multiply takes under `budget_s` (a dtype without hardware support, such as bf16 on an AVX2-only CPU,
    runs orders of magnitude slower and stops early); best of the last 2 of 3 calls at each size (4 at the first,
    which warms up).
    """
    if max_n is None:
        max_n = 8192 if device.startswith("cuda") else 2048
    best = 0.0
    with torch.inference_mode():
        for multiply in _square_multiplies(dtype, device).values():
            n = 256
            while n <= max_n:
                a = torch.randn(n, n, device=device).to(dtype)
                b = torch.randn(n, n, device=device).to(dtype)
                took = []
                for _ in range(4 if n == 256 else 3):
                    synchronize(device)
                    start = time.perf_counter()
                    multiply(a, b)
                    synchronize(device)
                    took.append(time.perf_counter() - start)
                best = max(best, 2 * n**3 / min(took[-2:]) / 1e9)
                if min(took[-2:]) > budget_s:
                    break
                n *= 2
    return best


def _paths(settings: BenchSettings, model: torch.nn.Module, x: torch.Tensor, folder: Path) -> list:
    """The paths `settings` asks for (exports, if any, go to `folder`)."""
    dtype = DTYPES[settings.dtype]
    if settings.token_mixers:
        return mixer_paths(settings.model, settings.token_mixers, x, dtype, settings.micro_batch, settings.train)
    if settings.train:
        return train_paths(model, settings.model, x, dtype, settings.micro_batch, levers=settings.levers)
    if settings.levers:
        return lever_paths(model, settings.model, x, settings.micro_batch)
    paths = inference_paths(
        model, settings.model, x, dtype, settings.compile, settings.micro_batch, timm_compiled=settings.peers
    )
    threads = torch.get_num_threads()
    if settings.peers:
        paths += peer_paths(model, settings.model, x, threads, folder)
    if settings.onnx:
        paths += engine_paths(model, x, threads, folder)
    return paths


def run_benchmark(settings: BenchSettings) -> BenchReport:
    """Measure the paths `settings` asks for; the report holds the results and their Markdown section."""
    if settings.threads is not None:
        torch.set_num_threads(settings.threads)
    if settings.malloc == "tuned":
        tune_cpu_allocator()
    torch.manual_seed(settings.seed)
    dtype = DTYPES[settings.dtype]
    device = torch.device(settings.device)
    model = create_model(settings.model).to(device).eval()
    x = torch.randn(settings.batch_size, 3, settings.img_size, settings.img_size, device=device)
    params, macs = model_complexity(settings.model, (settings.img_size, settings.img_size))
    with contextlib.ExitStack() as stack:
        folder = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mambaout-bench-")))
        # the load runs from before the paths are built: auto measures its backends on a machine already busy
        stack.enter_context(busy_processes(settings.load))
        paths = _paths(settings, model, x, folder)
        if settings.token_mixers:
            params, macs = paths[0].params, paths[0].macs
        machine = machine_summary(settings.device)
        # the peak is measured before and after the paths, and the better kept: other load only lowers it
        peak = matmul_peak_gflops(dtype, settings.device)
        results = measure(paths, settings.repeats, settings.warmup, settings.iters, settings.device)
        for path, result in zip(paths, results, strict=True):
            result.peak_mib = peak_memory_mib(path.run, settings.device)
        peak = max(peak, matmul_peak_gflops(dtype, settings.device))
        load_after = load_average()
    per_image = 3 if settings.train else 1  # a training step is ~3x the forward's FLOPs
    notes = [
        f"matmul peak ({settings.dtype}, best n×n×n multiply by MKL or oneDNN, before and after): {peak:.1f} GFLOP/s; "
        f"'% of matmul peak' counts {2 * per_image} FLOPs per MAC"
    ]
    if settings.load:
        notes.append(f"under load: {settings.load} other process(es) kept one core busy each during the measurement")
    if settings.token_mixers:
        notes.append(
            "MACs: FlopCounterMode / 2, with the SSM's selective scan added by its analytic count B·L·D·(4N + 1) "
            "(FlopCounterMode counts no elementwise work); attention's L×L products counted in full even when causal"
        )
    if (settings.onnx or settings.peers) and not engine_installed("openvino"):
        notes.append("no OpenVINO rows: openvino is not installed (pip install 'mambaout[deploy]')")
    by_note: dict[str, list[str]] = {}
    for path in paths:
        if path.note:
            by_note.setdefault(path.note, []).append(f"`{path.name}`")
    notes += [f"{', '.join(names)}: {note}" for note, names in by_note.items()]
    kind = "inference levers" if settings.levers else "inference"
    if settings.train:
        kind = "training-step levers" if settings.levers else "training step"
    if settings.token_mixers:
        kind = f"token mixers, {kind}"
    title = (
        f"{settings.model}, {kind}, batch {settings.batch_size}, {settings.img_size}², {settings.dtype}, "
        f"{settings.device}"
    )
    table_args = (title, settings.command(), results, settings.batch_size, params, macs, machine, load_after, notes)
    markdown = markdown_table(*table_args, peak_gflops=peak, flops_per_mac=2 * per_image)
    return BenchReport(settings, results, params, macs, markdown)
