"""The engine: `train_one_epoch` (the shape of ConvNeXt's engine.py) for every task, and classification's step,
`evaluate` and `predict`.

One optimizer step is `accum_steps` micro-batches; under DistributedDataParallel all but the last run in `no_sync`,
so gradients are all-reduced once per step. Mixed precision is `torch.autocast` (bf16, or fp16 with a GradScaler).
A task supplies the forward and backward of one micro-batch (`ForwardBackward`); the loop, accumulation, clipping,
the scaler, the optimizer and schedule steps, EMA and the NaN stop are this module's, the same for every task.

Classification's step (`ClassificationStep`) has the faster training step of `mambaout.fast.train_step` built in,
changing how a step runs but not what it computes: each loaded batch runs forward and backward in cache-sized pieces
(`micro_batch`, each loss weighted by its share, so the gradient is the whole batch's), and the blocks can run as
split linears (no split/cat copies of the hidden activations).
"""

import contextlib
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mambaout.errors import UserError
from mambaout.fast.threads import ThreadFitter
from mambaout.fast.train_step import autocast, forward_backward, split_linear_blocks
from mambaout.train.distributed import DistEnv
from mambaout.train.progress import Progress

__all__ = [
    "ClassificationStep",
    "EpochProgress",
    "ForwardBackward",
    "NonFiniteLoss",
    "TrainParts",
    "backward",
    "current_lr",
    "evaluate",
    "predict",
    "resolve_amp",
    "syncing",
    "train_one_epoch",
]


class NonFiniteLoss(UserError):
    """The loss became NaN or infinite; the run stops without writing anything (the trainer adds where to go on)."""


class ForwardBackward(Protocol):
    """A task's forward and backward pass of one loaded micro-batch.

    Called with the run's parts, the batch as its loader yields it, and whether this is the optimizer step's last
    micro-batch (the one whose backward all-reduces the gradients: the others run under `syncing(..., False)`). It
    scales its loss by 1 / `parts.accum_steps`, passes it to `backward`, and returns the batch's loss summed over its
    samples (before that scaling) and the number of samples.
    """

    def __call__(self, parts: "TrainParts", batch: Any, last_micro: bool) -> tuple[float, int]: ...

    def epoch_context(self, module: nn.Module) -> contextlib.AbstractContextManager: ...


@dataclass
class TrainParts:
    """Everything `train_one_epoch` steps.

    Attributes:
        model: What runs forward: the model, or its DDP / compiled wrapper.
        module: The plain model inside (for EMA, clipping and checkpoints).
        optimizer: Built by timm's `create_optimizer_v2`.
        scheduler: A timm scheduler; `step_update` is called after every optimizer step.
        forward_backward: The task's micro-batch step.
        env: The process's rank and device.
        scaler: GradScaler for fp16, else None.
        ema: timm's ModelEmaV3, or None.
        amp_dtype: Autocast dtype, or None for float32.
        accum_steps: Micro-batches per optimizer step.
        clip_grad: Max gradient norm, or None.
        step: Optimizer steps taken so far over the run.
    """

    model: nn.Module
    module: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    forward_backward: ForwardBackward
    env: DistEnv
    scaler: torch.amp.GradScaler | None = None
    ema: nn.Module | None = None
    amp_dtype: torch.dtype | None = None
    accum_steps: int = 1
    clip_grad: float | None = None
    step: int = 0


@dataclass
class EpochProgress:
    """How far the current epoch got; saved in mid-epoch checkpoints so a resumed epoch reports the same loss."""

    updates: int = 0
    loss_sum: float = 0.0
    samples: int = 0
    seconds: float = 0.0

    @property
    def loss(self) -> float:
        return self.loss_sum / self.samples if self.samples else float("nan")


def _to_device(images: torch.Tensor, targets: torch.Tensor, env: DistEnv, channels_last: bool) -> tuple:
    images = images.to(env.device, non_blocking=True)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    return images, targets.to(env.device, non_blocking=True)


def resolve_amp(amp: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype for an `--amp` choice: auto is bf16 on a GPU that has it (else fp16), none on the CPU.

    Raises:
        UserError: fp16 asked for on the CPU (no GradScaler there).
    """
    if amp == "auto":
        if device.type != "cuda":
            return None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if amp == "fp16" and device.type != "cuda":
        raise UserError("--amp fp16 needs a GPU; use --amp bf16 or --amp none on the CPU")
    return {"none": None, "bf16": torch.bfloat16, "fp16": torch.float16}[amp]


def current_lr(optimizer: torch.optim.Optimizer) -> float:
    """The largest learning rate over the parameter groups (groups differ only under layer decay)."""
    return max(group["lr"] for group in optimizer.param_groups)


def train_one_epoch(
    parts: TrainParts,
    loader: DataLoader,
    epoch: int,
    num_updates: int,
    progress: EpochProgress,
    bar: Progress,
    should_stop: Callable[[], bool],
    after_update: Callable[[float], None] | None = None,
) -> bool:
    """Train until the epoch's `num_updates` optimizer steps are done or a stop is requested.

    Args:
        parts: Model, optimizer and the rest; `parts.step` advances.
        loader: Yields the epoch's remaining micro-batches (`(num_updates - progress.updates) * accum_steps`).
        epoch: Zero-based epoch, for messages.
        num_updates: Optimizer steps in a full epoch.
        progress: The epoch's tally so far; updated in place.
        bar: Progress display.
        should_stop: Asked after every optimizer step (agreed over ranks by the caller).
        after_update: Called after every optimizer step with the step's mean loss over this process's samples (a
            periodic checkpoint, experiment tracking).

    Returns:
        True when stopped early by `should_stop`.

    Raises:
        NonFiniteLoss: The loss became NaN or infinite.
    """
    model, optimizer, env = parts.model, parts.optimizer, parts.env
    model.train()
    batches = iter(loader)
    start, samples_before = time.perf_counter(), progress.samples
    with parts.forward_backward.epoch_context(parts.module):
        while progress.updates < num_updates:
            step_loss_sum, step_samples = 0.0, 0
            for micro in range(parts.accum_steps):
                loss_sum, samples = parts.forward_backward(parts, next(batches), micro == parts.accum_steps - 1)
                if not math.isfinite(loss_sum):  # checked before the optimizer step: nothing changed or was saved
                    raise NonFiniteLoss(
                        f"loss is {loss_sum / samples} at epoch {epoch + 1}, step {progress.updates + 1} of "
                        f"{num_updates} (run step {parts.step + 1}): try a lower --lr, --clip-grad or --amp none; "
                        "stopped before the update, without saving"
                    )
                step_loss_sum += loss_sum
                step_samples += samples
                progress.loss_sum += loss_sum
                progress.samples += samples
            _optimizer_step(parts)
            progress.updates += 1
            elapsed = time.perf_counter() - start
            images_per_sec = (progress.samples - samples_before) * env.world_size / max(elapsed, 1e-9)
            bar.update(progress.loss, current_lr(optimizer), images_per_sec)
            if after_update is not None:
                after_update(step_loss_sum / step_samples)
            if should_stop():
                progress.seconds += time.perf_counter() - start
                return True
    progress.seconds += time.perf_counter() - start
    return False


def syncing(model: nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Where a micro-batch's forward and backward run: DDP's `no_sync` unless `sync` (the step's last backward)."""
    return model.no_sync() if not sync and isinstance(model, DistributedDataParallel) else nullcontext()


def backward(parts: TrainParts, loss: torch.Tensor) -> None:
    """Backward of an already scaled loss, through the fp16 GradScaler when there is one."""
    (parts.scaler.scale(loss) if parts.scaler is not None else loss).backward()


def _optimizer_step(parts: TrainParts) -> None:
    if parts.clip_grad is not None:
        if parts.scaler is not None:
            parts.scaler.unscale_(parts.optimizer)  # clip the true gradients, not the scaled ones
        nn.utils.clip_grad_norm_(parts.module.parameters(), parts.clip_grad)
    if parts.scaler is not None:
        parts.scaler.step(parts.optimizer)
        parts.scaler.update()
    else:
        parts.optimizer.step()
    parts.optimizer.zero_grad(set_to_none=True)
    parts.step += 1
    parts.scheduler.step_update(num_updates=parts.step)
    if parts.ema is not None:
        parts.ema.update(parts.module, step=parts.step)


# --- classification: the step, evaluation and prediction ------------------------------------------------------------


@dataclass
class ClassificationStep:
    """Classification's `ForwardBackward`: mixup, then forward and backward in pieces of `micro_batch` images.

    Attributes:
        criterion: Training loss on (logits, targets), targets soft when mixup is on.
        mixup: timm's Mixup/CutMix, or None.
        channels_last: Feed images in channels-last memory format.
        micro_batch: Images per forward/backward pass within a loaded batch, or None for the whole batch.
        split_linears: Run the MambaOut blocks as split linears during the epoch (`split_linear_blocks`).
        threads: Fits the CPU threads of each batch's forward and backward to the cores left free.
    """

    criterion: nn.Module
    mixup: Callable | None = None
    channels_last: bool = False
    micro_batch: int | None = None
    split_linears: bool = False
    threads: ThreadFitter = field(default_factory=ThreadFitter)

    def epoch_context(self, module: nn.Module) -> contextlib.AbstractContextManager:
        # the blocks' class is switched for the whole epoch (parameters, state dict and EMA are untouched by it)
        return split_linear_blocks(module) if self.split_linears else nullcontext()

    def __call__(self, parts: TrainParts, batch: Any, last_micro: bool) -> tuple[float, int]:
        images, targets = _to_device(*batch, parts.env, self.channels_last)
        if self.mixup is not None:
            images, targets = self.mixup(images, targets)
        # on the CPU, one thread per core the loader workers and other processes leave free (`ThreadFitter`)
        with self.threads() if images.device.type == "cpu" else nullcontext():
            return self._forward_backward(parts, images, targets, last_micro), len(images)

    def _forward_backward(
        self, parts: TrainParts, images: torch.Tensor, targets: torch.Tensor, last_micro: bool
    ) -> float:
        """Forward and backward of one loaded batch in pieces of `micro_batch` (the library's `forward_backward`);
        returns the batch's loss sum. Gradients are all-reduced only in the last backward pass of an optimizer step.
        """
        total = forward_backward(
            parts.model,
            self.criterion,
            images,
            targets,
            self.micro_batch or len(images),
            parts.amp_dtype,
            weight=1 / parts.accum_steps,
            piece_context=lambda last: syncing(parts.model, last_micro and last),
            backward=lambda loss: backward(parts, loss),
        )
        return total.item()  # one host sync per batch, not per piece


@torch.no_grad()
def evaluate(
    model: nn.Module,
    loader: DataLoader,
    env: DistEnv,
    amp_dtype: torch.dtype | None = None,
    channels_last: bool = False,
) -> dict[str, float]:
    """Top-1/top-5 accuracy and cross-entropy over `loader`, summed over all ranks.

    Samples labelled -1 (unreadable files) are left out. With fewer than 5 classes, top-5 is top-all (100%).

    Returns:
        `loss`, `top1` and `top5` (percent), `images` (counted) and `images_per_sec` (all ranks together).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=env.device)  # loss sum, top-1 hits, top-5 hits, images
    start = time.perf_counter()
    for images, targets in loader:
        keep = targets >= 0
        if not keep.any():
            continue
        images, targets = _to_device(images[keep], targets[keep], env, channels_last)
        with autocast(env.device, amp_dtype):
            logits = model(images)
        logits = logits.float()
        hits = logits.topk(min(5, logits.shape[1]), dim=1).indices == targets[:, None]  # [B, k]
        loss = F.cross_entropy(logits, targets, reduction="sum")
        totals += torch.stack([loss, hits[:, 0].sum(), hits.any(1).sum(), keep.sum().to(env.device)]).double()
    env.all_reduce_(totals)
    seconds = time.perf_counter() - start
    loss_sum, top1, top5, count = totals.tolist()
    if count == 0:
        return {"loss": float("nan"), "top1": float("nan"), "top5": float("nan"), "images": 0, "images_per_sec": 0.0}
    return {
        "loss": loss_sum / count,
        "top1": 100.0 * top1 / count,
        "top5": 100.0 * top5 / count,
        "images": int(count),
        "images_per_sec": count / max(seconds, 1e-9),
    }


@torch.no_grad()
def predict(
    model: nn.Module,
    loader: DataLoader,
    device: torch.device,
    top: int,
    amp_dtype: torch.dtype | None = None,
) -> dict[int, tuple[list[float], list[int]]]:
    """The `top` softmax probabilities and class indices of every readable sample.

    Args:
        loader: Yields (images, sample index), the index -1 for an unreadable file.

    Returns:
        Sample index -> (probabilities, class indices), most probable first.
    """
    model.eval()
    results: dict[int, tuple[list[float], list[int]]] = {}
    for images, indices in loader:
        keep = indices >= 0
        if not keep.any():
            continue
        with autocast(device, amp_dtype):
            logits = model(images[keep].to(device))
        probs, classes = logits.float().softmax(dim=1).topk(min(top, logits.shape[1]), dim=1)
        for i, p, c in zip(indices[keep].tolist(), probs.tolist(), classes.tolist(), strict=True):
            results[i] = (p, c)
    return results
