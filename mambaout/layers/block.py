"""The Gated CNN block: a Mamba block with its state-space model taken out (paper, Figure 1a).

`y = x + drop_path(ls(fc2(act(g) * concat(i, mixer(c)))))` with `(g, i, c) = split(fc1(LayerNorm(x)))`.
The token mixer acts on the `c` slice only; it is a constructor argument so that the SSM-augmented (Mamba) block
and causal variants can reuse the rest of the block unchanged.
"""

from collections.abc import Callable

import torch
from timm.layers import DropPath, LayerScale
from torch import nn

TokenMixer = Callable[[int, int], nn.Module]
"""Factory `(channels, kernel_size) -> module` mapping `[B, H, W, C] -> [B, H, W, C]`."""


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


class GatedCNNBlock(nn.Module):
    """Gated CNN block on channels-last maps `[B, H, W, C]`, residual.

    Args:
        dim: Input and output channels C.
        expansion_ratio: Hidden width is `int(expansion_ratio * dim)`; fc1 produces twice that.
        kernel_size: Token mixer kernel size.
        conv_ratio: Fraction of `dim` given to the token mixer (the rest of the hidden value branch is identity).
        act_layer: Gate activation (exact GELU in the paper; SiLU in two timm variants).
        ls_init_value: LayerScale initial value, or None for no LayerScale (paper variants).
        drop_path: Stochastic depth probability of this block.
        token_mixer: Factory for the module applied to the conv slice.
    """

    def __init__(
        self,
        dim: int,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        act_layer: type[nn.Module] = nn.GELU,
        ls_init_value: float | None = None,
        drop_path: float = 0.0,
        token_mixer: TokenMixer = DepthwiseConvMixer,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.mixer = token_mixer(conv_channels, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # [B, H, W, C]
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        x = self.fc2(self.act(g) * torch.cat((i, self.mixer(c)), dim=-1))
        return shortcut + self.drop_path(self.ls(x))
