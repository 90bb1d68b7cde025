"""`features_only` backbones: the stage maps of a MambaOut, for detection and segmentation necks.

`create_model(name, features_only=True)` returns `MambaOutFeatures` (a list of NCHW maps, strides 4-32); timm's
own wrappers are there by name as in timm (`feature_cls="dict" | "hook" | "fx"`) and return channels-last maps,
as they do for timm's MambaOut.
"""

from collections.abc import Sequence
from typing import Any

import torch
from timm.models import FeatureDictNet, FeatureGraphNet, FeatureHookNet, FeatureInfo
from torch import nn

from mambaout.errors import UserError
from mambaout.models.mambaout import MambaOut

__all__ = ["MambaOutFeatures", "features_only"]


class MambaOutFeatures(nn.Module):
    """The stem and the stages up to the last one asked for; returns the asked stages' maps.

    Args:
        model: The network; its head and the stages after the last index are pruned away (in place).
        out_indices: Stages to return: a sequence (negative from the end) or an int n for the last n.
        output_fmt: "NCHW" (`[B, C, H, W]`, contiguous) or "NHWC" (channels-last as computed).

    Attributes:
        feature_info: timm's `FeatureInfo`: `.channels()`, `.reduction()`, `.module_name()` of the returned maps.
    """

    def __init__(self, model: MambaOut, out_indices: int | Sequence[int] = (0, 1, 2, 3), output_fmt: str = "NCHW"):
        super().__init__()
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        self.out_indices = model.prune_intermediate_layers(out_indices)
        self.feature_info = FeatureInfo(model.feature_info, tuple(self.out_indices))
        self.output_fmt = output_fmt
        self.in_chans = model.in_chans
        self.stem = model.stem
        self.stages = model.stages

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Images `[B, in_chans, H, W]` -> one map per index, `[B, C_i, H / r_i, W / r_i]` (r_i = 4, 8, 16, 32)."""
        x = self.stem(x)
        feats = []
        for i, stage in enumerate(self.stages):
            x = stage(x)
            if i in self.out_indices:
                feats.append(x.permute(0, 3, 1, 2).contiguous() if self.output_fmt == "NCHW" else x)  # -> [B, C, H, W]
        return feats


# timm's names for its feature wrappers; "list" and "getter" both return NCHW lists here, as timm's getter does
_FEATURE_CLASSES: dict[str, type[nn.Module]] = {
    "list": MambaOutFeatures,
    "getter": MambaOutFeatures,
    "dict": FeatureDictNet,
    "hook": FeatureHookNet,
    "fx": FeatureGraphNet,
}


def features_only(
    model: MambaOut,
    out_indices: int | Sequence[int] = (0, 1, 2, 3),
    feature_cls: str | type[nn.Module] = "list",
    **feature_cfg: Any,
) -> nn.Module:
    """Wrap `model` as a feature extractor, as timm's `create_model(..., features_only=True)` does.

    Args:
        model: The network (pruned in place by `MambaOutFeatures`).
        out_indices: Stages to return.
        feature_cls: "list"/"getter" (`MambaOutFeatures`), timm's "dict", "hook" or "fx", or a wrapper class
            taking `(model, out_indices=..., **feature_cfg)`.
        **feature_cfg: Passed to the wrapper (e.g. `output_fmt`).

    Returns:
        The extractor; `feature_info.channels()` and `.reduction()` describe its outputs.

    Raises:
        UserError: An unknown `feature_cls` name.
    """
    if isinstance(feature_cls, str):
        if feature_cls.lower() not in _FEATURE_CLASSES:
            raise UserError(f"unknown feature_cls '{feature_cls}': use one of {', '.join(_FEATURE_CLASSES)}")
        feature_cls = _FEATURE_CLASSES[feature_cls.lower()]
    if feature_cls is not MambaOutFeatures:
        # timm's wrappers hand on the stages' own (channels-last) maps and say so, as for timm's MambaOut
        feature_cfg.setdefault("output_fmt", model.output_fmt)
        if issubclass(feature_cls, (FeatureDictNet, FeatureHookNet)):
            feature_cfg.setdefault("flatten_sequential", True)
    return feature_cls(model, out_indices=out_indices, **feature_cfg)
