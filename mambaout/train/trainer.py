"""Classification training: the task the one engine (`mambaout.train.runner`) runs for `mambaout train`.

`Classification` supplies an ImageFolder tree (the bundled digits without --data; or WebDataset shards or a Hugging
Face dataset, `wds:`/`hfds:`, `mambaout.data.named.source_splits`), a MambaOut classifier, the
paper's recipe from timm's parts (RandAugment, mixup/cutmix, label smoothing, random erasing) and top-1/top-5;
`prepare_run` and `train` are the engine's (`mambaout.train.prepare`, `mambaout.train.runner`), for this task. See
`mambaout.train.runner` for what a run guarantees (atomic checkpoints, exact resume, SIGTERM and NaN handling).
"""

import dataclasses
from typing import Any

import torch
from timm.data import Mixup
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from torch import nn
from torch.utils.data import DataLoader

from mambaout.data import (
    RobustImageFolder,
    digits_tree,
    parse_data_name,
    parse_source_name,
    resolve_data,
    source_splits,
)
from mambaout.data.transforms import data_config, eval_transform, train_transform
from mambaout.errors import UserError
from mambaout.fast.train_step import auto_train_micro_batch
from mambaout.models import get_pretrained_cfg, get_spec, load_pretrained
from mambaout.models.settings import check_activation_memory, create_configured_model
from mambaout.train.config import CONFIG_DIR, TrainConfig, flag
from mambaout.train.engine import ClassificationStep, TrainParts, evaluate
from mambaout.train.notices import listed, warn
from mambaout.train.optim import fused_step_name
from mambaout.train.prepare import prepare_run as prepare_task_run
from mambaout.train.runner import run_training
from mambaout.train.signals import TrainingInterrupted
from mambaout.train.task import Task, TrainResult

__all__ = [
    "FROZEN_ON_RESUME",
    "Classification",
    "TrainResult",
    "TrainingInterrupted",
    "default_recipe",
    "prepare_run",
    "train",
]


def default_recipe(model: str, data: str | None) -> str | None:
    """The recipe used without --config: `digits_cpu` for the embedded default, `pathfinder_cpu` for a Pathfinder
    name, else `<variant>_in1k` if any."""
    if not data:
        return "digits_cpu"
    if parse_data_name(data) is not None:
        return "pathfinder_cpu"
    name = f"{model.removeprefix('mambaout_')}_in1k"
    return name if (CONFIG_DIR / f"{name}.yaml").is_file() else None


# Settings a resumed run cannot change (see `Task.frozen_on_resume`).
FROZEN_ON_RESUME = (
    "model", "model_kwargs", "num_classes", "opt", "opt_eps", "opt_betas", "momentum", "weight_decay", "layer_decay",
    "batch_size", "accum_steps", "fused_optimizer",
)  # fmt: skip


class Classification(Task):
    """An ImageFolder tree, a MambaOut classifier, the paper's ImageNet recipe, top-1/top-5."""

    name = "classification"
    command = "mambaout train"
    config_class = TrainConfig
    frozen_on_resume = FROZEN_ON_RESUME
    metric = "top1"
    metric_label = "val top-1"
    default_data = "digits"
    config: TrainConfig

    @classmethod
    def default_recipe(cls, model: str, data: str | None) -> str | None:
        return default_recipe(model, data)

    def build_data(self, checkpoint: dict[str, Any] | None) -> None:
        config, env = self.config, self.env
        source = parse_source_name(config.data)
        if source is not None:
            self.train_set, self.val_set = source_splits(source, config.seed, env.rank, env.world_size, config.workers)
            self.data_root, found = source.data, f"classes of {source.data}"
        else:
            root = resolve_data(config.data, "classification", digits_tree)
            for split in ("train", "val"):
                if not (root / split).is_dir():
                    raise UserError(
                        f"--data {root}: no {split}/ folder (expected {root}/train/<class>/<images> and val/)"
                    )
            self.train_set = RobustImageFolder(root / "train", substitute=True)
            self.val_set = RobustImageFolder(root / "val", classes=self.train_set.classes, substitute=False)
            self.data_root, found = root, f"class folders in {root}/train"
        self.class_names = list(self.train_set.classes)
        if checkpoint is not None and checkpoint.get("class_names") != self.class_names:
            raise UserError(f"the {found} differ from the classes of the run being resumed")
        if config.num_classes is not None and config.num_classes != len(self.class_names):
            raise UserError(f"--num-classes {config.num_classes} does not match the {len(self.class_names)} {found}")

    def warn_about_data(self) -> None:
        if not isinstance(self.train_set, RobustImageFolder):  # shards and datasets skip no files when listed
            return
        for dataset in (self.train_set, self.val_set):
            if dataset.ignored_files:
                warn(f"ignored {len(dataset.ignored_files)} files without an image extension in {dataset.root}")
            links = dataset.skipped_links
            if links:
                warn(f"skipped {len(links)} links in {dataset.root}: {listed(links)}")
        if self.train_set.empty_classes:
            warn(f"classes without training images: {', '.join(self.train_set.empty_classes[:10])}")
        if self.val_set.empty_classes:
            warn(f"{len(self.val_set.empty_classes)} classes have no validation images")

    def build_model(self, pretrained: bool) -> nn.Module:
        config = self.config
        model = create_configured_model(
            config.model,
            config.model_kwargs,
            flag("model_kwargs"),
            num_classes=len(self.class_names),
            drop_path_rate=config.drop_path,
            drop_rate=config.drop,
        )
        if pretrained:
            try:
                cfg = get_pretrained_cfg(config.model)  # the tag's sources for a `name.tag` model
                load_pretrained(model, get_spec(config.model), config.pretrained, cfg=cfg)
            except UserError as e:
                raise UserError(f"--pretrained {config.pretrained}: {e}") from None
        data = data_config(
            model, config.input_size, config.eval_crop_pct, config.interpolation, config.mean, config.std
        )
        self.config = config = dataclasses.replace(
            config,
            num_classes=len(self.class_names),
            input_size=data["input_size"][-1],
            eval_crop_pct=data["crop_pct"],
            interpolation=data["interpolation"],
            mean=tuple(data["mean"]),
            std=tuple(data["std"]),
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
        model.set_grad_checkpointing(config.grad_checkpointing)
        return model

    def forward_backward(self, module: nn.Module, amp_dtype: torch.dtype | None) -> ClassificationStep:
        config = self.config
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
        on_cpu = self.env.device.type == "cpu"
        micro_batch = config.micro_batch
        if micro_batch is None and on_cpu:  # cache-sized on the CPU, the whole batch on a GPU
            size = (config.input_size, config.input_size)
            micro_batch = auto_train_micro_batch(module, size, amp_dtype or torch.float32)
        return ClassificationStep(
            criterion=criterion.to(self.env.device),
            mixup=mixup,
            channels_last=config.channels_last,
            micro_batch=micro_batch,
            split_linears=config.split_linears == "on"
            or (config.split_linears == "auto" and on_cpu and not config.compile),
        )

    def _pieces(self, step: ClassificationStep) -> int:
        return min(step.micro_batch or self.config.batch_size, self.config.batch_size)

    def check_memory(self, parts: TrainParts) -> None:
        pieces = self._pieces(parts.forward_backward)
        check_activation_memory(parts.module, pieces, self.config.input_size, self.env.device, training=True)

    def evaluate(self, model: nn.Module, loader: DataLoader, amp_dtype: torch.dtype | None) -> dict[str, float]:
        val = evaluate(model, loader, self.env, amp_dtype, self.config.channels_last)
        return {"loss": val["loss"], "top1": val["top1"], "top5": val["top5"]}

    def epoch_summary(self, record: dict[str, Any]) -> str:
        if "val_top1" not in record:
            return ""
        text = f"val_loss {record['val_loss']:.4f} top1 {record['val_top1']:.2f} top5 {record['val_top5']:.2f}"
        if "val_top1_ema" in record:
            text += f"  ema top1 {record['val_top1_ema']:.2f}"
        return text

    def describe(self, parts: TrainParts) -> tuple[str, str]:
        step = parts.forward_backward
        head = (
            f"{len(self.class_names)} classes, {len(self.train_set)} train / {len(self.val_set)} val images from "
            f"{self.data_root}"
        )
        how = (
            f"{fused_step_name(parts.optimizer, self.config)} update, forward/backward in pieces of "
            f"{self._pieces(step)} images, split linears {'on' if step.split_linears else 'off'}"
        )
        return head, how


def prepare_run(
    config_file: str | None, overrides: dict[str, Any], resume: str | None
) -> tuple[TrainConfig, dict[str, Any] | None]:
    """A classification run's config and, when resuming, its checkpoint (`mambaout.train.prepare.prepare_run`)."""
    return prepare_task_run(Classification, config_file, overrides, resume)


def train(config: TrainConfig, checkpoint: dict[str, Any] | None = None) -> TrainResult:
    """Run classification training to `config.epochs`, continuing `checkpoint` (`runner.run_training`).

    Raises:
        UserError: Bad data, model or settings; NonFiniteLoss for a diverged run.
        TrainingInterrupted: SIGINT/SIGTERM, after saving.
    """
    return run_training(Classification, config, checkpoint)
