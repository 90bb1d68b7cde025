"""Mask R-CNN and Faster R-CNN with an FPN on the MambaOut backbone, composed from torchvision's modules.

torchvision's detectors take any backbone with `out_channels`: here the stage-normed MambaOut and torchvision's
`FeaturePyramidNetwork` (256 channels, the four stages plus a max-pooled P6: five levels), as mmdetection's
Mask R-CNN 1x that the paper used. Everything after the backbone is torchvision's own: RPN (3 anchors per place),
RoIAlign, the two-layer box head, the four-conv mask head.
"""

import os
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork, LastLevelMaxPool

from mambaout.dense.backbone import DenseBackbone, create_backbone
from mambaout.models import get_spec

__all__ = ["DETECTORS", "BackboneWithFPN", "create_detector"]

DETECTORS = ("mask_rcnn", "faster_rcnn")
_ROI = 7  # RoIAlign output side of the box head (torchvision's and mmdetection's)


class BackboneWithFPN(nn.Module):
    """The dense backbone followed by an FPN: five maps of `out_channels` (strides 4, 8, 16, 32 and 64).

    Args:
        body: The stage-normed backbone.
        out_channels: FPN channels (256).
    """

    def __init__(self, body: DenseBackbone, out_channels: int = 256):
        super().__init__()
        self.body = body
        self.fpn = FeaturePyramidNetwork(body.channels, out_channels, extra_blocks=LastLevelMaxPool())
        self.out_channels = out_channels

    def forward(self, x: torch.Tensor) -> "OrderedDict[str, torch.Tensor]":
        """`[B, 3, H, W]` -> {"0": `[B, C, H/4, W/4]`, ..., "3": `[B, C, H/32, W/32]`, "pool": `[B, C, H/64, W/64]`}."""
        return self.fpn(self.body(x))


def create_detector(
    name: str,
    num_classes: int,
    kind: str = "mask_rcnn",
    pretrained: bool | str | os.PathLike = False,
    *,
    drop_path_rate: float | None = None,
    model_kwargs: Mapping[str, Any] | None = None,
    min_size: int = 800,
    max_size: int = 1333,
    fpn_channels: int = 256,
    box_head_dim: int = 1024,
    rpn_batch_size: int = 256,
    box_batch_size: int = 512,
    **kwargs: Any,
) -> MaskRCNN | FasterRCNN:
    """A torchvision Mask R-CNN or Faster R-CNN on a MambaOut variant.

    Args:
        name: The backbone's variant (`mambaout.list_models()`).
        num_classes: Object classes, background not counted (80 for COCO): the predictors get one more.
        kind: "mask_rcnn" or "faster_rcnn".
        pretrained: Backbone weights: True, "official", "timm", or a checkpoint path or URL (classifier skipped).
        drop_path_rate: The backbone's stochastic depth; default the paper's (tiny 0.3, small 0.3, base 0.6).
        model_kwargs: Backbone constructor overrides (e.g. `depths`, `dims` of a tiny test model).
        min_size: Images are resized so their short side is this (torchvision's transform, the paper's 800) ...
        max_size: ... unless the long side would pass this (1333).
        fpn_channels: Channels of the FPN, the RPN head and the mask head (256).
        box_head_dim: Width of the box head's two fully connected layers (1024).
        rpn_batch_size: Anchors sampled per image for the RPN loss (256).
        box_batch_size: Proposals sampled per image for the box and mask losses (512).
        **kwargs: Further `torchvision.models.detection.MaskRCNN` / `FasterRCNN` arguments (thresholds, ...).

    Returns:
        In train mode, `model(images, targets)` returns torchvision's loss dict; in eval mode `model(images)`
        returns per image `boxes` `[N, 4]` (x1, y1, x2, y2 in input pixels), `labels` `[N]` (1..num_classes),
        `scores` `[N]` and, for Mask R-CNN, `masks` `[N, 1, H, W]` (probabilities).
    """
    if kind not in DETECTORS:
        raise ValueError(f"kind must be one of {', '.join(DETECTORS)}, got {kind!r}")
    backbone = BackboneWithFPN(create_backbone(name, pretrained, drop_path_rate, model_kwargs), fpn_channels)
    cfg = get_spec(name).cfg
    common = dict(
        min_size=min_size,
        max_size=max_size,
        image_mean=list(cfg.mean),
        image_std=list(cfg.std),
        rpn_batch_size_per_image=rpn_batch_size,
        box_batch_size_per_image=box_batch_size,
        box_head=TwoMLPHead(fpn_channels * _ROI**2, box_head_dim),
        box_predictor=FastRCNNPredictor(box_head_dim, num_classes + 1),
        **kwargs,
    )
    if kind == "faster_rcnn":
        return FasterRCNN(backbone, **common)
    return MaskRCNN(
        backbone,
        mask_head=MaskRCNNHeads(fpn_channels, [fpn_channels] * 4, 1),
        mask_predictor=MaskRCNNPredictor(fpn_channels, fpn_channels, num_classes + 1),
        **common,
    )
