"""Depthwise-convolution token mixers on channels-last maps: MambaOut's k×k conv, and its causal form.

Causal here means raster order (row by row, left to right): the token at (i, j) may see (i', j') only when
i' < i, or i' = i and j' <= j. The causal conv keeps the kernel's rows above the centre and the left half of the
centre row (the centre included) and zeroes the rest, so the output at a token never depends on a later token.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CausalDepthwiseConvMixer", "DepthwiseConvMixer"]


class DepthwiseConvMixer(nn.Module):
    """Depthwise k×k convolution over the spatial dims of a channels-last map.

    Args:
        channels: Number of channels convolved (`int(conv_ratio * dim)`).
        kernel_size: Square kernel size; padding keeps the spatial size.
    """

    def __init__(self, channels: int, kernel_size: int = 7):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size, padding=kernel_size // 2, groups=channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
        x = self.conv(x)
        return x.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]


class CausalDepthwiseConvMixer(DepthwiseConvMixer):
    """The depthwise k×k convolution with its kernel masked to the tokens at or before the centre in raster order.

    The masked taps stay in the weight (so checkpoints keep the plain conv's shape) but are multiplied by zero in
    every forward, so they neither act nor learn.

    Args:
        channels: Number of channels convolved.
        kernel_size: Odd square kernel size.
    """

    def __init__(self, channels: int, kernel_size: int = 7):
        if kernel_size % 2 == 0:
            raise ValueError(f"a causal conv needs an odd kernel size (a centre tap), got {kernel_size}")
        super().__init__(channels, kernel_size)
        centre = kernel_size // 2
        mask = torch.zeros(kernel_size, kernel_size)
        mask[:centre] = 1  # the rows above
        mask[centre, : centre + 1] = 1  # the left half of the centre row, the centre included
        self.register_buffer("mask", mask, persistent=False)  # [k, k], broadcast over the [C, 1, k, k] weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        x = x.permute(0, 3, 1, 2)  # [B, H, W, C] -> [B, C, H, W]
        x = F.conv2d(x, conv.weight * self.mask, conv.bias, padding=conv.padding, groups=conv.groups)
        return x.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]
