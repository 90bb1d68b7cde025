"""UperNet on the MambaOut backbone: a pyramid-pooling module and an FPN fused at stride 4, plus an auxiliary head.

The setting of the Swin and ConvNeXt ADE20K models that the paper followed (mmsegmentation's `UPerHead` and
`FCNHead`): pyramid pooling with scales 1, 2, 3 and 6 on the last stage, 512 channels, a 3×3 fuse of the four FPN
levels, dropout 0.1 before the classifier, and an auxiliary FCN head (256 channels) on stage 3 whose loss counts 0.4.
Convolutions are conv -> norm -> ReLU (`torchvision.ops.Conv2dNormActivation`); the norm is BatchNorm (SyncBatchNorm
under multi-GPU DDP, as mmseg's SyncBN), or GroupNorm for batches too small for batch statistics.
"""

import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from math import gcd
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import Conv2dNormActivation

from mambaout.dense.backbone import DenseBackbone, create_backbone

__all__ = ["HEAD_NORMS", "FCNHead", "Segmenter", "UPerHead", "create_segmenter"]

HEAD_NORMS = ("batch", "group")
_GROUPS = 32
_MIN_GROUP = 8


def _norm_layer(norm: str) -> Callable[[int], nn.Module]:
    if norm not in HEAD_NORMS:
        raise ValueError(f"norm must be one of {', '.join(HEAD_NORMS)}, got {norm!r}")
    if norm == "batch":
        return nn.BatchNorm2d
    # at least 8 channels a group: on the pyramid pooling's 1×1 map a group of 2 values normalizes to ±1 whatever
    # they are, and its gradient grows with 1 / their spread
    return lambda channels: nn.GroupNorm(max(1, gcd(_GROUPS, channels // _MIN_GROUP)), channels)


def _upsample(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


class UPerHead(nn.Module):
    """Pyramid pooling on the last map, a top-down FPN over all maps, and a 3×3 fuse of every level at stride 4.

    Args:
        in_channels: Channels of the backbone's maps, fine to coarse.
        num_classes: Classes to score per pixel.
        channels: Width of every layer (512).
        pool_scales: Output sides of the pyramid pooling (1, 2, 3, 6).
        norm: "batch" or "group".
        dropout: Dropout before the classifier (0.1).
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        num_classes: int,
        channels: int = 512,
        pool_scales: Sequence[int] = (1, 2, 3, 6),
        norm: str = "batch",
        dropout: float = 0.1,
    ):
        super().__init__()
        conv = partial(Conv2dNormActivation, norm_layer=_norm_layer(norm), activation_layer=nn.ReLU)
        *fine, last = in_channels
        self.pools = nn.ModuleList(nn.Sequential(nn.AdaptiveAvgPool2d(s), conv(last, channels, 1)) for s in pool_scales)
        self.bottleneck = conv(last + len(pool_scales) * channels, channels, 3)
        self.laterals = nn.ModuleList(conv(c, channels, 1) for c in fine)
        self.fpn_convs = nn.ModuleList(conv(channels, channels, 3) for _ in fine)
        self.fuse = conv(len(in_channels) * channels, channels, 3)
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, feats: Sequence[torch.Tensor]) -> torch.Tensor:
        """Maps `[B, C_i, H/s_i, W/s_i]` -> class scores `[B, num_classes, H/s_0, W/s_0]`."""
        *fine, last = feats
        pooled = [_upsample(pool(last), last.shape[-2:]) for pool in self.pools]
        levels = [lateral(f) for lateral, f in zip(self.laterals, fine, strict=True)]
        levels.append(self.bottleneck(torch.cat([last, *pooled], dim=1)))
        for i in range(len(levels) - 1, 0, -1):  # top-down: each level gets the coarser one added
            levels[i - 1] = levels[i - 1] + _upsample(levels[i], levels[i - 1].shape[-2:])
        outs = [conv(level) for conv, level in zip(self.fpn_convs, levels, strict=False)] + [levels[-1]]
        size = outs[0].shape[-2:]
        fused = self.fuse(torch.cat([outs[0], *(_upsample(o, size) for o in outs[1:])], dim=1))
        return self.classifier(self.dropout(fused))


class FCNHead(nn.Module):
    """The auxiliary head: one 3×3 conv -> norm -> ReLU, dropout, a 1×1 classifier.

    Args:
        in_channels: Channels of the map it reads.
        num_classes: Classes to score per pixel.
        channels: Width of its conv (256).
        norm: "batch" or "group".
        dropout: Dropout before the classifier (0.1).
    """

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, norm: str = "batch", dropout=0.1):
        super().__init__()
        self.conv = Conv2dNormActivation(
            in_channels, channels, 3, norm_layer=_norm_layer(norm), activation_layer=nn.ReLU
        )
        self.dropout = nn.Dropout2d(dropout)
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, C, h, w]` -> `[B, num_classes, h, w]`."""
        return self.classifier(self.dropout(self.conv(x)))


class Segmenter(nn.Module):
    """Backbone, UperNet decode head and auxiliary head, scoring every pixel of the input.

    Args:
        backbone: The stage-normed MambaOut.
        decode_head: Reads all stages.
        aux_head: Reads stage `aux_index` (stage 3, index 2), or None.
        aux_index: Which stage the auxiliary head reads.
    """

    def __init__(self, backbone: DenseBackbone, decode_head: UPerHead, aux_head: FCNHead | None, aux_index: int = 2):
        super().__init__()
        self.backbone = backbone
        self.decode_head = decode_head
        self.aux_head = aux_head
        self.aux_index = aux_index

    def forward(self, images: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """`[B, 3, H, W]` -> {"out": `[B, K, H, W]`} scores, plus "aux" (same shape) in train mode with an aux head."""
        feats = list(self.backbone(images).values())
        size = images.shape[-2:]
        result = OrderedDict(out=_upsample(self.decode_head(feats), size))
        if self.training and self.aux_head is not None:
            result["aux"] = _upsample(self.aux_head(feats[self.aux_index]), size)
        return result


def create_segmenter(
    name: str,
    num_classes: int,
    pretrained: bool | str | os.PathLike = False,
    *,
    drop_path_rate: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    channels: int = 512,
    aux_channels: int | None = 256,
    norm: str = "batch",
    dropout: float = 0.1,
) -> Segmenter:
    """UperNet (with its auxiliary FCN head on stage 3) on a MambaOut variant.

    Args:
        name: The backbone's variant (`mambaout.list_models()`).
        num_classes: Semantic classes (150 for ADE20K).
        pretrained: Backbone weights: True, "official", "timm", or a checkpoint path or URL (classifier skipped).
        drop_path_rate: The backbone's stochastic depth; default the paper's (tiny 0.3, small 0.3, base 0.6).
        model_kwargs: Backbone constructor overrides (e.g. `depths`, `dims` of a tiny test model).
        channels: UperNet's width (512).
        aux_channels: The auxiliary head's width (256), or None for no auxiliary head.
        norm: "batch" (SyncBatchNorm under multi-GPU DDP) or "group" (GroupNorm: 32 groups, fewer under 256 channels).
        dropout: Dropout before both heads' classifiers (0.1).
    """
    backbone = create_backbone(name, pretrained, drop_path_rate, model_kwargs)
    head = UPerHead(backbone.channels, num_classes, channels, norm=norm, dropout=dropout)
    aux = FCNHead(backbone.channels[2], num_classes, aux_channels, norm, dropout) if aux_channels else None
    return Segmenter(backbone, head, aux)
