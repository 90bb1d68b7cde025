"""The Gated CNN block: a Mamba block with its state-space model taken out (paper, Figure 1a).

`y = x + drop_path(ls(fc2(act(g) * concat(i, mixer(c)))))` with `(g, i, c) = split(fc1(LayerNorm(x)))`.
The token mixer acts on the `c` slice only; it is a constructor argument, by name or as a factory, so that the
SSM-augmented (Mamba) block and the causal variants reuse the rest of the block unchanged. Every other part of the
block acts on each token alone, so a causal mixer makes the whole block causal.
"""

import functools
from collections.abc import Callable
from typing import Any

import torch
from timm.layers import DropPath, LayerScale
from torch import nn

from mambaout.errors import UserError
from mambaout.layers.attention import AttentionMixer
from mambaout.layers.conv import CausalDepthwiseConvMixer, DepthwiseConvMixer
from mambaout.layers.ssm import SSMMixer

__all__ = ["TOKEN_MIXERS", "GatedCNNBlock", "TokenMixer", "token_mixer_factory"]

TokenMixer = Callable[[int, int], nn.Module]
"""Factory `(channels, kernel_size) -> module` mapping `[B, H, W, C] -> [B, H, W, C]`."""

TOKEN_MIXERS: dict[str, TokenMixer] = {
    "conv": DepthwiseConvMixer,  # MambaOut
    "conv_ssm": SSMMixer,  # the Mamba block (4-direction cross-scan by default)
    "causal_conv": CausalDepthwiseConvMixer,
    "causal_conv_ssm": functools.partial(SSMMixer, causal=True, scan_directions=1),
    "attention": AttentionMixer,
    "causal_attention": functools.partial(AttentionMixer, causal=True),
}
"""The token mixers by the name `token_mixer=` takes."""


def token_mixer_factory(token_mixer: str | TokenMixer, mixer_kwargs: dict[str, Any] | None = None) -> TokenMixer:
    """The factory for a mixer name of `TOKEN_MIXERS` (or a factory, passed through), with `mixer_kwargs` bound.

    Raises:
        UserError: An unknown name.
    """
    if isinstance(token_mixer, str):
        if token_mixer not in TOKEN_MIXERS:
            raise UserError(f"unknown token_mixer '{token_mixer}': choose one of {', '.join(TOKEN_MIXERS)}")
        token_mixer = TOKEN_MIXERS[token_mixer]
    return functools.partial(token_mixer, **mixer_kwargs) if mixer_kwargs else token_mixer


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
        token_mixer: The module applied to the conv slice: a name of `TOKEN_MIXERS` or a factory.
        mixer_kwargs: Extra keyword arguments of the token mixer (e.g. `{"scan_directions": 2}` for "conv_ssm").
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
        token_mixer: str | TokenMixer = "conv",
        mixer_kwargs: dict[str, Any] | None = None,
    ):
        super().__init__()
        hidden = int(expansion_ratio * dim)
        conv_channels = int(conv_ratio * dim)
        self.split_sizes = (hidden, hidden - conv_channels, conv_channels)
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.act = act_layer()
        self.mixer = token_mixer_factory(token_mixer, mixer_kwargs)(conv_channels, kernel_size)
        self.fc2 = nn.Linear(hidden, dim)
        self.ls = LayerScale(dim, ls_init_value) if ls_init_value is not None else nn.Identity()
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x  # [B, H, W, C]
        g, i, c = torch.split(self.fc1(self.norm(x)), self.split_sizes, dim=-1)
        x = self.fc2(self.act(g) * torch.cat((i, self.mixer(c)), dim=-1))
        return shortcut + self.drop_path(self.ls(x))
