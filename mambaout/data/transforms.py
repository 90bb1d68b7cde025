"""Image transforms, built by timm's `create_transform` from the model's `pretrained_cfg` and the run's settings."""

from collections.abc import Callable
from typing import Any

from timm.data import create_transform, resolve_data_config
from torch import nn

__all__ = ["data_config", "eval_transform", "train_transform"]


def data_config(
    model: nn.Module,
    input_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    mean: tuple[float, float, float] | None = None,
    std: tuple[float, float, float] | None = None,
) -> dict[str, Any]:
    """The model's evaluation preprocessing (timm's `resolve_data_config`), with any value given here overriding it.

    Returns:
        `input_size` (C, H, W), `interpolation`, `mean`, `std`, `crop_pct`, `crop_mode`: MambaOut's published
        weights expect bicubic resizing, crop_pct 1.0 and ImageNet mean/std at 224.
    """
    config = resolve_data_config(model=model)
    given = {
        "input_size": (3, input_size, input_size) if input_size else None,
        "crop_pct": crop_pct,
        "interpolation": interpolation,
        "mean": tuple(mean) if mean else None,
        "std": tuple(std) if std else None,
    }
    config.update({k: v for k, v in given.items() if v is not None})
    return config


def eval_transform(config: dict[str, Any]) -> Callable:
    """Resize (shorter side to size / crop_pct) -> center crop -> tensor -> normalize."""
    return create_transform(**config, is_training=False)


def train_transform(
    config: dict[str, Any],
    scale: tuple[float, float],
    ratio: tuple[float, float],
    hflip: float,
    vflip: float,
    color_jitter: float | None,
    auto_augment: str | None,
    interpolation: str,
    re_prob: float,
    re_mode: str,
    re_count: int,
) -> Callable:
    """timm's ImageNet training pipeline: random resized crop, flips, RandAugment or color jitter, random erasing.

    Args:
        config: From `data_config`; its input size, mean and std are used.
        scale: Area range of the random resized crop (0.08-1 for ImageNet).
        ratio: Aspect-ratio range of the crop.
        hflip: Probability of a horizontal flip.
        vflip: Probability of a vertical flip.
        color_jitter: Brightness/contrast/saturation strength (ignored by timm when `auto_augment` is set).
        auto_augment: A timm policy string such as `rand-m9-mstd0.5-inc1`, or None.
        interpolation: Resize interpolation, `random` to pick bilinear or bicubic per image.
        re_prob: Random erasing probability.
        re_mode: Random erasing fill (`pixel`: per-pixel normal noise).
        re_count: Most erased boxes per image.
    """
    return create_transform(
        config["input_size"],
        is_training=True,
        scale=tuple(scale),
        ratio=tuple(ratio),
        hflip=hflip,
        vflip=vflip,
        color_jitter=color_jitter,
        auto_augment=auto_augment,
        interpolation=interpolation,
        mean=config["mean"],
        std=config["std"],
        re_prob=re_prob,
        re_mode=re_mode,
        re_count=re_count,
    )
