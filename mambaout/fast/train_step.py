"""A faster training step that computes the same update: forward, backward and optimizer step on one batch.

`make_train_step` returns a standalone step function (the benchmark's); the training engine runs the same
`forward_backward` with DDP, accumulation and a GradScaler around it (`--micro-batch`, `--split-linears`,
`--fused-optimizer`), so the step lives in one place. The levers change how the step runs, never what it computes:

- Cache-aware accumulation (CPU): the batch runs as micro-batches of `micro_batch` images whose activations stay
  in cache, each loss scaled by its share of the batch, so the accumulated gradient is the whole batch's mean-loss
  gradient (MambaOut has no batch statistics: LayerNorm only). It also caps activation memory at one micro-batch.
- Channels-last images, so the stem's convolutions take oneDNN's NHWC path without a layout copy.
- Mixed precision as `torch.autocast` (bf16 on CPUs with AMX / AVX-512-BF16 and on GPUs).
- Split linears (CPU): during the step every MambaOut block runs `SplitLinearGatedCNNBlock.forward`, which
  applies fc1 and fc2 as row/column slices of their weights, so neither the forward (`split`, `cat`) nor the
  backward (the `cat` that is `split`'s gradient) copies the hidden activations, and the depthwise conv reads a
  dense channels-last input. Same parameters, same function. Where `select_kernels` measured oneDNN's GEMM faster
  than MKL's on every input (fp32, no autocast: e.g. AMD CPUs with AVX-512, where MKL stays at AVX2), these linears
  and their input gradients run on oneDNN (`OneDNNLinear`; 1.2-1.3× the whole step on the dev machine's Zen 5).
- The depthwise conv's weight gradient compiled into one vectorised reduction (CPU, fp32, large maps; with split
  linears): PyTorch's CPU backward gives it to a generic oneDNN kernel at 15× the forward's time
  (`mambaout.fast.dwconv`).
- A fused optimizer where the caller builds one (`torch.optim.AdamW(..., fused=True)`; `fused_adamw` does).
- Threads fitted to the free cores (CPU): a step runs one intra-op thread per core that other processes (the run's
  own data-loader workers among them) leave free, so OpenMP never waits on a taken core (`mambaout.fast.threads`).
"""

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.fast.dwconv import depthwise_conv
from mambaout.fast.kernels import select_kernels
from mambaout.fast.optimize import micro_batches
from mambaout.fast.threads import ThreadFitter
from mambaout.layers import DepthwiseConvMixer, GatedCNNBlock

__all__ = [
    "OneDNNLinear",
    "SplitLinearGatedCNNBlock",
    "TrainStepConfig",
    "auto_train_micro_batch",
    "autocast",
    "forward_backward",
    "fused_adamw",
    "make_train_step",
    "split_linear_blocks",
]

# Bytes of stage-1 activations a training micro-batch may keep for the backward pass. Femto at 224² keeps ~9.6 MB per
# image, so this makes pieces of 16 of a batch of 32: on the Zen 5 dev machine (oneDNN GEMMs) 1.30× timm's step at
# 48% of its memory, where pieces of 8 gave 1.17× at 25% and the whole batch 1.39× at 78% (BENCHMARKS.md, issue 14).
TRAIN_MICRO_BATCH_BYTES = 160 * 2**20
# Values of width C kept per stage-1 pixel by the reference block for backward (input, normed, fc1 output x2h/C,
# activated gate, concatenated product, conv in/out, output).
SAVED_VALUES_PER_CHANNEL = 16


class OneDNNLinear(torch.autograd.Function):
    """`F.linear` for fp32 CPU tensors whose forward and input gradient run on oneDNN's GEMM.

    The weight gradient `grad^T @ x` stays with `torch.mm`: through oneDNN it would need both operands transposed
    (copies of the activations), which costs more than the GEMM it would speed up.
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])  # [N, K]
        out = torch.ops.mkldnn._linear_pointwise(flat, weight, bias, "none", [], "")  # [N, M]
        ctx.save_for_backward(flat, weight)
        ctx.has_bias = bias is not None
        return out.view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        flat, weight = ctx.saved_tensors
        grad_flat = grad.reshape(-1, grad.shape[-1]).contiguous()  # [N, M]
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:  # grad @ W = linear(grad, W^T): [N, K]
            grad_x = torch.ops.mkldnn._linear_pointwise(grad_flat, weight.t().contiguous(), None, "none", [], "")
            grad_x = grad_x.view(*grad.shape[:-1], weight.shape[1])
        if ctx.needs_input_grad[1]:
            grad_w = grad_flat.t().mm(flat)  # [M, K]
        if ctx.has_bias and ctx.needs_input_grad[2]:
            grad_b = grad_flat.sum(0)
        return grad_x, grad_w, grad_b


def _onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    return OneDNNLinear.apply(x.contiguous(), weight.contiguous(), bias)


def _onednn_trains(x: torch.Tensor) -> bool:
    """True where oneDNN is the faster GEMM for every input (`select_kernels`) and `x` is fp32 on the CPU outside
    autocast (oneDNN's op is not autocast's to cast)."""
    if not x.is_cpu or x.dtype != torch.float32 or torch.is_autocast_enabled("cpu"):
        return False
    kernels = select_kernels("cpu", torch.float32)
    return kernels.onednn and kernels.min_rows == 0


class SplitLinearGatedCNNBlock(GatedCNNBlock):
    """`GatedCNNBlock` whose forward never splits or concatenates the hidden activations (for training).

    `fc1(x)` split into (g, i, c) equals four linears on row slices of `fc1.weight` (g's identity and conv halves,
    i, c), and `fc2(cat(p_i, p_c))` equals `fc2` applied as two column slices, summed. Gradients reach the same
    `fc1`/`fc2` parameters through the slices. The depthwise conv's weight gradient is compiled where that pays
    (`mambaout.fast.dwconv.depthwise_conv`). Blocks become this class only inside `split_linear_blocks`.
    """

    compiled_conv_grad = True  # `split_linear_blocks(..., compiled_conv_grad=False)` turns it off per block

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, W, C]` -> `[B, H, W, C]`."""
        hidden, ident, _ = self.split_sizes
        w1, b1, w2 = self.fc1.weight, self.fc1.bias, self.fc2.weight
        onednn = _onednn_trains(x)
        linear = _onednn_linear if onednn else F.linear
        normed = self.norm(x)
        gate_i = self.act(linear(normed, w1[:ident], b1[:ident]))
        gate_c = self.act(linear(normed, w1[ident:hidden], b1[ident:hidden]))
        prod_i = gate_i * linear(normed, w1[hidden : hidden + ident], b1[hidden : hidden + ident])
        conv_in = linear(normed, w1[hidden + ident :], b1[hidden + ident :])
        if self.compiled_conv_grad and type(self.mixer) is DepthwiseConvMixer:
            conv_out = depthwise_conv(self.mixer.conv, conv_in)
        else:  # any other token mixer as its module
            conv_out = self.mixer(conv_in)
        prod_c = gate_c * conv_out
        if onednn:
            out = linear(prod_i, w2[:, :ident], self.fc2.bias) + linear(prod_c, w2[:, ident:])  # [B, H, W, C]
        else:
            out = F.linear(prod_i, w2[:, :ident], self.fc2.bias).flatten(0, -2)  # [N, C]
            out = torch.addmm(out, prod_c.flatten(0, -2), w2[:, ident:].t()).view_as(x)  # + the conv half's share
        return x + self.drop_path(self.ls(out))


@contextlib.contextmanager
def split_linear_blocks(model: nn.Module, compiled_conv_grad: bool = True) -> Iterator[nn.Module]:
    """Within the block, the model's Gated CNN blocks (any mixer) run `SplitLinearGatedCNNBlock.forward` (nothing else
    changes).

    The blocks' class is switched and switched back, so parameters, state dict and optimizer state are untouched.
    `compiled_conv_grad=False` keeps PyTorch's depthwise-conv backward (to measure what the compiled one gives).
    """
    blocks = [m for m in model.modules() if type(m) is GatedCNNBlock]
    for block in blocks:
        block.__class__ = SplitLinearGatedCNNBlock
        if not compiled_conv_grad:
            block.compiled_conv_grad = False
    try:
        yield model
    finally:
        for block in blocks:
            block.__class__ = GatedCNNBlock
            block.__dict__.pop("compiled_conv_grad", None)


@dataclass(frozen=True)
class TrainStepConfig:
    """How to run a step (none of it changes what is computed, up to float rounding order).

    Attributes:
        amp_dtype: Autocast dtype: torch.bfloat16, or None for fp32 (fp16 would need a gradient scaler).
        micro_batch: Images per micro-batch; None picks one from the image size on CPU and runs whole batches on GPU.
        split_linears: Run the blocks as `SplitLinearGatedCNNBlock` (no split/cat copies); None: on the CPU only
            (on a GPU its thinner matrix multiplies cost more than the copies they save: 0.92-0.97× on an H100).
        compiled_conv_grad: With split linears, the depthwise conv's compiled weight gradient where it applies
            (`mambaout.fast.dwconv`); False keeps PyTorch's.
    """

    amp_dtype: torch.dtype | None = None
    micro_batch: int | None = None
    split_linears: bool | None = None
    compiled_conv_grad: bool = True

    def __post_init__(self) -> None:
        if self.micro_batch is not None and self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.amp_dtype not in (None, torch.bfloat16):
            raise ValueError(f"amp_dtype must be None or torch.bfloat16, got {self.amp_dtype}")


def auto_train_micro_batch(model: nn.Module, image_size: tuple[int, int], dtype: torch.dtype) -> int:
    """Images per training micro-batch so that one stage-1 block's saved activations fit `TRAIN_MICRO_BATCH_BYTES`."""
    width = model.feature_info[0]["num_chs"]
    pixels = (image_size[0] // 4) * (image_size[1] // 4)
    per_image = pixels * width * SAVED_VALUES_PER_CHANNEL * torch.finfo(dtype).bits // 8
    return max(1, TRAIN_MICRO_BATCH_BYTES // max(per_image, 1))


def autocast(device: torch.device, dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    """`torch.autocast` to `dtype` on `device`'s type; no autocast for None or float32."""
    if dtype is None or dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def fused_adamw(params: Iterable, lr: float, weight_decay: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with the fused (single-kernel) implementation where this PyTorch has it for the parameters' device."""
    params = list(params)
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device/dtype in this PyTorch
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, **kwargs)


def forward_backward(
    model: nn.Module,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    images: torch.Tensor,
    targets: torch.Tensor,
    chunk: int,
    amp_dtype: torch.dtype | None = None,
    weight: float = 1.0,
    piece_context: Callable[[bool], contextlib.AbstractContextManager] = lambda last: contextlib.nullcontext(),
    backward: Callable[[torch.Tensor], None] = torch.Tensor.backward,
) -> torch.Tensor:
    """Forward and backward of one batch in pieces of `chunk` images: the one micro-batched step of this package
    (`make_train_step` and the training engine both run it).

    Each piece's mean loss is weighted by its share of the batch (and by `weight`, e.g. 1 / accumulation steps), so
    the summed gradient is the batch's mean-loss gradient whatever the piece size (MambaOut has no batch
    statistics).

    Args:
        piece_context: Entered around each piece's forward and backward, given whether it is the batch's last piece
            (DistributedDataParallel's `no_sync` on all but that one).
        backward: Runs the weighted loss's backward (through a GradScaler, say).

    Returns:
        The batch's loss sum (mean loss × images) as a 0-d float64 tensor: no host sync until the caller reads it.
    """
    batch = images.shape[0]
    pieces = list(zip(micro_batches(images, chunk), micro_batches(targets, chunk), strict=True))
    total = torch.zeros((), dtype=torch.float64, device=images.device)
    for k, (part, part_targets) in enumerate(pieces):
        with piece_context(k == len(pieces) - 1):
            with autocast(images.device, amp_dtype):
                loss = loss_fn(model(part), part_targets)
            backward(loss * (part.shape[0] / batch * weight))
        total += loss.detach().double() * part.shape[0]
    return total


def make_train_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    config: TrainStepConfig | None = None,
) -> Callable[[torch.Tensor, torch.Tensor], float]:
    """A function `step(images, targets) -> loss` doing one optimizer step on the batch.

    Args:
        model: The model in train mode (its parameters are the optimizer's).
        optimizer: Updates the parameters; its gradients are cleared after every step.
        loss_fn: Mean loss over the batch (e.g. `nn.CrossEntropyLoss()`); per-sample terms are what make
            micro-batches exact.
        config: How to run the step; default fp32, automatic micro-batches, channels-last.

    Returns:
        `step(images [B, 3, H, W], targets [B] or [B, classes]) -> the batch's mean loss as a float`.
    """
    config = config or TrainStepConfig()
    threads = ThreadFitter()

    def step(images: torch.Tensor, targets: torch.Tensor) -> float:
        if images.device.type != "cpu":
            return run(images, targets)
        with threads():
            return run(images, targets)

    def run(images: torch.Tensor, targets: torch.Tensor) -> float:
        batch = images.shape[0]
        images = images.contiguous(memory_format=torch.channels_last)  # the stem's convs take oneDNN's NHWC path
        chunk = config.micro_batch
        if chunk is None:
            on_cpu = images.device.type == "cpu"
            compute = config.amp_dtype or images.dtype  # as `mambaout train` sizes them
            chunk = auto_train_micro_batch(model, images.shape[-2:], compute) if on_cpu else batch
        split = config.split_linears if config.split_linears is not None else images.device.type == "cpu"
        with split_linear_blocks(model, config.compiled_conv_grad) if split else contextlib.nullcontext():
            total = forward_backward(model, loss_fn, images, targets, chunk, config.amp_dtype)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return total.item() / batch

    return step
