"""Multi-head self-attention as a token mixer over the H×W tokens of a channels-last map, fully visible or causal.

For the paper's ViT experiment (Figure 3b: ViT-Ti 72.2 -> 70.6 top-1 when attention is made causal) in the Gated
CNN block: every token attends to every token, or (causal) to itself and the tokens before it in raster order. It
carries no position embedding of its own; within a MambaOut network the stem and downsampling convs around it give
the tokens their local context.
"""

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AttentionMixer"]


class AttentionMixer(nn.Module):
    """Multi-head self-attention on a channels-last map `[B, H, W, C]` -> `[B, H, W, C]`.

    Args:
        channels: Channels C of the map (the block's conv slice).
        kernel_size: Unused: attention has no kernel (the token-mixer factory signature passes one).
        causal: Each token attends only to itself and the tokens before it in raster order.
        head_dim: Target channels per head; the number of heads is the largest divisor of C up to C // head_dim.
    """

    def __init__(self, channels: int, kernel_size: int = 7, causal: bool = False, head_dim: int = 32):
        super().__init__()
        wanted = max(1, channels // head_dim)
        self.heads = next(h for h in range(wanted, 0, -1) if channels % h == 0)
        self.causal = causal
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        qkv = self.qkv(x.reshape(batch, height * width, channels))  # [B, L, 3C]
        q, k, v = qkv.unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4).unbind(0)  # 3 × [B, heads, L, C/h]
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        y = y.transpose(1, 2).reshape(batch, height, width, channels)  # [B, heads, L, C/h] -> [B, H, W, C]
        return self.proj(y)

    def extra_repr(self) -> str:
        return f"heads={self.heads}, causal={self.causal}"
