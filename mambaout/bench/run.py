"""`run_benchmark`: build the paths a `BenchSettings` asks for, measure them interleaved, return the Markdown."""

import shlex
import shutil
import time
from dataclasses import dataclass

import torch

from mambaout.bench.harness import (
    load_average,
    machine_summary,
    markdown_table,
    measure,
    peak_memory_mib,
    synchronize,
)
from mambaout.bench.paths import inference_paths, lever_paths, mixer_paths, onnx_paths, train_paths
from mambaout.errors import UserError
from mambaout.fast.allocator import MALLOC_MODES, tune_cpu_allocator
from mambaout.layers import TOKEN_MIXERS
from mambaout.models import create_model, get_spec, model_complexity
from mambaout.train.distributed import check_device

__all__ = ["DTYPES", "BenchSettings", "matmul_peak_gflops", "run_benchmark"]

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
        onnx: Add ONNX Runtime on our exported model (fp32 inference only).
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
    """

    model: str = "mambaout_femto"
    batch_size: int = 32
    img_size: int = 224
    dtype: str = "fp32"
    compile: bool = False
    train: bool = False
    onnx: bool = False
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
        if self.onnx and (self.train or self.dtype != "fp32"):
            raise UserError("--onnx times fp32 inference; drop --train / use --dtype fp32")
        unknown = [m for m in self.token_mixers if m not in TOKEN_MIXERS]
        if unknown:
            raise UserError(f"--token-mixer {','.join(unknown)}: choose from {', '.join(TOKEN_MIXERS)}, or all")
        if self.token_mixers and (self.onnx or self.levers or self.compile):
            raise UserError("--token-mixer compares our model's mixers: drop --onnx, --levers and --compile")
        if self.levers and not self.train and self.dtype != "fp32":
            raise UserError("--levers times fp32 inference levers (or training levers with --train); use --dtype fp32")

    def command(self) -> str:
        """The `mambaout bench` command line that reproduces these settings."""
        args = ["mambaout", "bench", "--model", self.model, "--batch-size", str(self.batch_size)]
        args += ["--img-size", str(self.img_size), "--dtype", self.dtype, "--repeats", str(self.repeats)]
        args += [f"--{f}" for f in ("compile", "train", "onnx", "levers") if getattr(self, f)]
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
        return shlex.join(args)


def matmul_peak_gflops(
    dtype: torch.dtype, device: str = "cpu", max_n: int | None = None, budget_s: float = 0.25
) -> float:
    """The machine's matmul peak as PyTorch reaches it: best GFLOP/s of square n×n×n multiplies.

    n doubles from 256 up to `max_n` (default 2048 on CPU, 8192 on a GPU, which needs larger matrices to fill)
    while one multiply takes under `budget_s` (a dtype without hardware support, such as bf16 on an AVX2-only CPU,
    runs orders of magnitude slower and stops early); best of the last 2 of 3 calls at each size (4 at the first,
    which warms up).
    """
    if max_n is None:
        max_n = 8192 if device.startswith("cuda") else 2048
    best, n = 0.0, 256
    while n <= max_n:
        a = torch.randn(n, n, device=device).to(dtype)
        b = torch.randn(n, n, device=device).to(dtype)
        took = []
        for _ in range(4 if n == 256 else 3):
            synchronize(device)
            start = time.perf_counter()
            a @ b
            synchronize(device)
            took.append(time.perf_counter() - start)
        best = max(best, 2 * n**3 / min(took[-2:]) / 1e9)
        if min(took[-2:]) > budget_s:
            break
        n *= 2
    return best


def run_benchmark(settings: BenchSettings) -> str:
    """Measure the paths `settings` asks for and return the Markdown section (heading, context, table, notes)."""
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
    machine = machine_summary(settings.device)
    exported = None
    if settings.token_mixers:
        paths = mixer_paths(settings.model, settings.token_mixers, x, dtype, settings.micro_batch, settings.train)
        params, macs = paths[0].params, paths[0].macs
    elif settings.train:
        paths = train_paths(model, settings.model, x, dtype, settings.micro_batch, levers=settings.levers)
    elif settings.levers:
        paths = lever_paths(model, settings.model, x, settings.micro_batch)
    else:
        paths = inference_paths(model, settings.model, x, dtype, settings.compile, settings.micro_batch)
        if settings.onnx:
            ort_paths, exported = onnx_paths(model, x, torch.get_num_threads())
            paths += ort_paths
    # the peak is measured before and after the paths, and the better kept: load from other processes only lowers it
    peak = matmul_peak_gflops(dtype, settings.device)
    try:
        results = measure(paths, settings.repeats, settings.warmup, settings.iters, settings.device)
        for path, result in zip(paths, results, strict=True):
            result.peak_mib = peak_memory_mib(path.run, settings.device)
    finally:
        if exported is not None:
            shutil.rmtree(exported, ignore_errors=True)
    peak = max(peak, matmul_peak_gflops(dtype, settings.device))
    per_image = 3 if settings.train else 1  # a training step is ~3x the forward's FLOPs
    notes = [f"matmul peak ({settings.dtype}, best n×n×n multiply, before and after): {peak:.1f} GFLOP/s"]
    if settings.token_mixers:
        notes.append(
            "MACs: FlopCounterMode / 2, with the SSM's selective scan added by its analytic count B·L·D·(4N + 1) "
            "(FlopCounterMode counts no elementwise work); attention's L×L products counted in full even when causal"
        )
    for path, r in zip(paths, results, strict=True):
        achieved = r.images_per_s(settings.batch_size) * 2 * (path.macs or macs) * per_image / 1e9
        what = f" ({path.note})" if path.note else ""
        notes.append(f"{r.name}{what}: {achieved:.1f} GFLOP/s = {100 * achieved / peak:.0f}% of the matmul peak")
    kind = "inference levers" if settings.levers else "inference"
    if settings.train:
        kind = "training-step levers" if settings.levers else "training step"
    if settings.token_mixers:
        kind = f"token mixers, {kind}"
    title = (
        f"{settings.model}, {kind}, batch {settings.batch_size}, {settings.img_size}², {settings.dtype}, "
        f"{settings.device}"
    )
    load_after = load_average()
    return markdown_table(
        title, settings.command(), results, settings.batch_size, params, macs, machine, load_after, notes
    )
