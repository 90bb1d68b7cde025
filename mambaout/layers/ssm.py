"""The Mamba token mixer: depthwise conv -> SiLU -> selective scan (S6) over the H×W tokens in 1, 2 or 4 orders.

Put in a Gated CNN block's conv branch, it makes the block the Mamba block of the paper's Figure 1(a) (MambaOut is
that block with the SSM taken out). As in Mamba / Vim / VMamba, Δ, B and C are computed from the conv output: a
projection to `dt_rank + 2N` values per token, and `dt_proj` from the rank-`dt_rank` Δ back to the channels. The
tokens are scanned in raster order (1 direction), raster and reversed (2, as Vim), or rows and columns each both ways
(4, VMamba's cross-scan); every direction has its own projections, A, D and Δ bias, and the outputs are summed.
The causal form scans once, in raster order, after a causal conv, so no token sees a later one.

The directions share one copy of the map: every projection is computed on the tokens in raster order (a token's
projection does not depend on when it is visited), and the scan is told each direction's order as a table of
positions (`selective_scan(..., positions=)`), which the fused kernel indexes; nothing is flipped or transposed.

Initialisation as Mamba: `A = -exp(A_log)` with `A_log = log(1..N)` per channel, `D = 1`, the Δ bias the inverse
softplus of Δ drawn log-uniform in [dt_min, dt_max], `dt_proj` weights uniform in ±dt_rank^-0.5, `x_proj` as
PyTorch's Linear default. A and D are excluded from weight decay (`_no_weight_decay`), as in Mamba.
"""

import functools
import math

import torch
from torch import nn

from mambaout.errors import UserError
from mambaout.layers.conv import CausalDepthwiseConvMixer, DepthwiseConvMixer
from mambaout.layers.scan import SCAN_METHODS, selective_scan

__all__ = ["SSMMixer", "scan_positions"]

# a leaf for torch.fx: symbolic tracing records the call (the scan checks its input shapes in Python)
torch.fx.wrap("selective_scan")
torch.fx.wrap("scan_positions")

# (column-major, reversed) of each scan order, by the number of directions; VMamba's cross-scan order for 4
_ORDERS = {
    1: ((False, False),),
    2: ((False, False), (False, True)),
    4: ((False, False), (True, False), (False, True), (True, True)),
}


def scan_positions(height: int, width: int, directions: int, device: torch.device) -> torch.Tensor:
    """The tokens of an H×W map in the order each scan direction visits them `[directions, H·W]` (raster indices).

    Made once per map size and device; under `torch.export` (symbolic sizes) it is part of the traced graph.
    """
    if isinstance(height, int) and isinstance(width, int):
        return _cached_positions(height, width, directions, device)
    return _positions(height, width, directions, device)


def _positions(height, width, directions: int, device: torch.device) -> torch.Tensor:
    raster = torch.arange(height * width, device=device).view(height, width)
    orders = []
    for column_major, reverse in _ORDERS[directions]:
        order = (raster.t() if column_major else raster).flatten()  # columns: token (i, j) at step j·H + i
        orders.append(order.flip(0) if reverse else order)
    return torch.stack(orders)


@functools.lru_cache(maxsize=64)  # map sizes in use at once (a dense model's predict may meet many)
def _cached_positions(height: int, width: int, directions: int, device: torch.device) -> torch.Tensor:
    with torch.inference_mode(False):  # a cached tensor made under inference_mode could not be saved for backward
        return _positions(height, width, directions, device)


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
        scan_method: "fused" (the compiled kernel), "chunked" or "sequential" (the definition), see `selective_scan`.
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
        scan_method: str = "fused",
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
        length, state, rank = height * width, self.state_size, self.dt_rank
        tokens = self.act(self.conv(x)).reshape(batch * length, channels)  # [B·L, C], raster order
        directions = len(self.orders)
        w_dt, w_bc = self.x_proj_weight.split((rank, 2 * state), dim=1)  # [K, R, C], [K, 2N, C]
        # every direction's projections in one matmul over the tokens, with the states innermost as the scan reads
        # them: [B·L, C] @ [C, K·2N] -> [B, L, K, 2N] -> B, C [B, K, N, L] (strided views)
        bc = (tokens @ w_bc.flatten(0, 1).t()).view(batch, length, directions, 2 * state).permute(0, 2, 3, 1)
        B, C = bc.split(state, dim=2)
        low = (tokens @ w_dt.flatten(0, 1).t()).view(batch, length, directions, rank)  # [B, L, K, R]
        dt = self.dt_proj_weight @ low.permute(0, 2, 3, 1)  # [K, C, R] @ [B, K, R, L] -> [B, K, C, L]
        u = tokens.view(batch, length, channels).transpose(1, 2)  # [B, C, L]: one input for every direction
        y = selective_scan(
            u,
            dt.reshape(batch, -1, length),
            -torch.exp(self.A_log.float()),
            B,
            C,
            D=self.D,
            delta_bias=self.dt_proj_bias.reshape(-1),
            delta_softplus=True,
            method=self.scan_method,
            positions=scan_positions(height, width, len(self.orders), x.device),
        )  # [B, K·C, L]: each direction's channels in a group of their own, every one in raster order
        merged = y.view(batch, len(self.orders), channels, length).sum(1)  # [B, C, L]
        return merged.transpose(1, 2).reshape(batch, height, width, channels)  # [B, C, L] -> [B, H, W, C]

    def extra_repr(self) -> str:
        return (
            f"state_size={self.state_size}, dt_rank={self.dt_rank}, orders={len(self.orders)}, scan={self.scan_method}"
        )
