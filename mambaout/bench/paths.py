"""The paths a benchmark compares: timm's `mambaout_*` with the same weights (the baseline), and ours.

Inference: timm eager (bf16: under autocast, the usual way to run it in bf16), our fused path
(`optimize_for_inference`, its default backend), both `torch.compile`d with `--compile`; with `--onnx` our exported
model in ONNX Runtime (fused and reference graphs) and OpenVINO (latency and throughput hints); with `--peers` the
engines a user would pick instead of ours: timm compiled, and timm's own ONNX export in ONNX Runtime and OpenVINO.
`--levers` times our fp32 levers one at a time instead. Training: one whole step (forward, backward, AdamW) of
timm's model against `mambaout.fast.train_step`.
"""

import copy
import dataclasses
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn

from mambaout.bench.harness import BenchPath
from mambaout.export import export_model, verify_exported
from mambaout.fast import KernelSet, optimize_for_inference, select_kernels
from mambaout.fast.engines import (
    OPENVINO_HINTS,
    OnnxRuntimeEngine,
    OpenVINOEngine,
    engine_installed,
    onnx_file,
)
from mambaout.fast.kernels import ONEDNN_MIN_ROWS
from mambaout.fast.threads import ThreadFitter
from mambaout.fast.train_step import TrainStepConfig, autocast, fused_adamw, make_train_step
from mambaout.models import MambaOut, create_model, model_complexity
from mambaout.weights import convert_state_dict

__all__ = [
    "engine_paths",
    "inference_paths",
    "lever_paths",
    "mixer_paths",
    "peer_paths",
    "timm_twin",
    "train_paths",
]


def timm_twin(model: MambaOut, name: str) -> nn.Module:
    """timm's `name` holding `model`'s weights (same device, eval mode)."""
    import timm

    twin = timm.create_model(name, pretrained=False, num_classes=model.num_classes)
    twin.load_state_dict(convert_state_dict(model.state_dict(), to="timm"), strict=True)
    return twin.to(next(model.parameters()).device).eval()


def _infer(fn: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, autocast_dtype: torch.dtype | None = None):
    def run() -> torch.Tensor:
        with torch.inference_mode(), autocast(x.device, autocast_dtype):
            return fn(x)

    return run


def _compile(module: nn.Module, freeze: bool) -> Callable:
    # freezing lets inductor constant-fold the weights and pre-pack them for oneDNN (inference only)
    return torch.compile(module, options={"freezing": True} if freeze else None)


def inference_paths(
    model: MambaOut,
    name: str,
    x: torch.Tensor,
    dtype: torch.dtype,
    compiled: bool,
    micro_batch: int | None,
    timm_compiled: bool = False,
) -> list[BenchPath]:
    """timm eager (baseline) and our fused path, plus both compiled when `compiled`.

    Args:
        model: The reference model with the weights to compare (eval mode, on the benchmark device).
        name: Its registry name (= timm's name).
        x: Input images `[B, 3, H, W]` fp32.
        dtype: float32, or bfloat16 (timm under autocast, ours with bf16 weights).
        compiled: Add `torch.compile`d versions of both.
        micro_batch: Our path's micro-batch, None for automatic (then it is our default path).
        timm_compiled: Add timm compiled even without `compiled` (a peer).
    """
    twin = timm_twin(model, name)
    tag = "" if dtype == torch.float32 else " bf16"
    autocast_tag = "" if dtype == torch.float32 else " bf16 autocast"
    fast = optimize_for_inference(model, dtype=dtype, micro_batch=micro_batch)
    default = micro_batch is None and dtype == torch.float32
    chosen = fast.tune(x)  # auto: its timed first calls of this shape happen here, not among the timed calls
    note = f"optimize_for_inference, backend {fast.backend!r}: {chosen} at this shape"
    paths = [
        BenchPath(
            f"timm eager{autocast_tag}", _infer(twin, x, dtype), baseline=True, peer=True, note="timm.create_model"
        ),
        BenchPath(f"mambaout fast{tag}", _infer(fast, x), note=note, ours_default=default),
    ]
    if compiled or timm_compiled:
        timm_c = _compile(twin, freeze=True)
        paths.append(BenchPath(f"timm compiled{autocast_tag}", _infer(timm_c, x, dtype), peer=True))
    if compiled:
        fast_c = optimize_for_inference(model, dtype=dtype, micro_batch=micro_batch, compile=True)
        paths.append(BenchPath(f"mambaout fast compiled{tag}", _infer(fast_c, x)))
    return paths


def _engine_paths(
    label: str, path: Path, x: torch.Tensor, threads: int, peer: bool, note: str, openvino: bool = True
) -> list[BenchPath]:
    """ONNX Runtime, and OpenVINO with each hint where it is installed (and `openvino`), on one ONNX file."""
    images = x.detach().cpu().float().contiguous().numpy()
    engines = [OnnxRuntimeEngine(path, threads)]
    if openvino and engine_installed("openvino"):
        engines += [OpenVINOEngine(path, threads, hint) for hint in OPENVINO_HINTS]
    rows = []
    for engine in engines:
        what = engine.name if engine.name == "onnxruntime" else f"openvino {engine.hint.lower()}"
        engine.run(images)  # compiles OpenVINO's model for this shape before the timed calls
        rows.append(BenchPath(f"{what}, {label}", lambda e=engine: e.run(images), peer=peer, note=note))
    return rows


def engine_paths(model: MambaOut, x: torch.Tensor, threads: int, folder: Path) -> list[BenchPath]:
    """Our model exported as `optimize_for_inference`'s engines use it (the fused graph, verified) in ONNX Runtime
    and OpenVINO, plus ONNX Runtime on the reference graph (`mambaout export --reference-graph`); files in `folder`."""
    size = tuple(x.shape[-2:])
    note = "`mambaout export` graph (fused, verified); ONNX Runtime and OpenVINO keep their memory between calls"
    rows = _engine_paths("our export", onnx_file(model, size, folder=folder), x, threads, peer=False, note=note)
    reference = folder / "reference.onnx"
    export_model(model, "onnx", reference, img_size=size, verify=True)
    note = "`mambaout export --reference-graph`"
    return rows + _engine_paths("our reference graph", reference, x, threads, False, note, openvino=False)


def peer_paths(twin_source: MambaOut, name: str, x: torch.Tensor, threads: int, folder: Path) -> list[BenchPath]:
    """timm's own ONNX export (`timm.utils.onnx.onnx_export`) of the same weights, in ONNX Runtime and OpenVINO:
    what a user would run instead of us. The file is checked against timm eager before it is timed."""
    from timm.utils.onnx import onnx_export

    twin = timm_twin(twin_source, name).cpu()
    path = folder / "timm.onnx"
    example = torch.randn(2, *x.shape[1:], generator=torch.Generator().manual_seed(0))
    onnx_export(twin, str(path), example_input=example, opset=18, check=True)
    verify_exported(twin, path, "onnx", [(1, *x.shape[1:])])
    return _engine_paths("timm's export", path, x, threads, peer=True, note="`timm.utils.onnx.onnx_export`")


def lever_paths(model: MambaOut, name: str, x: torch.Tensor, micro_batch: int | None) -> list[BenchPath]:
    """The fp32 inference levers added one at a time, to show what each gives (the ablation table).

    timm eager (baseline); our reference model; fused blocks on composed ops, whole batch; + oneDNN's fused
    kernels on every input, then only on tall ones, then where `select_kernels` measured them faster (the default);
    + micro-batches; + threads fitted to the free cores (= `optimize_for_inference` on the torch backend). The rows
    before the last keep PyTorch's thread count whatever the load.
    """
    twin = timm_twin(model, name)
    whole = x.shape[0]

    def fixed_threads(**options) -> Callable[[], torch.Tensor]:
        fast = optimize_for_inference(model, backend="torch", **options)
        fast.threads = ThreadFitter(fit=False)
        return _infer(fast, x)

    everywhere = dataclasses.replace(select_kernels(x.device, torch.float32), min_rows=0)
    tall = dataclasses.replace(everywhere, min_rows=ONEDNN_MIN_ROWS)
    return [
        BenchPath("timm eager", _infer(twin, x), baseline=True),
        BenchPath("mambaout reference eager", _infer(model, x)),
        BenchPath("+ fused blocks (composed ops, whole batch)", fixed_threads(micro_batch=whole, kernels=KernelSet())),
        BenchPath("+ oneDNN fused kernels on every input", fixed_threads(micro_batch=whole, kernels=everywhere)),
        BenchPath(
            f"+ oneDNN fused kernels on inputs of {ONEDNN_MIN_ROWS}+ rows only",
            fixed_threads(micro_batch=whole, kernels=tall),
        ),
        BenchPath("+ oneDNN where measured faster (select_kernels)", fixed_threads(micro_batch=whole)),
        BenchPath("+ micro-batches", fixed_threads(micro_batch=micro_batch)),
        BenchPath(
            "+ threads fitted to free cores (optimize_for_inference, torch backend)",
            _infer(optimize_for_inference(model, micro_batch=micro_batch, backend="torch"), x),
        ),
    ]


def train_paths(
    model: MambaOut,
    name: str,
    x: torch.Tensor,
    dtype: torch.dtype,
    micro_batch: int | None,
    levers: bool = False,
) -> list[BenchPath]:
    """One training step (forward, backward, AdamW) of timm's model (baseline) and ours, same weights and data.

    Each path trains its own copy, so the weights drift apart over the repeats; the work per step does not.
    timm runs as its users run it (fp32, or bf16 autocast) with the fused AdamW; ours runs `mambaout.fast.train_step`
    with its default levers for the device, or with `levers` one row per lever added: the fused AdamW alone (whole
    batch, reference blocks), + cache-sized micro-batches, + split linears, + the depthwise conv's compiled weight
    gradient (`mambaout.fast.dwconv`).
    """
    targets = _targets(model, x)
    twin = timm_twin(model, name).train()
    twin_opt = fused_adamw(twin.parameters(), lr=1e-4, weight_decay=0.05)  # the fair baseline: timm users have it too
    loss_fn = nn.CrossEntropyLoss()

    def timm_step() -> None:
        with autocast(x.device, dtype):
            loss = loss_fn(twin(x), targets)
        loss.backward()
        twin_opt.step()
        twin_opt.zero_grad(set_to_none=True)

    def ours(**step_options) -> Callable[[], float]:
        return _our_train_step(model, x, targets, dtype, **step_options)

    tag = "" if dtype == torch.float32 else " bf16 autocast"
    note = "timm.create_model, torch.optim.AdamW(fused=True)"
    paths = [BenchPath(f"timm train step{tag}", timm_step, baseline=True, note=note)]
    if not levers:
        return [*paths, BenchPath(f"mambaout train step{tag}", ours(micro_batch=micro_batch))]
    whole = x.shape[0]
    return [
        *paths,
        BenchPath("mambaout step: fused AdamW only", ours(micro_batch=whole, split_linears=False)),
        BenchPath("+ micro-batches", ours(micro_batch=micro_batch, split_linears=False)),
        BenchPath("+ split linears", ours(micro_batch=micro_batch, split_linears=True, compiled_conv_grad=False)),
        BenchPath("+ compiled depthwise-conv weight gradient", ours(micro_batch=micro_batch, split_linears=True)),
    ]


def _targets(model: MambaOut, x: torch.Tensor) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, model.num_classes, (x.shape[0],), generator=gen).to(x.device)


def _our_train_step(
    model: MambaOut, x: torch.Tensor, targets: torch.Tensor, dtype: torch.dtype, **step_options
) -> Callable[[], float]:
    """`mambaout.fast.train_step` on a copy of `model` (fused AdamW), as one call on (x, targets)."""
    copy_ = copy.deepcopy(model).train()
    amp = None if dtype == torch.float32 else dtype
    step = make_train_step(
        copy_,
        fused_adamw(copy_.parameters(), lr=1e-4, weight_decay=0.05),
        nn.CrossEntropyLoss(),
        TrainStepConfig(amp_dtype=amp, **step_options),
    )
    return lambda: step(x, targets)


def mixer_paths(
    name: str, mixers: tuple[str, ...], x: torch.Tensor, dtype: torch.dtype, micro_batch: int | None, train: bool
) -> list[BenchPath]:
    """Variant `name` built with each token mixer (random weights, same seed), the first the baseline: our inference
    path (`optimize_for_inference`, which fuses every mixer's blocks) or our training step. Each row has its
    own params and MACs (the SSM's selective scan counted by its analytic formula)."""
    paths = []
    for i, mixer in enumerate(mixers):
        torch.manual_seed(0)
        model = create_model(name, token_mixer=mixer).to(x.device).eval()
        params, macs = model_complexity(name, tuple(x.shape[-2:]), token_mixer=mixer)
        if train:
            run = _our_train_step(model, x, _targets(model, x), dtype, micro_batch=micro_batch)
        else:
            fast = optimize_for_inference(model, dtype=dtype, micro_batch=micro_batch)
            fast.tune(x)
            run = _infer(fast, x)
        what = "training step" if train else "optimize_for_inference"
        paths.append(BenchPath(mixer, run, baseline=i == 0, note=f"token_mixer={mixer!r}, {what}", params=params,
                               macs=macs))  # fmt: skip
    return paths
