"""A whole training run: data, model, the paper's recipe from timm's parts, epochs, checkpoints, records.

`prepare_run` turns a recipe, flags and `--resume` into a config (and the checkpoint to continue from); `train` runs
it, on one process or under `torchrun` with DistributedDataParallel. Only rank 0 prints and writes.

Never losing a run: `last.pth` is replaced atomically after every epoch (and every `save_interval` steps); SIGINT
and SIGTERM finish the current optimizer step, save a resumable `last.pth` and raise `TrainingInterrupted`; a NaN or
infinite loss raises `NonFiniteLoss` before anything is written. `--resume auto` picks `last.pth` up: at an epoch
end, or mid-epoch with the same samples still to come (and the same random draws when `workers` is 0).
"""

import dataclasses
import signal
import sys
import threading
import time
import warnings
from datetime import datetime
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.optim import create_optimizer_v2, optimizer_kwargs
from timm.scheduler import create_scheduler_v2
from timm.utils import ModelEmaV3, random_seed
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader

from mambaout.data import ResumableSampler, RobustImageFolder, ShardSampler, TransformFailed, digits_tree
from mambaout.data.transforms import data_config, eval_transform, train_transform
from mambaout.errors import UserError, describe
from mambaout.fast.train_step import auto_train_micro_batch
from mambaout.models import get_pretrained_cfg, get_spec
from mambaout.models.settings import check_activation_memory, create_configured_model
from mambaout.train.checkpoint import read_checkpoint, rng_state, save_checkpoint, set_rng_state
from mambaout.train.config import CONFIG_DIR, TrainConfig, build_config, flag, load_config_file
from mambaout.train.distributed import DistEnv, init_distributed
from mambaout.train.engine import (
    EpochProgress,
    NonFiniteLoss,
    TrainParts,
    current_lr,
    evaluate,
    resolve_amp,
    train_one_epoch,
)
from mambaout.train.progress import Progress, format_duration
from mambaout.train.rundir import RunDir
from mambaout.weights import load_pretrained

__all__ = ["TrainResult", "TrainingInterrupted", "default_recipe", "prepare_run", "train"]

_SHOW_UNREADABLE = 10  # files listed by name in the once-per-dataset report


class TrainingInterrupted(Exception):
    """SIGINT or SIGTERM stopped the run after saving `checkpoint`."""

    def __init__(self, signum: int, checkpoint: Path, where: str):
        self.signum, self.checkpoint = signum, checkpoint
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} received {where}: saved {checkpoint}; continue with "
            f"`mambaout train --output {checkpoint.parent} --resume auto`"
        )


@dataclasses.dataclass
class TrainResult:
    """Where the run is and how it ended."""

    run_dir: Path
    epochs: int
    best_top1: float
    metrics: dict[str, Any]


def default_recipe(model: str, has_data: bool) -> str | None:
    """The recipe used without --config: `digits_cpu` for the embedded default, else `<variant>_in1k` if any."""
    if not has_data:
        return "digits_cpu"
    name = f"{model.removeprefix('mambaout_')}_in1k"
    return name if (CONFIG_DIR / f"{name}.yaml").is_file() else None


# Settings a resumed run cannot change: its weights and optimizer state were made under them (PyTorch's optimizer
# restores its saved hyperparameters, so a changed value would be ignored, or crash on another optimizer's state).
# The learning-rate schedule (lr, warm-up, epochs, ...) may change: it is recomputed from the config at the saved step.
FROZEN_ON_RESUME = (
    "model", "model_kwargs", "num_classes", "opt", "opt_eps", "opt_betas", "momentum", "weight_decay", "layer_decay",
    "batch_size", "accum_steps", "fused_optimizer",
)  # fmt: skip
_RESUME_KEYS = ("model", "optimizer", "epoch", "step", "rng", "config", "class_names")


def prepare_run(
    config_file: str | None, overrides: dict[str, Any], resume: str | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """The run's config and, when resuming, the checkpoint to continue from; nothing is written.

    Args:
        config_file: `--config` (path or recipe name); default `default_recipe`. Ignored when resuming: a resumed
            run keeps its saved config, changed only by `overrides` of settings outside `FROZEN_ON_RESUME`.
        overrides: Config values given as flags. When `epochs` is given without `warmup_epochs`, the recipe's
            warm-up keeps its share of the schedule (20 of 300 epochs: 2 of 30).
        resume: None, "auto" (`<output>/last.pth`; a new run when `<output>` holds no run at all), or a checkpoint
            file or run folder.

    Raises:
        UserError: Bad settings, a run folder with no resumable checkpoint, a damaged checkpoint, or a change to a
            setting that cannot change on resume.
    """
    checkpoint, path = None, None
    if resume == "auto":
        if not overrides.get("output"):
            raise UserError("--resume auto needs --output RUN_DIR (the run to continue, or to start)")
        run = RunDir(overrides["output"])
        if run.last.exists():
            path = run.last
        elif run.holds_run():
            present = ", ".join(p.name for p in run.files if p.exists())
            raise UserError(
                f"--resume auto: {run.path} holds a run ({present}) but no last.pth to continue from: give a "
                "checkpoint with --resume PATH, or start a new run with another --output"
            )
    elif resume:
        path = Path(resume).expanduser()
        path = RunDir(path).last if path.is_dir() else path
        if not path.exists():
            raise UserError(f"--resume: no checkpoint at {path}")
        overrides = {"output": str(path.parent), **overrides}
    if path is not None:
        checkpoint = _read_resumable(path)
        return _resumed_config(checkpoint, overrides, path), checkpoint
    model = str(overrides.get("model", TrainConfig.model))
    name = config_file or default_recipe(model, bool(overrides.get("data")))
    recipe = load_config_file(name) if name else {}
    if "epochs" in overrides and "warmup_epochs" not in overrides:
        overrides = {**overrides, "warmup_epochs": _scaled_warmup(recipe, overrides["epochs"])}
    return build_config(None, recipe, overrides), None


def _scaled_warmup(recipe: dict[str, Any], epochs: Any) -> Any:
    """The recipe's warm-up scaled to `epochs`, keeping its share of the schedule; printed, as it is a choice."""
    base = build_config(None, recipe)
    try:
        wanted = int(epochs)
    except (TypeError, ValueError):
        return base.warmup_epochs  # a bad --epochs gets its own message from the config
    if wanted == base.epochs or wanted < 1:
        return base.warmup_epochs
    scaled = base.warmup_epochs * wanted / base.epochs
    print(
        f"--warmup-epochs {scaled:.3g}: the recipe's {base.warmup_epochs:g} of {base.epochs} epochs, kept in "
        f"proportion for --epochs {wanted} (pass --warmup-epochs to choose)",
        flush=True,
    )
    return scaled


def _read_resumable(path: Path) -> dict[str, Any]:
    """A `last.pth` that holds all a resumed run needs; a damaged one is refused, offering `best.pth` if it reads."""
    try:
        checkpoint = read_checkpoint(path)
    except UserError as e:
        raise UserError(f"--resume: {e}{_best_fallback(path)}") from None
    if checkpoint.get("optimizer") is None:
        raise UserError(
            f"--resume: {path} holds weights only (a best.pth?): resume from last.pth, or start a new run from "
            "these weights with --pretrained"
        )
    missing = [k for k in _RESUME_KEYS if k not in checkpoint]
    optimizer = checkpoint["optimizer"]
    if not isinstance(optimizer, dict) or not {"state", "param_groups"} <= optimizer.keys():
        missing.append("the optimizer's state and param_groups")
    if missing:
        raise UserError(
            f"--resume: {path} lacks what a resumed run needs ({', '.join(missing)}); it was not written by "
            f"`mambaout train` or is damaged{_best_fallback(path)}"
        )
    return checkpoint


def _best_fallback(last: Path) -> str:
    """The message's way out when `last` cannot be resumed: `best.pth` beside it, when it reads."""
    best = RunDir(last.parent).best
    if best == last or not best.exists():
        return ""
    try:
        saved = read_checkpoint(best)
    except UserError:
        return ""
    return (
        f"; {best} (epoch {saved.get('epoch', '?')}, val top-1 {saved.get('best_top1', float('nan')):.2f}%) reads: "
        f"continue from its weights in a new run with --pretrained {best} --output NEW_DIR"
    )


def _resumed_config(checkpoint: dict[str, Any], overrides: dict[str, Any], path: Path) -> TrainConfig:
    """The saved config with `overrides`, after checking that none changes a setting frozen on resume."""
    try:
        saved = build_config(checkpoint["config"])
    except UserError as e:
        raise UserError(f"--resume: {path} holds a config this version rejects: {e}") from None
    requested = build_config(checkpoint["config"], overrides)
    changed = [f.name for f in dataclasses.fields(TrainConfig) if getattr(saved, f.name) != getattr(requested, f.name)]
    frozen = [k for k in changed if k in FROZEN_ON_RESUME]
    if frozen:
        raise UserError(
            f"--resume: {path} was trained with other settings that cannot change when resuming "
            f"({_changes(saved, requested, frozen)}): drop those flags, or start a new run from its weights with "
            f"--pretrained {path} --output NEW_DIR"
        )
    if changed:
        print(f"resuming with changed settings: {_changes(saved, requested, changed)}", flush=True)
    return requested


def _changes(saved: TrainConfig, requested: TrainConfig, keys: list[str]) -> str:
    return "; ".join(f"{flag(k)} {getattr(saved, k)!r} -> {getattr(requested, k)!r}" for k in keys)


class _StopSignals:
    """SIGINT/SIGTERM set `received` instead of killing the process; the same signal again acts at once."""

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "_StopSignals":
        if threading.current_thread() is threading.main_thread():
            for signum in (signal.SIGINT, signal.SIGTERM):
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        self.received = signum
        signal.signal(signum, self._previous[signum])

    def __exit__(self, *exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)


def _ignore_sigint(worker_id: int) -> None:
    # a terminal's Ctrl-C reaches loader workers too; the training process alone decides how to stop
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def train(config: TrainConfig, checkpoint: dict[str, Any] | None = None) -> TrainResult:
    """Run training to `config.epochs`, continuing `checkpoint` when given.

    Args:
        config: From `prepare_run` (or built directly).
        checkpoint: A `last.pth` to continue from (`prepare_run` checked it); without one, `config.output` must not
            hold a run yet.

    Raises:
        UserError: Bad data, model or settings; NonFiniteLoss for a diverged run.
        TrainingInterrupted: SIGINT/SIGTERM, after saving.
    """
    env = init_distributed(config.device)
    try:
        with _StopSignals() as signals:
            return _Trainer(config, env, checkpoint, signals).fit()
    finally:
        env.shutdown()


class _Trainer:
    """One run's state; `fit` drives the epochs."""

    def __init__(
        self,
        config: TrainConfig,
        env: DistEnv,
        checkpoint: dict[str, Any] | None,
        signals: _StopSignals,
    ):
        self.env, self.signals = env, signals
        if config.threads:
            torch.set_num_threads(config.threads)
        random_seed(config.seed, env.rank)
        torch.use_deterministic_algorithms(config.deterministic, warn_only=True)
        torch.backends.cudnn.benchmark = not config.deterministic
        self.run = RunDir(env.broadcast(config.output or _default_output(config)))
        if checkpoint is None and self.run.holds_run():
            raise UserError(
                f"{self.run.path} already holds a run: continue it with --resume auto, or pick another --output"
            )
        self._build_data(config, checkpoint)
        self._build_model(config, checkpoint)
        self._build_optimization()
        pieces = min(self.parts.micro_batch or config.batch_size, config.batch_size)
        check_activation_memory(self.module, pieces, self.config.input_size, env.device, training=True)
        self._restore(checkpoint)

    # --- set-up ----------------------------------------------------------------------------------------------------

    def _build_data(self, config: TrainConfig, checkpoint: dict[str, Any] | None) -> None:
        root = Path(config.data).expanduser() if config.data else digits_tree()
        for split in ("train", "val"):
            if not (root / split).is_dir():
                raise UserError(f"--data {root}: no {split}/ folder (expected {root}/train/<class>/<images> and val/)")
        self.train_set = RobustImageFolder(root / "train", substitute=True)
        self.val_set = RobustImageFolder(root / "val", classes=self.train_set.classes, substitute=False)
        self.class_names = self.train_set.classes
        if checkpoint is not None and checkpoint.get("class_names") != self.class_names:
            raise UserError(f"the classes in {root}/train differ from those of the run being resumed")
        if config.num_classes is not None and config.num_classes != len(self.class_names):
            raise UserError(
                f"--num-classes {config.num_classes} does not match the {len(self.class_names)} class folders "
                f"in {root}/train"
            )
        self.data_root = root
        if self.env.is_main:
            for dataset in (self.train_set, self.val_set):
                if dataset.ignored_files:
                    _warn(f"ignored {len(dataset.ignored_files)} files without an image extension in {dataset.root}")
                links = dataset.skipped_links
                if links:
                    _warn(f"skipped {len(links)} links in {dataset.root}: {_listed(links)}")
            if self.train_set.empty_classes:
                _warn(f"classes without training images: {', '.join(self.train_set.empty_classes[:10])}")
            if self.val_set.empty_classes:
                _warn(f"{len(self.val_set.empty_classes)} classes have no validation images")

    def _build_model(self, config: TrainConfig, checkpoint: dict[str, Any] | None) -> None:
        env = self.env
        model = create_configured_model(
            config.model,
            config.model_kwargs,
            flag("model_kwargs"),
            num_classes=len(self.class_names),
            drop_path_rate=config.drop_path,
            drop_rate=config.drop,
        )
        if config.pretrained and checkpoint is None:
            try:
                cfg = get_pretrained_cfg(config.model)  # the tag's sources for a `name.tag` model
                load_pretrained(model, get_spec(config.model), config.pretrained, cfg=cfg)
            except UserError as e:
                raise UserError(f"--pretrained {config.pretrained}: {e}") from None
        data = data_config(
            model, config.input_size, config.eval_crop_pct, config.interpolation, config.mean, config.std
        )
        global_batch = config.global_batch(env.world_size)
        self.lr_rule = (
            "(set by lr)" if config.lr is not None else f"= base_lr {config.base_lr:g} × {global_batch} / 1024"
        )
        self.config = config = dataclasses.replace(
            config,
            num_classes=len(self.class_names),
            output=str(self.run.path),
            lr=config.resolved_lr(env.world_size),
            input_size=data["input_size"][-1],
            eval_crop_pct=data["crop_pct"],
            interpolation=data["interpolation"],
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
        )
        if config.min_lr > config.lr and env.is_main:
            _warn(
                f"--min-lr {config.min_lr:g} is above the resolved lr {config.lr:g}: the schedule will rise, not decay"
            )
        self.train_set.transform = train_transform(
            data,
            scale=config.scale,
            ratio=config.ratio,
            hflip=config.hflip,
            vflip=config.vflip,
            color_jitter=config.color_jitter,
            auto_augment=config.auto_augment,
            interpolation=config.train_interpolation,
            re_prob=config.re_prob,
            re_mode=config.re_mode,
            re_count=config.re_count,
        )
        self.val_set.transform = eval_transform(data)

        model.to(env.device)
        if config.channels_last:
            model.to(memory_format=torch.channels_last)
        model.set_grad_checkpointing(config.grad_checkpointing)
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
        config, env = self.config, self.env
        self.sampler = ResumableSampler(self.train_set, env.world_size, env.rank, seed=config.seed)
        self.updates_per_epoch = len(self.sampler) // (config.batch_size * config.accum_steps)
        if self.updates_per_epoch == 0:
            raise UserError(
                f"{self.train_set.root} has {len(self.sampler)} images per process, fewer than one optimizer step "
                f"takes ({config.batch_size} × {config.accum_steps} accumulation steps): lower --batch-size"
            )
        use_cuda = env.device.type == "cuda"
        self.generator = torch.Generator()
        self.train_loader = DataLoader(
            self.train_set,
            batch_size=config.batch_size,
            sampler=self.sampler,
            num_workers=config.workers,
            pin_memory=use_cuda,
            drop_last=True,
            generator=self.generator,
            worker_init_fn=_ignore_sigint,
        )
        self.val_loader = DataLoader(
            self.val_set,
            batch_size=config.batch_size,
            sampler=ShardSampler(self.val_set, env.world_size, env.rank),
            num_workers=config.workers,
            pin_memory=use_cuda,
            generator=torch.Generator().manual_seed(config.seed),
            worker_init_fn=_ignore_sigint,
        )
        optimizer = _create_optimizer(self.module, config)
        scheduler, _ = create_scheduler_v2(
            optimizer,
            sched=config.sched,
            num_epochs=config.epochs,
            warmup_epochs=config.warmup_epochs,
            warmup_lr=config.warmup_lr,
            min_lr=config.min_lr,
            step_on_epochs=not config.sched_on_updates,
            updates_per_epoch=self.updates_per_epoch,
        )
        if config.mixup_active:
            mixup = Mixup(
                mixup_alpha=config.mixup,
                cutmix_alpha=config.cutmix,
                prob=config.mixup_prob,
                switch_prob=config.mixup_switch_prob,
                mode=config.mixup_mode,
                label_smoothing=config.smoothing,
                num_classes=len(self.class_names),
            )
            criterion: nn.Module = SoftTargetCrossEntropy()
        else:
            mixup = None
            criterion = LabelSmoothingCrossEntropy(config.smoothing) if config.smoothing else nn.CrossEntropyLoss()
        self.parts = TrainParts(
            model=self.forward_model,
            module=self.module,
            optimizer=optimizer,
            scheduler=scheduler,
            criterion=criterion.to(env.device),
            env=env,
            mixup=mixup,
            scaler=torch.amp.GradScaler("cuda") if self.amp_dtype == torch.float16 else None,
            ema=self.ema,
            amp_dtype=self.amp_dtype,
            accum_steps=config.accum_steps,
            clip_grad=config.clip_grad,
            channels_last=config.channels_last,
            micro_batch=self._micro_batch(),
            split_linears=config.split_linears == "on"
            or (config.split_linears == "auto" and env.device.type == "cpu" and not config.compile),
        )

    def _micro_batch(self) -> int | None:
        """Images per forward/backward pass: the config's, else cache-sized on the CPU and the whole batch on a GPU."""
        config = self.config
        if config.micro_batch is not None or self.env.device.type != "cpu":
            return config.micro_batch
        size = (config.input_size, config.input_size)
        return auto_train_micro_batch(self.module, size, self.amp_dtype or torch.float32)

    def _restore(self, checkpoint: dict[str, Any] | None) -> None:
        self.start_epoch, self.best_top1, self.elapsed_before = 0, float("-inf"), 0.0
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
                _warn("the run being resumed kept no EMA: starting the EMA from the current weights")
        parts.step = checkpoint["step"]
        self.start_epoch = checkpoint["epoch"]
        self.best_top1 = checkpoint.get("best_top1", float("-inf"))
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
            _warn(f"saved by {len(states)} processes, resumed by {self.env.world_size}: random draws will differ")

    # --- the run ---------------------------------------------------------------------------------------------------

    def fit(self) -> TrainResult:
        config, env = self.config, self.env
        self.start_time = time.perf_counter()
        if env.is_main:
            self.run.create()
            self.run.keep_metrics_until(self.start_epoch)
            description = self._describe()
            self.run.write_config(config.to_dict(), description)
            print(description, flush=True)
        for epoch in range(self.start_epoch, config.epochs):
            progress = self.resumed_progress if epoch == self.start_epoch else EpochProgress()
            self.sampler.set_epoch(epoch, start=progress.updates * config.accum_steps * config.batch_size)
            self.generator.manual_seed((config.seed * 1_000_003 + epoch) * 1_009 + env.rank)
            bar = Progress(
                self.updates_per_epoch,
                progress.updates,
                f"epoch {epoch + 1}/{config.epochs}",
                enabled=env.is_main,
                log_interval=config.log_interval,
            )
            try:
                stopped = train_one_epoch(
                    self.parts,
                    self.train_loader,
                    epoch,
                    self.updates_per_epoch,
                    progress,
                    bar,
                    should_stop=lambda: env.any(self.signals.received is not None),
                    after_update=lambda epoch=epoch, progress=progress: self._periodic_save(epoch, progress),
                )
            except (NonFiniteLoss, TransformFailed) as e:
                raise type(e)(f"{e}; {self._last_good_state()}") from None
            finally:
                bar.close()
            self._report_unreadable(self.train_set)
            if stopped:
                self._save_last(epoch, progress)
                where = f"in epoch {epoch + 1} at step {progress.updates}/{self.updates_per_epoch}"
                raise TrainingInterrupted(self._received(), self.run.last, where)
            self.parts.scheduler.step(epoch + 1)
            self._end_epoch(epoch, progress)
            if env.any(self.signals.received is not None):
                raise TrainingInterrupted(self._received(), self.run.last, f"after epoch {epoch + 1}")
        if env.is_main and self.start_epoch >= config.epochs:
            print(f"{self.run.path} already finished its {config.epochs} epochs", flush=True)
        elif env.is_main:
            print(f"best val top-1 {self.best_top1:.2f}%: {self.run.best}", flush=True)
        return TrainResult(self.run.path, config.epochs, self.best_top1, self.last_metrics)

    def _last_good_state(self) -> str:
        """Where a run that stopped on an error can go on from: nothing was written for the failing step."""
        if self.run.last.exists():
            return f"{self.run.last} holds the last good state: fix the cause, then continue with --resume auto"
        return "no checkpoint was written yet: fix the cause and start the run again"

    def _received(self) -> int:
        return self.signals.received or signal.SIGTERM  # another rank got it: torchrun signals them all

    def _end_epoch(self, epoch: int, progress: EpochProgress) -> None:
        config, env = self.config, self.env
        due = (epoch + 1) % config.eval_interval == 0 or epoch + 1 == config.epochs
        totals = self._over_ranks(progress)
        record: dict[str, Any] = {
            "epoch": epoch + 1,
            "step": self.parts.step,
            "train_loss": totals.loss,
            "lr": current_lr(self.parts.optimizer),
            "images_per_sec": totals.samples / max(progress.seconds, 1e-9),
        }
        if due:
            val = evaluate(self.eval_model, self.val_loader, env, self.amp_dtype, config.channels_last)
            record.update(val_loss=val["loss"], val_top1=val["top1"], val_top5=val["top5"])
            if self.ema is not None:
                ema = evaluate(self.ema.module, self.val_loader, env, self.amp_dtype, config.channels_last)
                record.update(val_loss_ema=ema["loss"], val_top1_ema=ema["top1"], val_top5_ema=ema["top5"])
            self._report_unreadable(self.val_set)
        record["elapsed_s"] = self._elapsed()
        self.last_metrics = record
        improved = due and record["val_top1"] > self.best_top1
        if improved:
            self.best_top1 = record["val_top1"]
        if env.is_main:
            # metrics first: a crash before last.pth is written re-runs the epoch, and resuming drops its line
            self.run.append_metrics(record)
            if improved:
                save_checkpoint(self._weights(epoch + 1), self.run.best)
        self._save_last(epoch + 1, None)
        if env.is_main:
            print(_epoch_line(record, config.epochs), flush=True)

    def _periodic_save(self, epoch: int, progress: EpochProgress) -> None:
        interval = self.config.save_interval
        if interval and self.parts.step % interval == 0 and progress.updates < self.updates_per_epoch:
            self._save_last(epoch, progress)

    def _weights(self, epochs_done: int) -> dict[str, Any]:
        """What `best.pth` holds, and the weights part of `last.pth`."""
        return {
            "model": self.module.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "epoch": epochs_done,
            "step": self.parts.step,
            "config": self.config.to_dict(),
            "class_names": list(self.class_names),
            "model_name": self.config.model,
            "best_top1": self.best_top1,
            "metrics": self.last_metrics,
            "elapsed_s": self._elapsed(),
        }

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
        }
        save_checkpoint(checkpoint, self.run.last)

    def _over_ranks(self, progress: EpochProgress) -> EpochProgress:
        """The epoch's tally with loss and sample counts summed over all ranks."""
        sums = self.env.all_reduce_(torch.tensor([progress.loss_sum, progress.samples], dtype=torch.float64))
        return dataclasses.replace(progress, loss_sum=sums[0].item(), samples=int(sums[1].item()))

    def _elapsed(self) -> float:
        return self.elapsed_before + time.perf_counter() - self.start_time

    def _report_unreadable(self, dataset: RobustImageFolder) -> None:
        self.env.all_reduce_(dataset.status, dist.ReduceOp.MAX)
        if not self.env.is_main:
            return
        found = dataset.new_unreadable()
        if found:
            _warn(f"skipped {len(found)} unreadable files in {dataset.root}: {_listed(found)}")

    def _describe(self) -> str:
        config, env = self.config, self.env
        params = sum(p.numel() for p in self.module.parameters())
        global_batch = config.global_batch(env.world_size)
        parts = self.parts
        fused = any(group.get("fused") for group in parts.optimizer.param_groups)
        return (
            f"run {self.run.path}: {config.model} ({params / 1e6:.2f}M params), {len(self.class_names)} classes, "
            f"{len(self.train_set)} train / {len(self.val_set)} val images from {self.data_root}\n"
            f"global batch {global_batch} = {config.batch_size} per process × {env.world_size} process(es) × "
            f"{config.accum_steps} accumulation step(s); lr {config.lr:g} {self.lr_rule}\n"
            f"{self.updates_per_epoch} steps per epoch, {config.epochs} epochs, device {env.device}, "
            f"amp {self.amp_dtype or 'none'}\n"
            f"step: {'fused' if fused else 'plain'} {config.opt} update, forward/backward in pieces of "
            f"{min(parts.micro_batch or config.batch_size, config.batch_size)} images, "
            f"split linears {'on' if parts.split_linears else 'off'}"
        )


def _default_output(config: TrainConfig) -> str:
    data = Path(config.data).expanduser().resolve().name if config.data else "digits"
    stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
    return str(Path("runs") / f"{config.model.removeprefix('mambaout_')}-{data}-{stamp}")


def _epoch_line(record: dict[str, Any], epochs: int) -> str:
    parts = [f"epoch {record['epoch']}/{epochs}", f"train_loss {record['train_loss']:.4f}"]
    if "val_top1" in record:
        parts.append(f"val_loss {record['val_loss']:.4f} top1 {record['val_top1']:.2f} top5 {record['val_top5']:.2f}")
    if "val_top1_ema" in record:
        parts.append(f"ema top1 {record['val_top1_ema']:.2f}")
    parts.append(f"lr {record['lr']:.2e} {record['images_per_sec']:.0f} img/s {format_duration(record['elapsed_s'])}")
    return "  ".join(parts)


def _listed(items: list[tuple[str, str]]) -> str:
    """`a (why); b (why); and M more` for a warning: the first `_SHOW_UNREADABLE` (path, reason) pairs by name."""
    shown = "; ".join(f"{path} ({reason})" for path, reason in items[:_SHOW_UNREADABLE])
    more = f"; and {len(items) - _SHOW_UNREADABLE} more" if len(items) > _SHOW_UNREADABLE else ""
    return shown + more


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr, flush=True)


def _create_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """timm's optimizer for the config, with PyTorch's fused step when asked for and this optimizer and device have it.

    The fused step computes the same update in one kernel per parameter group (AdamW on the CPU: ~3× faster).
    """
    kwargs = optimizer_kwargs(config)
    if config.fused_optimizer:
        try:
            return create_optimizer_v2(model, **kwargs, fused=True)
        except (TypeError, RuntimeError, ValueError):  # no `fused` argument, or no fused kernel for this device
            pass
    return create_optimizer_v2(model, **kwargs)
