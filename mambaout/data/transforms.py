"""Image transforms, built by timm's `create_transform` from the model's `pretrained_cfg` and the run's settings.

One fix to timm's auto-augment ops is applied here (see `posterize`): Pillow 13 rejects posterizing to 0 bits, which
timm's increasing-posterize op asks for at magnitude 10 (about 1 image in 700 under the paper's RandAugment).
"""

from collections.abc import Callable
from typing import Any

from PIL import Image
from timm.data import auto_augment as timm_augment
from timm.data import create_transform, resolve_data_config
from torch import nn

from mambaout.errors import UserError, describe, one_line

__all__ = ["check_auto_augment", "data_config", "eval_transform", "posterize", "train_transform"]


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
    transform = create_transform(
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
    for op in _augment_ops(transform):
        if op.aug_fn is timm_augment.posterize:
            op.aug_fn = posterize
    return transform


def check_auto_augment(policy: str) -> None:
    """Raise `UserError` unless timm can build the auto-augment `policy` (`rand-...`, `augmix-...`, or an AutoAugment
    policy name such as `original`), as `create_transform` would."""
    hparams = {"translate_const": 100, "img_mean": (124, 116, 104)}
    try:
        if policy.startswith("rand"):
            timm_augment.rand_augment_transform(policy, hparams)
        elif policy.startswith("augmix"):
            timm_augment.augment_and_mix_transform(policy, hparams)
        else:
            timm_augment.auto_augment_transform(policy, hparams)
    except (AssertionError, ValueError, KeyError, IndexError, TypeError) as e:
        raise UserError(
            f"--auto-augment {one_line(repr(policy), 60)} is not a timm policy ({describe(e, 80)}); e.g. "
            "rand-m9-mstd0.5-inc1 (the paper's), augmix-m5-w4-d2, original, or none"
        ) from None


def posterize(image: Image.Image, bits_to_keep: int, **_: Any) -> Image.Image:
    """timm's posterize op as the paper's recipe ran it, whatever the installed Pillow.

    Posterizing to 0 bits keeps no bit of any channel: Pillow before 13 returned an all-black image, Pillow 13 raises
    `ValueError: bits must be between or equal to 1 and 8`. timm's `PosterizeIncreasing` (RandAugment's `inc1`
    policies) asks for 0 bits at magnitude 10 and `Posterize` below magnitude 2.5; this returns the black image then.
    """
    if bits_to_keep >= 8:
        return image
    if bits_to_keep <= 0:
        return image.point([0] * 256 * len(image.getbands()))  # what Pillow's 0-bit look-up table gave
    return timm_augment.posterize(image, bits_to_keep)


def _augment_ops(transform: Any) -> list[timm_augment.AugmentOp]:
    """Every timm `AugmentOp` inside a transform pipeline (Compose, RandAugment, AutoAugment, AugMix)."""
    if isinstance(transform, timm_augment.AugmentOp):
        return [transform]
    children = getattr(transform, "transforms", None) or getattr(transform, "ops", None) or []
    if isinstance(transform, timm_augment.AutoAugment):
        children = [op for sub_policy in transform.policy for op in sub_policy]
    return [op for child in children for op in _augment_ops(child)]
