"""Mamba's selective scan (S6): the sequential definition, a chunked scan in PyTorch ops, and a fused CPU kernel.

Per channel d and state n, over positions t (Mamba's zero-order-hold discretisation, with Δ = softplus(Δ + bias)
when asked):

    h_t = exp(Δ_t·A) ⊙ h_{t-1} + Δ_t·B_t·u_t,    y_t = Σ_n C_t·h_t + D·u_t,    h_{-1} = 0

Shapes follow the reference `selective_scan_fn` of the Mamba repository: `u`, `Δ` `[batch, D, L]`, `A` `[D, N]`,
`B`, `C` `[batch, N, L]` (or `[batch, G, N, L]`: the D channels in G equal groups, each with its own B and C),
`D` and the Δ bias `[D]`. Two extensions serve the cross-scan: `u` may be `[batch, D/G, L]`, one input for every
group, and `positions` `[G, L]` gives the order in which each group visits the tokens (every sequence stays in token
order; nothing is copied per order).

`method="fused"` (the default) is the C++ kernel of `scan_fused` (one pass per channel, the states in registers,
built on first use; on CUDA, for more than 64 states or without a compiler it falls back to the chunked scan).
`method="sequential"` is the definition, one position at a time (the test oracle). `method="chunked"` cuts the
sequence into chunks of T ≈ √(L/4) positions and runs three passes, each over every chunk at
once: the chunks' own states from zero (T steps), the states handed from chunk to chunk (L/T small steps), and the
chunks' states again from the state that enters them (T steps), reading out `y` as it goes. Every decay it uses is
`exp(A·ΣΔ)` over a stretch of the sequence, a number in [0, 1] for A ≤ 0: nothing is divided and nothing overflows
(the `exp(-cumsum)` factorisation would). An exponent below the dtype's smallest normal number gives exactly 0
rather than a denormal, which x86 CPUs compute up to 100× slower (and PyTorch's `exp` itself 20× slower there).

The chunked scan is the custom op `mambaout::selective_scan_chunked`, with a hand-written backward that keeps only
the inputs and recomputes the states (memory and work linear in L); both ops have an analytic MAC count for
`FlopCounterMode`, which counts no elementwise work. The state and every product are kept in float32 (float64 for
float64 inputs) whatever the input dtype or autocast; `y` comes back in `u`'s dtype.
"""

import itertools
import math
from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.flop_counter import register_flop_formula

from mambaout.layers.scan_fused import STATE_SIZES, kernel, scan_fused

__all__ = ["SCAN_METHODS", "scan_macs", "selective_scan"]

SCAN_METHODS = ("fused", "chunked", "sequential")


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: torch.Tensor | None = None,
    delta_bias: torch.Tensor | None = None,
    delta_softplus: bool = False,
    method: str = "fused",
    positions: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mamba's selective scan, differentiable in every tensor argument.

    Args:
        u: Input sequence `[batch, D, L]`, or `[batch, D/G, L]`: one input shared by the G groups.
        delta: Step sizes Δ `[batch, D, L]` (before `delta_bias` and softplus).
        A: State matrix `[D, N]` (real; Mamba's is negative).
        B: Input matrices `[batch, N, L]`, or `[batch, G, N, L]` for G groups of D/G channels.
        C: Output matrices, shaped as `B`.
        D: Skip weight `[D]`, or None.
        delta_bias: Added to Δ before softplus `[D]`, or None.
        delta_softplus: Apply softplus to Δ (+ bias).
        method: "fused" (the compiled CPU kernel, the default; on other devices, for more than 64 states, or where
            it cannot be built: the chunked scan), "chunked" (PyTorch ops) or "sequential" (the definition, one
            position at a time).
        positions: The order in which each group visits the L tokens `[G, L]` (each row a permutation of 0..L-1),
            or None: in order. Every sequence (u, Δ, B, C and y) is indexed by token, so a cross-scan's orders of
            one map need no copies of it (the fused kernel indexes; the other methods gather and scatter).

    Returns:
        `y` `[batch, D, L]` in `u`'s dtype.
    """
    if method not in SCAN_METHODS:
        raise ValueError(f"method must be one of {SCAN_METHODS}, got {method!r}")
    batch, channels, length = delta.shape
    groups = 1 if B.ndim == 3 else B.shape[1]
    state = A.shape[-1]
    if (
        u.shape not in ((batch, channels, length), (batch, channels // groups, length))
        or A.ndim != 2
        or A.shape[0] != channels
        or B.shape not in ((batch, state, length), (batch, groups, state, length))
        or C.shape != B.shape
        or channels % groups
    ):
        raise ValueError(
            f"selective_scan shapes: u [b, D or D/G, L], delta [b, D, L], A [D, N], B, C [b, N, L] or [b, G, N, L] "
            f"with G dividing D; got u {tuple(u.shape)}, delta {tuple(delta.shape)}, A {tuple(A.shape)}, "
            f"B {tuple(B.shape)}, C {tuple(C.shape)}"
        )
    if positions is not None:
        _check_positions(positions, groups, length)
    compute = torch.float64 if u.dtype == torch.float64 else torch.float32
    device = u.device.type
    no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) else nullcontext()
    with no_autocast:  # the state stays in `compute` under autocast
        B, C = (t.to(compute).view(batch, groups, state, length) for t in (B, C))
        fused = method == "fused" and device in ("cpu", "meta") and state <= STATE_SIZES[-1]
        if fused and (device == "meta" or kernel() is not None):
            B, C = (t if t.stride(2) == 1 else t.transpose(2, 3).contiguous().transpose(2, 3) for t in (B, C))
            optional = [None if t is None else t.to(compute).contiguous() for t in (D, delta_bias)]
            y = scan_fused(u.to(compute), delta.to(compute), A.to(compute).contiguous(), B, C, *optional,
                           delta_softplus, positions)  # fmt: skip
            return y.to(u.dtype)
        u32, delta = u.to(compute), delta.to(compute)
        if u32.shape[1] != channels:
            u32 = u32.unsqueeze(1).expand(batch, groups, *u32.shape[1:]).reshape(batch, channels, length)
        if delta_bias is not None:
            delta = delta + delta_bias.to(compute)[:, None]
        if delta_softplus:
            delta = F.softplus(delta)
        in_order = [u32, delta, B, C]
        if positions is not None:  # each group's sequences in its order
            in_order = [_gather(t, positions, groups) for t in in_order]
        scan = _scan_sequential if method == "sequential" else torch.ops.mambaout.selective_scan_chunked
        y = scan(in_order[0], in_order[1], A.to(compute), in_order[2], in_order[3])
        if positions is not None:  # back to token order
            y = _scatter(y, positions, groups)
        if D is not None:
            y = y + D.to(compute)[:, None] * u32
    return y.to(u.dtype)


def _check_positions(positions: torch.Tensor, groups: int, length: int) -> None:
    if positions.shape != (groups, length) or positions.dtype != torch.int64:
        raise ValueError(
            f"selective_scan positions: int64 [G, L] = [{groups}, {length}], got {positions.dtype} "
            f"{tuple(positions.shape)}"
        )
    checkable = positions.device.type != "meta" and not torch.compiler.is_compiling()  # no values while tracing
    if checkable and not torch.equal(
        positions.sort(-1).values, torch.arange(length, device=positions.device).expand(groups, length)
    ):
        raise ValueError("selective_scan positions: each row must be a permutation of 0..L-1")


def _grouped(t: torch.Tensor, groups: int) -> torch.Tensor:
    """A sequence `[b, ..., L]` (G groups in dim 1) as `[b, G, rest, L]`."""
    return t.reshape(t.shape[0], groups, -1, t.shape[-1])


def _gather(t: torch.Tensor, positions: torch.Tensor, groups: int) -> torch.Tensor:
    """A sequence `[b, ..., L]` (G groups in dim 1) in each group's scan order."""
    grouped = _grouped(t, groups)
    return grouped.gather(-1, positions[None, :, None].expand(grouped.shape)).view(t.shape)


def _scatter(t: torch.Tensor, positions: torch.Tensor, groups: int) -> torch.Tensor:
    """The inverse of `_gather`: a sequence in scan order back to token order."""
    grouped = _grouped(t, groups)
    index = positions[None, :, None].expand(grouped.shape)
    return torch.zeros_like(grouped).scatter(-1, index, grouped).view(t.shape)


def scan_macs(batch: int, channels: int, length: int, state: int) -> int:
    """Multiply-accumulates of one selective scan (what `FlopCounterMode` is told, as 2 FLOPs per MAC).

    Per channel and position: Δ·u (1); per state on top: Δ·A (1), Δu·B (1), the update a·h + x (1) and C·h summed
    over the states (1), so `batch · length · channels · (4·state + 1)`. The exponentials and softplus are not
    multiply-accumulates and are not counted; the D·u skip is an elementwise op outside the scan, not counted either.
    """
    return batch * length * channels * (4 * state + 1)


# --- the definition -------------------------------------------------------------------------------------------------


def _scan_sequential(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """The recurrence one position at a time: `u`, `delta` `[b, D, L]`, `A` `[D, N]`, `B`, `C` `[b, G, N, L]`.

    The sequence is unbound once rather than indexed per position: indexing in a loop would give every position's
    gradient its own full-length zero tensor (quadratic in L); `unbind` gathers them in one `stack`.
    """
    batch, channels, length = u.shape
    groups, state = B.shape[1], A.shape[1]
    per_group = channels // groups
    delta_t = delta.view(batch, groups, per_group, length).permute(3, 0, 1, 2)  # [L, b, G, D/G]
    u_t = u.view(batch, groups, per_group, length).permute(3, 0, 1, 2)
    decay = torch.exp(delta_t[..., None] * A.view(groups, per_group, state))  # [L, b, G, D/G, N]
    inputs = (delta_t * u_t)[..., None] * B.permute(3, 0, 1, 2)[:, :, :, None, :]  # [L, b, G, D/G, N]
    readout = C.permute(3, 0, 1, 2)[:, :, :, None, :]  # [L, b, G, 1, N]
    h = u.new_zeros(batch, groups, per_group, state)
    ys = []
    for a_t, x_t, c_t in zip(decay.unbind(0), inputs.unbind(0), readout.unbind(0), strict=True):
        h = a_t * h + x_t
        ys.append((h * c_t).sum(-1))  # [b, G, D/G]
    return torch.stack(ys, -1).reshape(batch, channels, length)


# --- the chunked scan -----------------------------------------------------------------------------------------------
# Layout: a sequence [b, ..., L] becomes [T, ..., b, K] (position l = k·T + t, zero-padded to K·T), so that a step
# over t works on one contiguous slice holding that position of every chunk, with batch and chunks innermost (long
# inner loops however the per-channel and per-state factors broadcast). A state slice is [G, D/G, N, b, K];
# per-channel tensors are [T, G, D/G, 1, b, K], per-state ones [T, G, 1, N, b, K], and A is [G, D/G, N, 1, 1]. Short
# chunks (T ≈ √(L/4)) keep the steps inside a chunk, which touch every state, few; the hand-over from chunk to chunk
# is a loop over small slices. The batch is taken in blocks whose full-size [T, G, D/G, N, b, K] tensors (the
# decays; in the backward also the states) fit `BLOCK_BYTES`, so memory stays bounded and the passes run from cache.

BLOCK_BYTES = 32 * 2**20


def _chunk_size(length: int) -> int:
    return max(1, math.isqrt(length // 4))


def _to_chunks(t: torch.Tensor, size: int) -> torch.Tensor:
    """`[b, ..., L]` -> `[T, ..., b, K]`, contiguous, zero-padded to a whole number of chunks."""
    pad = -t.shape[-1] % size
    if pad:
        t = F.pad(t, (0, pad))
    # [b, ..., K, T] -> [T, b, ..., K] -> [T, ..., b, K]
    return t.unflatten(-1, (-1, size)).movedim(-1, 0).movedim(1, -2).contiguous()


def _from_chunks(t: torch.Tensor, length: int) -> torch.Tensor:
    """`[T, ..., b, K]` -> `[b, ..., L]` (the padding dropped)."""
    return (
        t.movedim(-2, 1).movedim(0, -1).flatten(-2)[..., :length]
    )  # -> [T, b, ..., K] -> [b, ..., K, T] -> [b, ..., L]


def _exp2_(t: torch.Tensor) -> torch.Tensor:
    """`2**t` in place, exponents too small for a normal result giving exactly 0 (no denormals; NaN stays NaN).

    Base 2 because PyTorch's CPU `exp2` is several times faster than its `exp`, whose slow path for results that
    underflow costs up to 20x more again; the decays' exponents are scaled by log2(e) to match.
    """
    # half a unit above log2(tiny): rounding cannot land just under the smallest normal number
    return F.threshold_(t, math.log2(torch.finfo(t.dtype).tiny) + 0.5, -math.inf).exp2_()


class _Chunked:
    """One batch block of a scan in the chunk layout, with the decays `a_t = exp(Δ_t·A)` of every position.

    Forward, the state is `h_t = a_t·h_{t-1} + x_t`. Backward, the adjoint `g_t = x_t + a_{t+1}·g_{t+1}` is run as
    `g_t = x_t + p_{t+1}`, `p_t = a_t·g_t`, so that it too needs each position's own decay. In both directions a
    chunk's state hands on to the next chunk as `carried = exp(A·ΣΔ)·carried + the chunk's own zero-start result`.
    """

    def __init__(self, u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor):
        batch, channels, self.length = u.shape
        groups, state = B.shape[1], A.shape[1]
        self.size = _chunk_size(self.length)
        self.per_channel = (batch, groups, channels // groups, 1, self.length)
        self.delta = self.channels(delta)  # [T, G, D/G, 1, b, K]
        self.u = self.channels(u)
        self.delta_u = self.delta * self.u
        self.B = _to_chunks(B.unsqueeze(2), self.size)  # [T, G, 1, N, b, K]
        self.C = _to_chunks(C.unsqueeze(2), self.size)
        self.A = A.view(groups, channels // groups, state, 1, 1)
        self.full = torch.broadcast_shapes(self.delta.shape, self.B.shape)  # [T, G, D/G, N, b, K]
        log2_A = self.A * math.log2(math.e)  # exp(Δ·A) = 2**(Δ·A·log2(e))
        self.decay = _exp2_(torch.mul(self.delta, log2_A, out=u.new_empty(self.full)))
        self.through = _exp2_(self.delta.sum(0) * log2_A)  # a whole chunk's decay exp(A·ΣΔ): [G, D/G, N, b, K]

    def channels(self, t: torch.Tensor) -> torch.Tensor:
        """A per-channel sequence `[b, D, L]` in the chunk layout."""
        return _to_chunks(t.reshape(self.per_channel), self.size)

    def sequence(self, t: torch.Tensor) -> torch.Tensor:
        """A per-channel tensor in the chunk layout back to `[b, D, L]`."""
        return _from_chunks(t, self.length).reshape(self.per_channel[0], -1, self.length)

    def scan(
        self,
        channel_in: torch.Tensor,
        state_in: torch.Tensor,
        each: Callable[[int, torch.Tensor], None],
        reverse: bool = False,
        states: torch.Tensor | None = None,
    ) -> None:
        """The recurrence with input `x_t = channel_in_t · state_in_t`, calling `each(t, state_t)` at every position.

        Args:
            channel_in: Per-channel factor of the input in the chunk layout (zero on padding).
            state_in: Per-state factor of the input in the chunk layout.
            each: Called with each position's `h_t` (forward) or `g_t` (reverse), all chunks at once, in a buffer
                the next step overwrites.
            reverse: Run the adjoint, from the last position to the first.
            states: A full-size tensor to write every position's state into (forward only).
        """
        ends = self._pass(channel_in, state_in, None, reverse)
        self._pass(channel_in, state_in, self._entering(ends, reverse), reverse, each, states)

    def _pass(self, channel_in, state_in, start, reverse, each=None, states=None) -> torch.Tensor:
        """One step per position over every chunk at once from `start` (None: zero); returns what each chunk hands
        on: `h` after its last position, or `p` at its first (reverse)."""
        shape = self.full[1:]
        carried, spare = channel_in.new_empty(shape), channel_in.new_empty(shape)
        for i, t in enumerate(range(self.size - 1, -1, -1) if reverse else range(self.size)):
            value = spare if states is None else states[t]
            torch.mul(channel_in[t], state_in[t], out=value)  # x_t
            previous = carried if i else start
            if reverse:
                if previous is not None:
                    value.add_(previous)  # g_t = x_t + p_{t+1}
                torch.mul(self.decay[t], value, out=carried)  # p_t = a_t·g_t
            else:
                if previous is not None:
                    value.addcmul_(self.decay[t], previous)  # h_t = a_t·h_{t-1} + x_t
                if states is None:
                    spare = carried
                carried = value
            if each is not None:
                each(t, value)
        return carried

    def _entering(self, ends: torch.Tensor, reverse: bool) -> torch.Tensor:
        """What enters each chunk, from what each chunk hands on when started from zero (`[G, D/G, N, b, K]`)."""
        ends, through = (t.movedim(-1, 0).contiguous() for t in (ends, self.through))  # [K, G, D/G, N, b]
        entering = torch.zeros_like(ends)
        chunks = ends.shape[0]
        order = list(range(chunks - 1, -1, -1) if reverse else range(chunks))
        for before, k in itertools.pairwise(order):  # one chunk at a time
            torch.addcmul(ends[before], through[before], entering[before], out=entering[k])
        return entering.movedim(0, -1)  # [K, G, D/G, N, b] -> [G, D/G, N, b, K]


def _batch_blocks(u: torch.Tensor, A: torch.Tensor) -> list[slice]:
    """Slices of the batch whose full-size chunk-layout tensors hold at most `BLOCK_BYTES` each."""
    batch, channels, length = u.shape
    size = _chunk_size(length)
    per_sample = channels * A.shape[1] * size * -(-length // size) * u.element_size()  # one full-size tensor
    step = max(1, BLOCK_BYTES // per_sample)
    return [slice(i, i + step) for i in range(0, batch, step)]


@torch.library.custom_op("mambaout::selective_scan_chunked", mutates_args=())
def _scan_chunked(
    u: torch.Tensor, delta: torch.Tensor, A: torch.Tensor, B: torch.Tensor, C: torch.Tensor
) -> torch.Tensor:
    """`y = Σ_n C·h` of the scan (no D·u), chunked: `u`, `delta` `[b, D, L]`, `A` `[D, N]`, `B`, `C` `[b, G, N, L]`."""
    return torch.cat([_forward_block(u[s], delta[s], A, B[s], C[s]) for s in _batch_blocks(u, A)])


def _forward_block(u, delta, A, B, C) -> torch.Tensor:
    chunked = _Chunked(u, delta, A, B, C)
    y = torch.empty_like(chunked.delta)  # [T, G, D/G, 1, b, K]
    product = u.new_empty(chunked.full[1:])

    def read(t: int, h: torch.Tensor) -> None:
        torch.sum(torch.mul(h, chunked.C[t], out=product), 2, keepdim=True, out=y[t])  # Σ_n C·h

    chunked.scan(chunked.delta_u, chunked.B, read)
    return chunked.sequence(y)


@_scan_chunked.register_fake
def _(u, delta, A, B, C):
    return torch.empty_like(u)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(*inputs)  # the inputs only: the backward recomputes the states


def _scan_chunked_backward(ctx, dy: torch.Tensor):
    """Gradients of `y = Σ_n C·h`, block by block of the batch (A's summed over the blocks)."""
    u, delta, A, B, C = ctx.saved_tensors
    parts = [_backward_block(u[s], delta[s], A, B[s], C[s], dy[s]) for s in _batch_blocks(u, A)]
    du, d_delta, dA, dB, dC = zip(*parts, strict=True)
    return torch.cat(du), torch.cat(d_delta), torch.stack(dA).sum(0), torch.cat(dB), torch.cat(dC)


def _backward_block(u, delta, A, B, C, dy):
    """The states are recomputed (and kept), then the adjoint runs backwards by the same chunked scan and each
    position's gradients are taken as it passes, with `a_t·h_{t-1} = h_t - x_t` for the decay's share."""
    chunked = _Chunked(u, delta, A, B, C)
    dy_c = chunked.channels(dy)  # [T, G, D/G, 1, b, K]
    h = u.new_empty(chunked.full)
    dC = torch.empty_like(chunked.C)
    product = u.new_empty(chunked.full[1:])

    def read(t: int, state: torch.Tensor) -> None:
        torch.sum(torch.mul(state, dy_c[t], out=product), 1, keepdim=True, out=dC[t])  # Σ over the group's channels

    chunked.scan(chunked.delta_u, chunked.B, read, states=h)
    du, d_delta, dB = torch.empty_like(chunked.delta), torch.empty_like(chunked.delta), torch.empty_like(chunked.B)
    dA = torch.zeros_like(chunked.A)  # [G, D/G, N, 1, 1]
    g_B = torch.empty_like(chunked.delta[0])

    def gradients(t: int, g: torch.Tensor) -> None:
        delta_t, delta_u = chunked.delta[t], chunked.delta_u[t]
        decay_grad = h[t].sub_(torch.mul(delta_u, chunked.B[t], out=product))  # h_t - x_t = a_t·h_{t-1}
        torch.sum(torch.mul(g, delta_u, out=product), 1, keepdim=True, out=dB[t])  # Σ over the group's channels
        torch.sum(torch.mul(g, chunked.B[t], out=product), 2, keepdim=True, out=g_B)  # Σ_n g·B
        decay_grad.mul_(g)  # g_t·a_t·h_{t-1}: the gradient of log a_t = Δ_t·A
        dA.add_(torch.mul(decay_grad, delta_t, out=product).sum((3, 4), keepdim=True))
        torch.sum(torch.mul(decay_grad, chunked.A, out=product), 2, keepdim=True, out=d_delta[t])
        d_delta[t].addcmul_(g_B, chunked.u[t])
        torch.mul(g_B, delta_t, out=du[t])

    chunked.scan(dy_c, chunked.C, gradients, reverse=True)
    dB, dC = (_from_chunks(t, chunked.length).squeeze(2) for t in (dB, dC))  # [b, G, N, L]
    return chunked.sequence(du), chunked.sequence(d_delta), dA.reshape(A.shape), dB, dC


torch.library.register_autograd(
    "mambaout::selective_scan_chunked", _scan_chunked_backward, setup_context=_setup_context
)


@register_flop_formula([torch.ops.mambaout.selective_scan_chunked, torch.ops.mambaout.selective_scan_fused])
def _scan_flops(u_shape, delta_shape, A_shape, *args, **kwargs) -> int:
    batch, channels, length = delta_shape
    return 2 * scan_macs(batch, channels, length, A_shape[1])
