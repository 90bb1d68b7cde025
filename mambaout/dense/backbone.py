"""The MambaOut backbone of the dense-prediction heads: four stage outputs, each through its own LayerNorm, NCHW.

The paper's detection and segmentation models put a LayerNorm on every stage output (strides 4, 8, 16, 32) before
the FPN / UperNet; the classifier head is not used. ImageNet weights come through the package's loader, which reads
every published layout: the backbone takes every key it has, and the classifier's keys are skipped and reported.
"""

import os
import warnings
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from mambaout.errors import UserError
from mambaout.models import MambaOut, get_spec
from mambaout.models.pretrained import pretrained_location
from mambaout.models.settings import create_configured_model
from mambaout.weights import load_checkpoint, our_layout, read_state_dict

__all__ = ["DROP_PATH", "DenseBackbone", "create_backbone"]

# The paper's stochastic depth for its dense models (its small model used 0.3-0.4; femto/kobe have none published)
DROP_PATH = {"mambaout_tiny": 0.3, "mambaout_small": 0.3, "mambaout_base": 0.6}


class DenseBackbone(nn.Module):
    """A MambaOut without its classifier, returning its stage outputs NCHW, each through its own LayerNorm.

    Args:
        trunk: A MambaOut; its head is removed (`prune_intermediate_layers`).
        indices: The stages to return (0-3: strides 4, 8, 16, 32).

    Attributes:
        channels: Channels of each returned map.
        strides: Their strides in pixels.
    """

    def __init__(self, trunk: MambaOut, indices: Sequence[int] = (0, 1, 2, 3)):
        super().__init__()
        self.indices = trunk.prune_intermediate_layers(list(indices), prune_head=True)
        self.trunk = trunk
        info = [trunk.feature_info[i] for i in self.indices]
        self.channels = [f["num_chs"] for f in info]
        self.strides = [f["reduction"] for f in info]
        self.norms = nn.ModuleList(nn.LayerNorm(c, eps=1e-6) for c in self.channels)

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """`[B, 3, H, W]` images -> {"0": `[B, C0, H/4, W/4]`, ..., "3": `[B, C3, H/32, W/32]`}."""
        feats = self.trunk.forward_intermediates(x, self.indices, output_fmt="NHWC", intermediates_only=True)
        return OrderedDict(
            (str(k), norm(f).permute(0, 3, 1, 2))  # [B, H, W, C] -> [B, C, H, W] (channels-last memory)
            for k, (norm, f) in enumerate(zip(self.norms, feats, strict=True))
        )

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.trunk.set_grad_checkpointing(enable)

    def load_pretrained(self, name: str, pretrained: bool | str | os.PathLike) -> list[str]:
        """Load ImageNet (or any classification) weights into the trunk; the stage norms keep their init.

        Args:
            name: The registered variant the trunk was built as.
            pretrained: True, "official", "timm", or a checkpoint path or URL in any layout the loader reads.

        Returns:
            The checkpoint's keys not taken (its classifier head).

        Raises:
            UserError: The weights cannot be read, or do not fit the trunk (another variant).
        """
        location, sha256 = pretrained_location(get_spec(name), pretrained)
        weights = our_layout(read_state_dict(location, sha256=sha256), location)
        # everything but the classifier must fit exactly: other keys left over mean weights of another variant
        load_checkpoint(self.trunk, {k: v for k, v in weights.items() if not k.startswith("head.")}, name=location)
        return sorted(k for k in weights if k.startswith("head."))


def create_backbone(
    name: str,
    pretrained: bool | str | os.PathLike = False,
    drop_path_rate: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
) -> DenseBackbone:
    """A registered variant as a dense backbone.

    Args:
        name: A name from `mambaout.list_models()`.
        pretrained: Weights for the trunk (see `DenseBackbone.load_pretrained`); the skipped keys are warned about.
        drop_path_rate: Stochastic depth of the last block; default the paper's for its dense models (`DROP_PATH`).
        model_kwargs: Constructor overrides (e.g. a tiny `depths`/`dims` for tests).

    Raises:
        UserError: Unknown variant, bad `model_kwargs`, or weights that cannot be loaded.
    """
    rate = DROP_PATH.get(name, 0.0) if drop_path_rate is None else drop_path_rate
    trunk = create_configured_model(name, model_kwargs or {}, "model_kwargs", drop_path_rate=rate)
    backbone = DenseBackbone(trunk)
    if pretrained:
        try:
            skipped = backbone.load_pretrained(name, pretrained)
        except UserError as e:
            raise UserError(f"--pretrained {pretrained}: {e}") from None
        if skipped:
            shown = ", ".join(skipped[:4]) + (", ..." if len(skipped) > 4 else "")
            warnings.warn(
                f"--pretrained {pretrained}: backbone weights loaded; skipped {len(skipped)} keys the backbone does "
                f"not use (the classifier: {shown})",
                stacklevel=2,
            )
    return backbone
