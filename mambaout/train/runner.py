"""The one training engine around a task: a whole run's set-up, epochs, evaluation, checkpoints and records.

A `Task` (`mambaout.train.task`: classification in `mambaout.train.trainer`, detection and segmentation in
`mambaout.dense`) supplies its config class, data, model, micro-batch step and validation metric; everything else is
the same for every task: `mambaout.train.prepare.prepare_run` turns a recipe, flags and `--resume` into a config (and
the checkpoint to continue from), and `run_training` here runs it, on one process or under `torchrun` with
DistributedDataParallel. Only rank 0 prints and writes, holding the run folder's lock (`RunDir.lock`) for the
run: a second process training into the same folder is refused.

Never losing a run: `last.pth` is replaced atomically after every epoch (and every `save_interval` steps); SIGINT
and SIGTERM finish the current optimizer step, save a resumable `last.pth` and raise `TrainingInterrupted`; a NaN or
infinite loss raises `NonFiniteLoss` before anything is written, and data that fails mid-run (a transform, the data
folder gone) `DataFailed`, each saying where the run can go on from. `--resume auto` picks `last.pth` up: at an epoch
end, or mid-epoch with the same samples still to come (and the same random draws when `workers` is 0), streamed
shards (`mambaout.data.shards`, no sampler) too: they read the epoch's shard order again, passing over what was read.
"""

import contextlib
import dataclasses
import math
import signal
import time
import warnings
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, IterableDataset

from mambaout.data import DataFailed, ResumableSampler, ShardSampler, data_label
from mambaout.errors import UserError, describe
from mambaout.rundir import RunDir
from mambaout.train.checkpoint import READ_FROM, refuse_if_replaced, rng_state, save_checkpoint, set_rng_state
from mambaout.train.config import RunConfig
from mambaout.train.distributed import DistEnv, init_distributed
from mambaout.train.engine import (
    EpochProgress,
    NonFiniteLoss,
    TrainParts,
    current_lr,
    resolve_amp,
    train_one_epoch,
)
from mambaout.train.notices import listed, warn
from mambaout.train.optim import create_optimizer
from mambaout.train.progress import Progress, format_duration
from mambaout.train.signals import StopSignals, TrainingInterrupted, ignore_sigint
from mambaout.train.task import Task, TrainResult
from mambaout.train.tracking import Tracking

__all__ = ["run_training"]


def run_training(task: type[Task], config: RunConfig, checkpoint: dict[str, Any] | None = None) -> TrainResult:
    """Run training to `config.epochs` (or `config.iters`), continuing `checkpoint` when given.

    Args:
        task: The kind of run.
        config: From `prepare_run` (or built directly).
        checkpoint: A `last.pth` to continue from (`prepare_run` checked it); without one, `config.output` must not
            hold a run yet.

    Raises:
        UserError: Bad data, model or settings, or another process training into the same folder; NonFiniteLoss for
            a diverged run; DataFailed for data that failed mid-run.
        TrainingInterrupted: SIGINT/SIGTERM, after saving.
    """
    env = init_distributed(config.device)
    try:
        run = RunDir(env.broadcast(config.output or _default_output(config, task.default_data)))
        with _held(run, env, (checkpoint or {}).get(READ_FROM)), StopSignals() as signals:
            return Runner(task(config, env), run, checkpoint, signals).fit()
    finally:
        env.shutdown()


@contextlib.contextmanager
def _held(run: RunDir, env: DistEnv, read_from: tuple[Path, tuple[int, int, int, int]] | None) -> Iterator[None]:
    """`run`'s directory locked by rank 0 (the only writer) for the block; every rank stops when another process holds
    it, or when the checkpoint being resumed (`read_from`: its path and state when read) was replaced since."""
    with contextlib.ExitStack() as stack:
        refused = None
        if env.is_main:
            try:
                stack.enter_context(run.lock())
                if read_from is not None:
                    refuse_if_replaced(*read_from)
            except UserError as e:
                refused = str(e)
        refused = env.broadcast(refused)
        if refused:
            raise UserError(refused)
        yield


class Runner:
    """One run's state; `fit` drives the epochs."""

    def __init__(self, task: Task, run: RunDir, checkpoint: dict[str, Any] | None, signals: StopSignals):
        self.task, self.env, self.signals = task, task.env, signals
        config, env = task.config, task.env
        if config.threads:
            torch.set_num_threads(config.threads)
        random_seed(config.seed, env.rank)
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not config.deterministic
        self.run = run
        if checkpoint is None and self.run.holds_run():
            raise UserError(
                f"{self.run.path} already holds a run: continue it with --resume auto, or pick another --output"
            )
        self.tracking = Tracking(config.log, config.log_interval, (checkpoint or {}).get("tracking"))
        task.build_data(checkpoint)
        if env.is_main:
            task.warn_about_data()
        self._build_model(checkpoint)
        self._build_optimization()
        task.check_memory(self.parts)
        self._restore(checkpoint)

    # --- set-up ----------------------------------------------------------------------------------------------------

    def _build_model(self, checkpoint: dict[str, Any] | None) -> None:
        task, env = self.task, self.env
        model = task.build_model(pretrained=bool(task.config.pretrained) and checkpoint is None)
        config = task.config
        global_batch = config.global_batch(env.world_size)
        self.lr_rule = (
            "(set by lr)"
            if config.lr is not None
            else f"= base_lr {config.base_lr:g} × {global_batch} / {config.lr_batch}"
        )
        self.config = task.config = config = dataclasses.replace(
            config, output=str(self.run.path), lr=config.resolved_lr(env.world_size)
        )
        if config.min_lr > config.lr and env.is_main and config.sched != "multistep":
            warn(
                f"--min-lr {config.min_lr:g} is above the resolved lr {config.lr:g}: the schedule will rise, not decay"
            )
        model.to(env.device)
        if env.distributed and env.device.type == "cuda":  # batch statistics over all GPUs, as mmdet/mmseg's SyncBN
            model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        self.module = model
        self.eval_model = torch.compile(model) if config.compile else model
        self.forward_model = self.eval_model
        if env.distributed:  # DDP's constructor gives every rank rank 0's weights
            device_ids = [env.device.index] if env.device.type == "cuda" else None
            # depthwise kernels [C, 1, k, k] get gradients whose stride differs only on the size-1 dim: same memory
            warnings.filterwarnings("ignore", message="Grad strides do not match bucket view strides")
            self.forward_model = DistributedDataParallel(
                self.eval_model, device_ids=device_ids, gradient_as_bucket_view=True
            )
        self.ema = ModelEmaV3(model, decay=config.ema_decay, use_warmup=config.ema_warmup) if config.ema else None
        self.amp_dtype = resolve_amp(config.amp, env.device)

    def _build_optimization(self) -> None:
        config, env, task = self.config, self.env, self.task
        streamed = isinstance(task.train_set, IterableDataset)  # shards: each rank reads its own, in its own order
        self.sampler = None if streamed else ResumableSampler(task.train_set, env.world_size, env.rank, config.seed)
        per_process = task.train_set.samples_per_process if streamed else len(self.sampler)
        self.updates_per_epoch = per_process // (config.batch_size * config.accum_steps)
        if self.updates_per_epoch == 0:
            raise UserError(
                f"{task.train_set.root} has {per_process} images per process, fewer than one optimizer step "
                f"takes ({config.batch_size} × {config.accum_steps} accumulation steps): lower --batch-size"
            )
        # an iteration-based run (--iters) is whole epochs and a last one cut short
        self.epochs = math.ceil(config.iters / self.updates_per_epoch) if config.iters else config.epochs
        use_cuda = env.device.type == "cuda"
        self.generator = torch.Generator()
        self.train_loader = DataLoader(
            task.train_set,
            batch_size=config.batch_size,
            sampler=self.sampler,
            num_workers=config.workers,
            collate_fn=task.collate_fn,
            pin_memory=use_cuda,
            drop_last=True,
            generator=self.generator,
            worker_init_fn=ignore_sigint,
        )
        streamed_val = isinstance(task.val_set, IterableDataset)  # shards split over the ranks by themselves
        self.val_loader = DataLoader(
            task.val_set,
            batch_size=task.val_batch_size(),
            sampler=None if streamed_val else ShardSampler(task.val_set, env.world_size, env.rank),
            num_workers=config.workers,
            collate_fn=task.collate_fn,
            pin_memory=use_cuda,
            generator=torch.Generator().manual_seed(config.seed),
            worker_init_fn=ignore_sigint,
        )
        optimizer = create_optimizer(self.module, config)
        upe = self.updates_per_epoch
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=config.sched,
            num_epochs=config.iters / upe if config.iters else config.epochs,
            warmup_epochs=config.warmup_iters / upe if config.warmup_iters is not None else config.warmup_epochs,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
            decay_rate=config.decay_rate,
            decay_milestones=list(config.decay_milestones),
            step_on_epochs=not config.sched_on_updates,
            updates_per_epoch=upe,
        )
        self.parts = TrainParts(
            model=self.forward_model,
            module=self.module,
            optimizer=optimizer,
            scheduler=scheduler,
            forward_backward=task.forward_backward(self.module, self.amp_dtype),
            env=env,
            scaler=torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None,
            ema=self.ema,
            amp_dtype=self.amp_dtype,
            accum_steps=config.accum_steps,
            clip_grad=config.clip_grad,
        )

    def _set_epoch(self, epoch: int, progress: EpochProgress) -> None:
        """Select epoch `epoch`'s samples past those `progress` says were trained on: the sampler's order, or streamed
        shards' (a stream cannot seek: it reads the epoch's order again from its start, passing over those)."""
        config = self.config
        batches = progress.updates * config.accum_steps
        if self.sampler is not None:
            self.sampler.set_epoch(epoch, start=batches * config.batch_size)
            return
        self.task.train_set.set_epoch(epoch, skip_batches=batches, batch_size=config.batch_size)
        if progress.updates and self.env.is_main:
            print(
                f"resuming streamed data in epoch {epoch + 1}: reading its shard order again past the "
                f"{batches * config.batch_size} samples per process already trained on",
                flush=True,
            )

    def _updates_in(self, epoch: int) -> int:
        """Optimizer steps in epoch `epoch` (0-based): all of them, but for an `--iters` run's last one."""
        if not self.config.iters:
            return self.updates_per_epoch
        return min(self.updates_per_epoch, self.config.iters - epoch * self.updates_per_epoch)

    def _restore(self, checkpoint: dict[str, Any] | None) -> None:
        self.start_epoch, self.best, self.elapsed_before = 0, float("-inf"), 0.0
        self.resumed_progress = EpochProgress()
        self.last_metrics: dict[str, Any] = {}
        if checkpoint is None:
            return
        parts = self.parts
        try:
            self.module.load_state_dict(checkpoint["model"])
        except RuntimeError as e:
            first = str(e).splitlines()[1].strip() if "\n" in str(e) else str(e)
            raise UserError(f"the run's weights do not fit {self.config.model} as now configured: {first}") from None
        try:
            parts.optimizer.load_state_dict(checkpoint["optimizer"])
            if parts.scaler is not None and checkpoint.get("scaler"):
                parts.scaler.load_state_dict(checkpoint["scaler"])
        except (KeyError, ValueError, TypeError, RuntimeError) as e:  # a crafted or damaged state: one line
            raise UserError(
                f"the optimizer state of the run being resumed does not fit this run ({describe(e)})"
            ) from None
        # timm's schedules are functions of the config and the step: recomputed, so a longer --epochs reshapes them
        parts.scheduler.step(checkpoint["epoch"])
        parts.scheduler.step_update(num_updates=checkpoint["step"])
        if self.ema is not None:
            if checkpoint.get("ema"):
                self.ema.module.load_state_dict(checkpoint["ema"])
            elif self.env.is_main:
                warn("the run being resumed kept no EMA: starting the EMA from the current weights")
        parts.step = checkpoint["step"]
        self.start_epoch = checkpoint["epoch"]
        self.best = checkpoint.get(f"best_{self.task.metric}", float("-inf"))
        self.elapsed_before = checkpoint.get("elapsed_s", 0.0)
        self.last_metrics = checkpoint.get("metrics") or {}
        self.resumed_progress = EpochProgress(**checkpoint.get("epoch_progress") or {})
        if not self.env.is_main:  # the saved sums are over all ranks; rank 0 carries them
            self.resumed_progress.loss_sum, self.resumed_progress.samples = 0.0, 0
        if self.resumed_progress.updates > self.updates_per_epoch:
            raise UserError("the checkpoint is further into its epoch than this data and batch size allow")
        states = checkpoint["rng"]
        if len(states) == self.env.world_size:
            set_rng_state(states[self.env.rank])
        elif self.env.is_main:
            warn(f"saved by {len(states)} processes, resumed by {self.env.world_size}: random draws will differ")
        # streamed shards are dealt to processes × workers readers: another count deals the epoch another way
        readers, saved = (
            self.env.world_size * max(self.config.workers, 1),
            len(states) * max(checkpoint["config"].get("workers") or 0, 1),
        )
        if self.sampler is None and self.resumed_progress.updates and readers != saved and self.env.is_main:
            warn(
                f"shards resumed mid-epoch by {readers} readers (processes × loader workers), saved by {saved}: the "
                "rest of this epoch is dealt another way, so some of its samples may repeat or be left out"
            )

    # --- the run ---------------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        """Train the remaining epochs; the trackers finish with the run's outcome, also on an error or a stop."""
        with self.tracking:
            return self._fit()

    def _fit(self) -> TrainResult:
        config, env, task = self.config, self.env, self.task
        self.start_time = time.perf_counter()
        if env.is_main:
            self.run.create()
            self.run.keep_metrics_until(self.start_epoch)
            self.tracking.start(self.run.path, config.to_dict(), self.parts.step)
            description = "\n".join([self._describe(), *self.tracking.lines])
            self.run.write_config(config.to_dict(), description)
            print(description, flush=True)
        for epoch in range(self.start_epoch, self.epochs):
            progress = self.resumed_progress if epoch == self.start_epoch else EpochProgress()
            updates = self._updates_in(epoch)
            self._set_epoch(epoch, progress)
            self.generator.manual_seed((config.seed * 1_000_003 + epoch) * 1_009 + env.rank)
            bar = Progress(
                updates,
                progress.updates,
                f"epoch {epoch + 1}/{self.epochs}",
                enabled=env.is_main,
                log_interval=config.log_interval,
            )
            with self._saying_where_to_go_on(), contextlib.closing(bar):
                stopped = train_one_epoch(
                    self.parts,
                    self.train_loader,
                    epoch,
                    updates,
                    progress,
                    bar,
                    should_stop=lambda: env.any(self.signals.received is not None),
                    after_update=lambda loss, epoch=epoch, progress=progress: self._after_update(epoch, progress, loss),
                )
            self._report_unreadable(task.train_set)
            if stopped:
                self._save_last(epoch, progress)
                where = f"in epoch {epoch + 1} at step {progress.updates}/{updates}"
                raise TrainingInterrupted(self._received(), self.run.last, where, task.command)
            self.parts.scheduler.step(epoch + 1)
            with self._saying_where_to_go_on():
                self._end_epoch(epoch, progress)
            if env.any(self.signals.received is not None):
                raise TrainingInterrupted(self._received(), self.run.last, f"after epoch {epoch + 1}", task.command)
        if env.is_main and self.start_epoch >= self.epochs:
            print(f"{self.run.path} already finished its {self.epochs} epochs", flush=True)
        elif env.is_main:
            print(f"best {task.metric_label} {self.best:.2f}%: {self.run.best}", flush=True)
        return TrainResult(self.run.path, self.epochs, task.metric, self.best, self.last_metrics)

    @contextlib.contextmanager
    def _saying_where_to_go_on(self) -> Iterator[None]:
        """A diverged loss or data failing mid-run (a transform, the data folder gone) ends the run in one line that
        says where it can go on from: nothing was written for the failing step."""
        try:
            yield
        except (NonFiniteLoss, DataFailed) as e:
            if self.run.last.exists():
                where = f"{self.run.last} holds the last good state: fix the cause, then continue with --resume auto"
            else:
                where = "no checkpoint was written yet: fix the cause and start the run again"
            raise type(e)(f"{e}; {where}") from None

    def _received(self) -> int:
        return self.signals.received or signal.SIGTERM  # another rank got it: torchrun signals them all

    def _end_epoch(self, epoch: int, progress: EpochProgress) -> None:
        config, env, task = self.config, self.env, self.task
        due = (epoch + 1) % config.eval_interval == 0 or epoch + 1 == self.epochs
        totals = self._over_ranks(progress)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.parts.step,
            "train_loss": totals.loss,
            "lr": current_lr(self.parts.optimizer),
            "images_per_sec": totals.samples / max(progress.seconds, 1e-9),
        }
        if due:
            val = task.evaluate(self.eval_model, self.val_loader, self.amp_dtype)
            record.update({f"val_{k}": v for k, v in val.items()})
            if self.ema is not None:
                ema = task.evaluate(self.ema.module, self.val_loader, self.amp_dtype)
                record.update({f"val_{k}_ema": v for k, v in ema.items()})
            self._report_unreadable(task.val_set)
        record["elapsed_s"] = self._elapsed()
        self.last_metrics = record
        improved = due and record[f"val_{task.metric}"] > self.best
        if improved:
            self.best = record[f"val_{task.metric}"]
        if env.is_main:
            # metrics first: a crash before last.pth is written re-runs the epoch, and resuming drops its line
            self.run.append_metrics(record)
            self.tracking.log_epoch(record)
            if improved:
                save_checkpoint(self._weights(epoch + 1), self.run.best)
        self._save_last(epoch + 1, None)
        if env.is_main:
            print(self._epoch_line(record), flush=True)

    def _epoch_line(self, record: dict[str, Any]) -> str:
        parts = [f"epoch {record['epoch']}/{self.epochs}", f"train_loss {record['train_loss']:.4f}"]
        summary = self.task.epoch_summary(record)
        if summary:
            parts.append(summary)
        rate = f"{record['images_per_sec']:.0f} img/s"
        parts.append(f"lr {record['lr']:.2e} {rate} {format_duration(record['elapsed_s'])}")
        return "  ".join(parts)

    def _after_update(self, epoch: int, progress: EpochProgress, loss: float) -> None:
        """After each optimizer step: its loss to the trackers, and `last.pth` every `save_interval` steps."""
        self.tracking.log_step(self.parts.step, loss, current_lr(self.parts.optimizer))
        interval = self.config.save_interval
        if interval and self.parts.step % interval == 0 and progress.updates < self._updates_in(epoch):
            self._save_last(epoch, progress)

    def _weights(self, epochs_done: int) -> dict[str, Any]:
        """What `best.pth` holds, and the weights part of `last.pth`."""
        task = self.task
        weights = {
            "model": self.module.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": epochs_done,
            "step": self.parts.step,
            "config": self.config.to_dict(),
            "class_names": list(task.class_names),
            "model_name": self.config.model,
            f"best_{task.metric}": self.best,
            "metrics": self.last_metrics,
            "elapsed_s": self._elapsed(),
            **task.checkpoint_extras(),
        }
        if task.name != "classification":  # classification checkpoints keep their original keys
            weights["task"] = task.name
        return weights

    def _save_last(self, epochs_done: int, progress: EpochProgress | None) -> None:
        """Write `last.pth`; `progress` describes a partly done epoch `epochs_done` (0-based), None at an epoch end."""
        states = self.env.gather(rng_state())
        totals = self._over_ranks(progress) if progress is not None else None
        if not self.env.is_main:
            return
        parts = self.parts
        checkpoint = {
            **self._weights(epochs_done),
            "optimizer": parts.optimizer.state_dict(),
            "scaler": parts.scaler.state_dict() if parts.scaler is not None else None,
            "rng": states,
            "epoch_progress": dataclasses.asdict(totals) if totals is not None else None,
            "tracking": self.tracking.ids,
        }
        save_checkpoint(checkpoint, self.run.last)

    def _over_ranks(self, progress: EpochProgress) -> EpochProgress:
        """The epoch's tally with loss and sample counts summed over all ranks."""
        sums = self.env.all_reduce_(torch.tensor([progress.loss_sum, progress.samples], dtype=torch.float64))
        return dataclasses.replace(progress, loss_sum=sums[0].item(), samples=int(sums[1].item()))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _report_unreadable(self, dataset: Any) -> None:
        self.env.all_reduce_(dataset.status, dist.ReduceOp.MAX)
        if not self.env.is_main:
            return
        found = dataset.new_unreadable()
        if found:
            warn(f"skipped {len(found)} unreadable files in {dataset.root}: {listed(found)}")

    def _describe(self) -> str:
        config, env, task = self.config, self.env, self.task
        params = sum(p.numel() for p in self.module.parameters())
        global_batch = config.global_batch(env.world_size)
        head, step = task.describe(self.parts)
        length = f"{config.iters} steps" if config.iters else f"{self.epochs} epochs"
        return (
            f"run {self.run.path}: {config.model} ({params / 1e6:.2f}M params), {head}\n"
            f"global batch {global_batch} = {config.batch_size} per process × {env.world_size} process(es) × "
            f"{config.accum_steps} accumulation step(s); lr {config.lr:g} {self.lr_rule}\n"
            f"{self.updates_per_epoch} steps per epoch, {length}, device {env.device}, "
            f"amp {self.amp_dtype or 'none'}\n"
            f"step: {step}"
        )


def _default_output(config: RunConfig, default_data: str) -> str:
    data = data_label(config.data) if config.data else default_data
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.model.removeprefix('mambaout_')}-{data}-{stamp}")
