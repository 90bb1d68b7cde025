"""The Mamba token mixer: depthwise conv -> SiLU -> selective scan (S6) over the H×W tokens in 1, 2 or 4 orders.

Put in a Gated CNN block's conv branch, it makes the block the Mamba block of the paper's Figure 1(a) (MambaOut is
that block with the SSM taken out). As in Mamba / Vim / VMamba, Δ, B and C are computed from the conv output: a
projection to `dt_rank + 2N` values per token, and `dt_proj` from the rank-`dt_rank` Δ back to the channels. The
tokens are scanned in raster order (1 direction), raster and reversed (2, as Vim), or rows and columns each both ways
(4, VMamba's cross-scan); every direction has its own projections, A, D and Δ bias, and the outputs are summed.
The causal form scans once, in raster order, after a causal conv, so no token sees a later one.

Initialisation as Mamba: `A = -exp(A_log)` with `A_log = log(1..N)` per channel, `D = 1`, the Δ bias the inverse
softplus of Δ drawn log-uniform in [dt_min, dt_max], `dt_proj` weights uniform in ±dt_rank^-0.5, `x_proj` as
PyTorch's Linear default. A and D are excluded from weight decay (`_no_weight_decay`), as in Mamba.
"""

import math

import torch
from torch import nn

from mambaout.errors import UserError
from mambaout.layers.conv import CausalDepthwiseConvMixer, DepthwiseConvMixer
from mambaout.layers.scan import SCAN_METHODS, selective_scan

__all__ = ["SSMMixer"]

# a leaf for torch.fx: symbolic tracing records the call (the scan checks its input shapes in Python)
torch.fx.wrap("selective_scan")

# (column-major, reversed) of each scan order, by the number of directions; VMamba's cross-scan order for 4
_ORDERS = {
    1: ((False, False),),
    2: ((False, False), (False, True)),
    4: ((False, False), (True, False), (False, True), (True, True)),
}


class SSMMixer(nn.Module):
    """Depthwise conv, SiLU and Mamba's selective scan on a channels-last map `[B, H, W, C]` -> `[B, H, W, C]`.

    Args:
        channels: Channels C of the map (the block's conv slice).
        kernel_size: Depthwise conv kernel size.
        state_size: SSM state size N per channel.
        scan_directions: 1 (raster), 2 (raster and reversed) or 4 (rows and columns, both ways).
        causal: Causal conv and one raster-order scan (needs `scan_directions=1`).
        dt_rank: Rank of Δ's projection; default `ceil(C / 16)` as Mamba.
        dt_min: Smallest initial Δ.
        dt_max: Largest initial Δ.
        scan_method: "chunked" (fast) or "sequential" (the definition), see `selective_scan`.
    """

    def __init__(
        self,
        channels: int,
        kernel_size: int = 7,
        state_size: int = 16,
        scan_directions: int = 4,
        causal: bool = False,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        scan_method: str = "chunked",
    ):
        super().__init__()
        if scan_directions not in _ORDERS:
            raise UserError(f"scan_directions must be 1, 2 or 4, got {scan_directions}")
        if causal and scan_directions != 1:
            raise UserError(
                f"a causal SSM scans in one direction (raster order), got scan_directions={scan_directions}"
            )
        if scan_method not in SCAN_METHODS:
            raise UserError(f"scan_method must be one of {', '.join(SCAN_METHODS)}, got {scan_method!r}")
        self.state_size, self.scan_method = state_size, scan_method
        self.dt_rank = dt_rank or math.ceil(channels / 16)
        self.orders = _ORDERS[scan_directions]
        directions = len(self.orders)
        self.conv = (CausalDepthwiseConvMixer if causal else DepthwiseConvMixer)(channels, kernel_size)
        self.act = nn.SiLU()
        self.x_proj_weight = nn.Parameter(torch.empty(directions, self.dt_rank + 2 * state_size, channels))
        self.dt_proj_weight = nn.Parameter(torch.empty(directions, channels, self.dt_rank))
        self.dt_proj_bias = nn.Parameter(torch.empty(directions, channels))
        self.A_log = nn.Parameter(torch.empty(directions * channels, state_size))
        self.D = nn.Parameter(torch.empty(directions * channels))
        self.A_log._no_weight_decay = True
        self.D._no_weight_decay = True
        self.reset_parameters(dt_min, dt_max)

    @torch.no_grad()
    def reset_parameters(self, dt_min: float = 1e-3, dt_max: float = 1e-1, dt_floor: float = 1e-4) -> None:
        """Mamba's initialisation of the SSM parameters (the conv keeps the network's)."""
        channels = self.x_proj_weight.shape[-1]
        bound = channels**-0.5  # nn.Linear's default: kaiming-uniform with a = sqrt(5)
        self.x_proj_weight.uniform_(-bound, bound)
        self.dt_proj_weight.uniform_(-(self.dt_rank**-0.5), self.dt_rank**-0.5)
        dt = torch.exp(torch.rand_like(self.dt_proj_bias) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        dt = dt.clamp(min=dt_floor)
        self.dt_proj_bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus: softplus(bias) = dt
        states = torch.arange(1, self.state_size + 1, dtype=torch.float32, device=self.A_log.device)
        self.A_log.copy_(torch.log(states).expand_as(self.A_log))
        self.D.fill_(1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, height, width, channels = x.shape
        length, state = height * width, self.state_size
        x = self.act(self.conv(x))  # [B, H, W, C]
        xs = torch.stack([self._sequence(x, *order) for order in self.orders], 1)  # [B, K, C, L]
        projected = self.x_proj_weight @ xs  # [K, R + 2N, C] @ [B, K, C, L] -> [B, K, R + 2N, L]
        dt, B, C = projected.split((self.dt_rank, state, state), dim=2)  # B, C: [B, K, N, L]
        dt = self.dt_proj_weight @ dt  # [K, C, R] @ [B, K, R, L] -> [B, K, C, L]
        y = selective_scan(
            xs.reshape(batch, -1, length),
            dt.reshape(batch, -1, length),
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D,
            delta_bias=self.dt_proj_bias.reshape(-1),
            delta_softplus=True,
            method=self.scan_method,
        ).view(batch, len(self.orders), channels, length)  # each direction's channels in a group of their own
        merged = sum(self._map(y[:, k], height, width, *order) for k, order in enumerate(self.orders))
        return merged.permute(0, 2, 3, 1)  # [B, C, H, W] -> [B, H, W, C]

    @staticmethod
    def _sequence(x: torch.Tensor, column_major: bool, reverse: bool) -> torch.Tensor:
        """`[B, H, W, C]` -> the tokens in one scan order `[B, C, L]`."""
        if column_major:
            x = x.transpose(1, 2)  # [B, H, W, C] -> [B, W, H, C]: columns become rows
        seq = x.flatten(1, 2).transpose(1, 2)  # [B, L, C] -> [B, C, L]
        return seq.flip(-1) if reverse else seq

    @staticmethod
    def _map(y: torch.Tensor, height: int, width: int, column_major: bool, reverse: bool) -> torch.Tensor:
        """One scan order's output `[B, C, L]` back to the map `[B, C, H, W]`."""
        if reverse:
            y = y.flip(-1)
        if column_major:
            return y.unflatten(-1, (width, height)).transpose(2, 3)  # [B, C, W, H] -> [B, C, H, W]
        return y.unflatten(-1, (height, width))

    def extra_repr(self) -> str:
        return (
            f"state_size={self.state_size}, dt_rank={self.dt_rank}, orders={len(self.orders)}, scan={self.scan_method}"
        )
