"""MambaOut: stacks of Gated CNN blocks in four stages.

Paper: "MambaOut: Do We Really Need Mamba for Vision?", Yu & Wang, CVPR 2025 (arXiv 2405.07992).
The variants and their pretrained configs are registered in `mambaout.models.registry`.
"""

import os
from collections.abc import Sequence
from pathlib import Path

import torch
from timm.layers import get_act_layer
from torch import nn
from torch.utils.checkpoint import checkpoint

from mambaout.layers import Downsample, GatedCNNBlock, MlpHead, Stem, TokenMixer

__all__ = ["MambaOut", "MambaOutStage"]


class MambaOutStage(nn.Module):
    """An optional stride-2 downsample followed by `depth` Gated CNN blocks, channels-last in and out.

    Args:
        in_dim: Input channels.
        dim: Channels of the blocks.
        depth: Number of blocks.
        downsample: Open with a stride-2 `Downsample` (stages 2-4).
        downsample_norm_first: Use the LN -> conv downsample of timm's rw variants.
        drop_path: One stochastic depth rate per block.
        **block_kwargs: Passed to every `GatedCNNBlock`.
    """

    def __init__(
        self,
        in_dim: int,
        dim: int,
        depth: int,
        downsample: bool,
        downsample_norm_first: bool = False,
        drop_path: Sequence[float] = (),
        **block_kwargs,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.downsample = Downsample(in_dim, dim, norm_first=downsample_norm_first) if downsample else nn.Identity()
        rates = list(drop_path) or [0.0] * depth
        self.blocks = nn.Sequential(*[GatedCNNBlock(dim, drop_path=rates[j], **block_kwargs) for j in range(depth)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.downsample(x)
        if self.grad_checkpointing and not torch.jit.is_scripting():
            return self._forward_checkpointed(x)
        return self.blocks(x)

    @torch.jit.unused
    def _forward_checkpointed(self, x: torch.Tensor) -> torch.Tensor:
        # TorchScript cannot compile `checkpoint` and runs the blocks plainly; an fx trace records them plainly too
        # (a graph cannot hold a recomputed region), so both compute the same values without the memory saving
        if not torch.is_grad_enabled() or isinstance(x, torch.fx.Proxy):
            return self.blocks(x)
        for block in self.blocks:
            x = checkpoint(block, x, use_reentrant=False)
        return x


class MambaOut(nn.Module):
    """The MambaOut network: stem (stride 4), four stages (strides 4, 8, 16, 32), MLP head.

    `stem_stride` 2 or 1 keeps 4 or 16 times the tokens in every stage (strides s, 2s, 4s, 8s) with the same
    parameters: Pathfinder's 32² images then give stage 1 1,024 tokens, past τ = 6·D for widths up to 170. One stage
    (`depths=[n]`, `dims=[d]`) makes the network isotropic: every block sees the stem's map.

    Args:
        depths: Blocks per stage.
        dims: Channels per stage.
        in_chans: Image channels.
        num_classes: Classifier outputs; 0 for a feature extractor.
        expansion_ratio: Block hidden width over its channels (8/3 in the paper).
        kernel_size: Token mixer kernel size (7).
        conv_ratio: Fraction of the channels given to the token mixer (1.0 in the paper).
        act_layer: Block and stem activation, name or class (exact GELU in the paper; `silu` in two timm variants).
        stem_mid_norm: LayerNorm between the two stem convs (paper) or not (timm rw).
        downsample_norm_first: LN -> conv downsampling (timm rw) instead of conv -> LN (paper).
        ls_init_value: LayerScale init value in every block, or None (paper).
        head_hidden_norm: LayerNorm after the head's hidden activation (paper) or not (timm rw).
        drop_path_rate: Stochastic depth of the last block; rates rise linearly from 0 over all blocks.
        drop_rate: Dropout before the classifier.
        token_mixer: Each block's token mixer: a name of `mambaout.layers.TOKEN_MIXERS` ("conv" for MambaOut,
            "conv_ssm" for the Mamba block, "causal_conv", "causal_conv_ssm", "attention", "causal_attention") or
            a factory.
        mixer_kwargs: Extra keyword arguments of every token mixer (e.g. `{"scan_directions": 2}`).
        global_pool: The head's pooling: "avg" (paper), "max", "avgmax", or "" (the head runs at every position).
        stem_stride: The stem's stride: 4 (paper), 2 or 1.
    """

    output_fmt = "NHWC"  # what forward_features returns; timm's feature wrappers read it

    def __init__(
        self,
        depths: Sequence[int] = (3, 3, 9, 3),
        dims: Sequence[int] = (96, 192, 384, 576),
        in_chans: int = 3,
        num_classes: int = 1000,
        expansion_ratio: float = 8 / 3,
        kernel_size: int = 7,
        conv_ratio: float = 1.0,
        act_layer: str | type[nn.Module] = "gelu",
        stem_mid_norm: bool = True,
        downsample_norm_first: bool = False,
        ls_init_value: float | None = None,
        head_hidden_norm: bool = True,
        drop_path_rate: float = 0.0,
        drop_rate: float = 0.0,
        token_mixer: str | TokenMixer = "conv",
        mixer_kwargs: dict | None = None,
        global_pool: str = "avg",
        stem_stride: int = 4,
    ):
        super().__init__()
        if len(depths) != len(dims):
            raise ValueError(f"depths {tuple(depths)} and dims {tuple(dims)} must have the same length")
        act = get_act_layer(act_layer)
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.num_features = dims[-1]
        self.stem = Stem(in_chans, dims[0], mid_norm=stem_mid_norm, act_layer=act, stride=stem_stride)
        rates = torch.linspace(0, drop_path_rate, sum(depths), device="cpu").split(list(depths))
        self.stages = nn.Sequential()
        self.feature_info = []
        for i, (depth, dim) in enumerate(zip(depths, dims, strict=True)):
            self.stages.append(
                MambaOutStage(
                    dims[i - 1] if i else dims[0],
                    dim,
                    depth,
                    downsample=i > 0,
                    downsample_norm_first=downsample_norm_first,
                    drop_path=rates[i].tolist(),
                    expansion_ratio=expansion_ratio,
                    kernel_size=kernel_size,
                    conv_ratio=conv_ratio,
                    act_layer=act,
                    ls_init_value=ls_init_value,
                    token_mixer=token_mixer,
                    mixer_kwargs=mixer_kwargs,
                )
            )
            self.feature_info.append({"num_chs": dim, "reduction": stem_stride * 2**i, "module": f"stages.{i}"})
        # the head keeps exact GELU even where the blocks use SiLU, as in timm's published rw weights
        self.head = MlpHead(
            dims[-1], num_classes, hidden_norm=head_hidden_norm, drop_rate=drop_rate, pool_type=global_pool
        )
        self.head_hidden_size = self.head.num_features
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    # --- timm-style model API -------------------------------------------------------------------------------------

    def no_weight_decay(self) -> set[str]:
        """Names of the parameters trained without weight decay: every norm weight, bias and LayerScale, and those a
        layer marks `_no_weight_decay` (the SSM's A and D, as in Mamba)."""
        return {name for name, p in self.named_parameters() if p.ndim <= 1 or getattr(p, "_no_weight_decay", False)}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Two optimizer groups: decayed matrices/kernels, and undecayed norms, biases and LayerScales."""
        skip = self.no_weight_decay()
        params = [(n, p) for n, p in self.named_parameters() if p.requires_grad]
        return [
            {"params": [p for n, p in params if n not in skip], "weight_decay": weight_decay},
            {"params": [p for n, p in params if n in skip], "weight_decay": 0.0},
        ]

    def group_matcher(self, coarse: bool = False) -> dict:
        """Regexes grouping parameters by depth (for layer-wise lr decay), in timm's format."""
        if coarse:
            return {"stem": r"^stem", "blocks": r"^stages\.(\d+)"}
        return {
            "stem": r"^stem",
            "blocks": [(r"^stages\.(\d+)\.downsample", (0,)), (r"^stages\.(\d+)\.blocks\.(\d+)", None)],
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute block activations in the backward pass to save memory."""
        for stage in self.stages:
            stage.grad_checkpointing = enable

    def get_classifier(self) -> nn.Module:
        return self.head.fc

    def reset_classifier(self, num_classes: int, global_pool: str | None = None, reset_other: bool = False) -> None:
        """Replace the final Linear with a new one for `num_classes` outputs (0: pre-logits features).

        Args:
            num_classes: New classifier outputs.
            global_pool: New head pooling ("avg", "max", "avgmax", "" for none), or None to keep it.
            reset_other: Also drop the head's norm and hidden layer (then `head_hidden_size == num_features`).
        """
        self.num_classes = num_classes
        self.head.reset(num_classes, global_pool, reset_other=reset_other)
        self.head_hidden_size = self.head.num_features

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """Write this model as a hub folder in timm's format (see `mambaout.models.factory.save_pretrained`)."""
        from mambaout.models.factory import save_pretrained  # the factory imports this module

        return save_pretrained(self, directory)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """`[B, 3, H, W]` images -> `[B, H/32, W/32, C]` channels-last map of the last stage."""
        return self.stages(self.stem(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """Last-stage map -> logits `[B, num_classes]` (or the head's hidden features when `pre_logits`).

        With `global_pool=""` the head keeps the map (`[B, H, W, ...]`); after `prune_intermediate_layers` removed
        the head, the map passes through unchanged.
        """
        return self.head(x, pre_logits=pre_logits)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def forward_intermediates(
        self,
        x: torch.Tensor,
        indices: int | Sequence[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[torch.Tensor] | tuple[torch.Tensor, list[torch.Tensor]]:
        """Stage outputs for dense-prediction heads (strides 4, 8, 16, 32; channels in `feature_info`).

        Args:
            x: Images `[B, 3, H, W]`.
            indices: Stages to return: None for all, an int n for the last n, or a sequence (negative from the end).
            norm: Apply the head's LayerNorm to the last stage's output (the only stage with a trained norm).
            stop_early: Skip the stages after the last one asked for.
            output_fmt: "NCHW" (`[B, C, H, W]`, contiguous) or "NHWC" (channels-last as computed).
            intermediates_only: Return only the list of stage outputs.

        Returns:
            The list of stage outputs, or `(last_stage_output, list)`.
        """
        if output_fmt not in ("NCHW", "NHWC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NHWC', got {output_fmt!r}")
        take = self._take_indices(indices)
        last = len(self.stages) - 1
        stages = self.stages[: max(take) + 1] if stop_early or intermediates_only else self.stages
        feats = []
        x = self.stem(x)
        for i, stage in enumerate(stages):
            x = stage(x)
            if i in take:
                y = self.head.norm(x) if norm and i == last else x
                feats.append(y.permute(0, 3, 1, 2).contiguous() if output_fmt == "NCHW" else y)  # -> [B, C, H, W]
        return feats if intermediates_only else (x, feats)

    def prune_intermediate_layers(
        self, indices: int | Sequence[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the stages after the last index asked for (and the head), for a lean backbone.

        Args:
            indices: Stages still wanted, as in `forward_intermediates`.
            prune_norm: Accepted for timm's feature wrappers and unused: the only norm is the head's, which goes
                with the head, as in timm.
            prune_head: Remove the head (it goes anyway when stages are removed: it is sized for the last one).
                The model then returns the last kept stage's map `[B, H, W, C]`.

        Returns:
            The absolute stage indices.
        """
        take = self._take_indices(indices)
        keep = max(take) + 1
        prune_end = keep < len(self.stages)
        self.stages = self.stages[:keep]
        self.feature_info = self.feature_info[:keep]
        if prune_head or prune_end:
            self.reset_classifier(0, "", reset_other=True)
        if prune_end:
            self.num_features = self.head_hidden_size = self.feature_info[-1]["num_chs"]
        return take

    def _take_indices(self, indices: int | Sequence[int] | None) -> list[int]:
        n = len(self.stages)
        if indices is None:
            return list(range(n))
        if isinstance(indices, int):
            if not 0 < indices <= n:
                raise ValueError(f"last-n indices must be in 1..{n}, got {indices}")
            return list(range(n - indices, n))
        take = [i + n if i < 0 else i for i in indices]
        if not take or any(not 0 <= i < n for i in take):
            raise ValueError(f"stage indices must be in -{n}..{n - 1}, got {list(indices)}")
        return take
