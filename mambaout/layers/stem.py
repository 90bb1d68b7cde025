"""Stem (stride 4; 2 or 1 to keep more tokens) and the stride-2 downsampling layers that open stages 2-4. Outputs are
channels-last."""

import torch
from torch import nn

STEM_STRIDES = (4, 2, 1)


class Stem(nn.Module):
    """conv3x3 s2 -> [LN] -> act -> conv3x3 s2 -> LN, from NCHW images to a `[B, H/4, W/4, C]` map.

    `stride` 2 keeps the second conv at stride 1 (`[B, H/2, W/2, C]`), 1 both (`[B, H, W, C]`): the same layers and
    parameters, more tokens, for tasks whose images are small but whose structure is long (Pathfinder).

    Args:
        in_chans: Image channels.
        out_chans: Output channels C; the middle width is C // 2.
        mid_norm: LayerNorm between the convs (paper variants); timm's rw variants have none.
        act_layer: Activation between the convs.
        stride: Total stride, 4 (paper), 2 or 1.
    """

    def __init__(
        self,
        in_chans: int,
        out_chans: int,
        mid_norm: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        stride: int = 4,
    ):
        super().__init__()
        if stride not in STEM_STRIDES:
            raise ValueError(f"stem stride must be one of {STEM_STRIDES}, got {stride}")
        self.conv1 = nn.Conv2d(in_chans, out_chans // 2, 3, stride=min(stride, 2), padding=1)
        self.norm1 = nn.LayerNorm(out_chans // 2, eps=1e-6) if mid_norm else None
        self.act = act_layer()
        self.conv2 = nn.Conv2d(out_chans // 2, out_chans, 3, stride=max(stride // 2, 1), padding=1)
        self.norm2 = nn.LayerNorm(out_chans, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.norm1 is not None:
            x = self.norm1(x.permute(0, 2, 3, 1)).permute(0, 3, 1, 2)  # LN over C in [B, H, W, C], back to NCHW
        x = self.conv2(self.act(x))
        return self.norm2(x.permute(0, 2, 3, 1))  # [B, C, H, W] -> [B, H, W, C]


class Downsample(nn.Module):
    """conv3x3 s2 -> LN (paper), or LN -> conv3x3 s2 (timm rw, `norm_first`), on channels-last maps.

    Args:
        in_chans: Input channels.
        out_chans: Output channels.
        norm_first: Normalise the input (width `in_chans`) instead of the output.
    """

    def __init__(self, in_chans: int, out_chans: int, norm_first: bool = False):
        super().__init__()
        self.norm_first = norm_first
        self.conv = nn.Conv2d(in_chans, out_chans, 3, stride=2, padding=1)
        self.norm = nn.LayerNorm(in_chans if norm_first else out_chans, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_first:
            x = self.norm(x)
        x = self.conv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)  # conv on [B, C, H, W], back to [B, H, W, C]
        return x if self.norm_first else self.norm(x)
