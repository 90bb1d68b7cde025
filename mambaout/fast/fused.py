"""The fused Gated CNN block: the reference block's function with fewer passes over memory.

The reference block spends most of its CPU time outside the matrix multiplies: it writes the whole fc1 output,
splits it, copies the conv slice to make it contiguous, concatenates the identity and conv halves and then
multiplies by the gate. This block computes the same function as follows (N = B·H·W pixels, h hidden, `hi` identity
channels, `cc` conv channels, h = hi + cc):

1. LayerScale is folded into fc2. The LayerNorm keeps its affine: PyTorch's CPU LayerNorm runs 2-3× faster with
   an affine than without (torch 2.14.1, `scripts/cpu_probes.py layernorm`), so folding it into fc1 gains nothing.
2. fc1 is split by rows into three linears: gate (h outputs, activation fused in), identity (hi) and conv (cc).
   The conv input then has its own dense `[B, H, W, cc]` buffer, which the depthwise conv reads as a channels-last
   NCHW view without a copy.
3. The gate product is written in place into the activated gate buffer, so there is no `cat`.
4. fc2 and the residual add are one kernel.

Steps 2 and 4 use oneDNN's fused kernels where `select_kernels` finds them, and the composed ops elsewhere.

Blocks with another token mixer (the Mamba block's SSM, attention, the causal mixers) are fused the same way: their
mixer module is kept and called on the conv slice's own `[B, H, W, cc]` buffer, in place of the depthwise conv.
"""

import copy

import torch
import torch.nn.functional as F
from torch import nn

from mambaout.fast.kernels import Activation, KernelSet, activation_of, select_kernels
from mambaout.layers import DepthwiseConvMixer, GatedCNNBlock

__all__ = ["FusedGatedCNNBlock", "can_fuse", "fuse_blocks", "fused_graph"]


def can_fuse(block: nn.Module) -> bool:
    """True when `block` is a `GatedCNNBlock` (with any token mixer)."""
    return isinstance(block, GatedCNNBlock)


class FusedGatedCNNBlock(nn.Module):
    """Inference-only `GatedCNNBlock` on channels-last maps `[B, H, W, C]`, built from a reference block's weights.

    Args:
        block: The reference block (its weights are copied, folded and cast; it is not kept).
        dtype: Compute and weight dtype (float32 or bfloat16; weights are stored in it, not autocast).
        kernels: The fused kernels to use on CPU; off-CPU inputs always take the composed ops.
    """

    def __init__(self, block: GatedCNNBlock, dtype: torch.dtype, kernels: KernelSet):
        super().__init__()
        if not can_fuse(block):
            raise TypeError(f"cannot fuse {type(block).__name__} with mixer {type(block.mixer).__name__}")
        hidden, ident, conv_ch = block.split_sizes
        self.dim = block.norm.normalized_shape[0]
        self.ident, self.conv_ch = ident, conv_ch
        self.eps = block.norm.eps
        # MambaOut's depthwise conv runs as a conv on a view; any other mixer as its module, `[B, H, W, cc]` in and out
        self.mixer = None if type(block.mixer) is DepthwiseConvMixer else copy.deepcopy(block.mixer)
        self.kernels = kernels
        self.act: Activation | None = activation_of(block.act)
        # an activation the fused kernel does not know is applied as the reference module
        self.act_module = block.act if self.act is None else None

        w1, b1 = block.fc1.weight, block.fc1.bias
        # LayerScale folded in float64, so that the folded weights round once, to `dtype`
        w2, b2 = block.fc2.weight.double(), block.fc2.bias.double()
        if isinstance(block.ls, nn.Module) and hasattr(block.ls, "gamma"):
            gamma = block.ls.gamma.double()
            w2, b2 = w2 * gamma[:, None], b2 * gamma

        def buffer(name: str, t: torch.Tensor) -> None:
            # a copy of its own: slices of one reference weight must not share storage (exporters expect that)
            self.register_buffer(name, t.detach().to(dtype, copy=True).contiguous())

        buffer("norm_weight", block.norm.weight)
        buffer("norm_bias", block.norm.bias)
        buffer("gate_weight", w1[:hidden])  # [h, C]
        buffer("gate_bias", b1[:hidden])
        buffer("ident_weight", w1[hidden : hidden + ident])  # [hi, C]
        buffer("ident_bias", b1[hidden : hidden + ident])
        buffer("conv_in_weight", w1[hidden + ident :])  # [cc, C]
        buffer("conv_in_bias", b1[hidden + ident :])
        if self.mixer is None:
            conv = block.mixer.conv
            self.padding = conv.padding
            buffer("conv_weight", conv.weight)  # [cc, 1, k, k]
            buffer("conv_bias", conv.bias)
        buffer("out_weight", w2)  # [C, h]
        buffer("out_bias", b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, H, W, C]` -> `[B, H, W, C]` (contiguous in and out)."""
        if torch.jit.is_tracing() or torch.compiler.is_exporting():
            return self._forward_out_of_place(x)
        batch, height, width, dim = x.shape
        kernels = self.kernels  # oneDNN on CPU inputs only: off-CPU inputs take the composed ops
        flat = x.reshape(-1, self.dim)  # [N, C]
        normed = F.layer_norm(flat, (self.dim,), self.norm_weight, self.norm_bias, self.eps)

        if self.act is not None:
            gated = kernels.linear_act(normed, self.gate_weight, self.gate_bias, self.act)  # act(g): [N, h]
        else:
            gated = self.act_module(F.linear(normed, self.gate_weight, self.gate_bias))
        # `gated` becomes act(g) * cat(i, conv(c)) in place, one half at a time
        if self.ident:
            gated[:, : self.ident].mul_(kernels.linear(normed, self.ident_weight, self.ident_bias))
        conv_in = kernels.linear(normed, self.conv_in_weight, self.conv_in_bias).view(
            batch, height, width, self.conv_ch
        )
        gated.view(batch, height, width, -1)[..., self.ident :].mul_(self._mix(conv_in))

        out = kernels.linear_add(gated, flat, self.out_weight, self.out_bias)  # x + fc2(...): [N, C]
        return out.view(batch, height, width, dim)

    def _forward_out_of_place(self, x: torch.Tensor) -> torch.Tensor:
        """The same function without in-place writes (which tracing exporters cannot follow into views): each half
        of the gate product goes through its own column slice of fc2, so there is still no `cat`."""
        ident, gate_weight, gate_bias = self.ident, self.gate_weight, self.gate_bias
        normed = F.layer_norm(x, (self.dim,), self.norm_weight, self.norm_bias, self.eps)
        act = self.act_module if self.act is None else self.act
        mixed = self._mix(F.linear(normed, self.conv_in_weight, self.conv_in_bias))
        gate_c = act(F.linear(normed, gate_weight[ident:], gate_bias[ident:]))
        out = F.linear(gate_c * mixed, self.out_weight[:, ident:], self.out_bias)
        if ident:
            gate_i = act(F.linear(normed, gate_weight[:ident], gate_bias[:ident]))
            out = out + F.linear(
                gate_i * F.linear(normed, self.ident_weight, self.ident_bias), self.out_weight[:, :ident]
            )
        return x + out

    def _mix(self, conv_in: torch.Tensor) -> torch.Tensor:
        """The token mixer on the conv slice: `[B, H, W, cc]` -> `[B, H, W, cc]`."""
        if self.mixer is not None:
            return self.mixer(conv_in)
        conv_in = conv_in.permute(0, 3, 1, 2)  # [B, H, W, cc] -> [B, cc, H, W], channels-last strides, no copy
        mixed = F.conv2d(conv_in, self.conv_weight, self.conv_bias, padding=self.padding, groups=self.conv_ch)
        return mixed.permute(0, 2, 3, 1)  # [B, cc, H, W] -> [B, H, W, cc]

    def extra_repr(self) -> str:
        act = self.act.onednn_attr if self.act is not None else type(self.act_module).__name__
        return f"dim={self.dim}, ident={self.ident}, conv_ch={self.conv_ch}, act={act}, onednn={self.kernels.onednn}"


def fuse_blocks(model: nn.Module, dtype: torch.dtype, kernels: KernelSet) -> nn.Module:
    """A copy of `model` in eval mode whose `GatedCNNBlock`s (in `model.stages[i].blocks`) are `FusedGatedCNNBlock`s
    computing in `dtype`; `model` is left untouched."""
    fused = copy.deepcopy(model).eval()
    for stage in fused.stages:
        blocks = getattr(stage, "blocks", None)
        if blocks is None:
            continue
        for j, block in enumerate(blocks):
            if can_fuse(block):
                blocks[j] = FusedGatedCNNBlock(block, dtype, kernels)
    return fused


def fused_graph(model: nn.Module) -> nn.Module:
    """The graph a file is written from: `model`'s fused copy in fp32 on the CPU, default (contiguous) weight layout,
    no gradients. `mambaout.export.export_model(model, ..., graph=fused_graph(model))` writes it, verified against
    `model`; it runs 1.2-1.3× faster in ONNX Runtime than the reference graph."""
    model = copy.deepcopy(model).float().cpu()
    return fuse_blocks(model, torch.float32, select_kernels(torch.device("cpu"), torch.float32)).requires_grad_(False)
