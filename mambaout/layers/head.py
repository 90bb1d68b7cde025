"""The MLP classifier head: global pool -> LN -> Linear -> act -> [LN] -> Linear."""

import torch
from torch import nn

POOL_TYPES = ("avg", "max", "avgmax", "")


class MlpHead(nn.Module):
    """Classifier on a channels-last map `[B, H, W, C]`.

    Args:
        in_features: Channels C of the last stage.
        num_classes: Output classes; 0 makes `fc` an identity (features only).
        mlp_ratio: Hidden width is `mlp_ratio * in_features`.
        hidden_norm: LayerNorm after the hidden activation (paper variants; timm's rw heads have none).
        act_layer: Hidden activation (exact GELU).
        drop_rate: Dropout before the classifier.
        pool_type: Global pooling over H and W: "avg" (the paper's), "max", "avgmax" (their mean), or "" for none,
            which keeps the map and applies the rest of the head at every position (`[B, H, W, num_classes]`).
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 1000,
        mlp_ratio: float = 4,
        hidden_norm: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        drop_rate: float = 0.0,
        pool_type: str = "avg",
    ):
        super().__init__()
        self.pool_type = _check_pool_type(pool_type)
        self.in_features = in_features
        self.num_features = int(mlp_ratio * in_features)
        self.norm = nn.LayerNorm(in_features, eps=1e-6)
        self.fc1 = nn.Linear(in_features, self.num_features)
        self.act = act_layer()
        self.hidden_norm = nn.LayerNorm(self.num_features, eps=1e-6) if hidden_norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int, pool_type: str | None = None, reset_other: bool = False) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` (0: none).

        Args:
            num_classes: New classifier outputs.
            pool_type: New global pooling (see the class), or None to keep it.
            reset_other: Also drop the norm and the hidden layer, so the head passes its (pooled) input through.
        """
        if pool_type is not None:
            self.pool_type = _check_pool_type(pool_type)
        if reset_other:
            self.norm, self.fc1, self.act, self.hidden_norm = nn.Identity(), nn.Identity(), nn.Identity(), nn.Identity()
            self.num_features = self.in_features
        if num_classes <= 0:
            self.fc = nn.Identity()
            return
        ref = next(self.parameters(), None)
        self.fc = nn.Linear(
            self.num_features,
            num_classes,
            device=None if ref is None else ref.device,
            dtype=None if ref is None else ref.dtype,
        )
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        # the pooling is chosen by a Python string, never by the tensor, so fx and TorchScript see a fixed graph
        if self.pool_type == "avg":
            x = x.mean((1, 2))  # [B, H, W, C] -> [B, C]
        elif self.pool_type == "max":
            x = x.amax((1, 2))  # [B, H, W, C] -> [B, C]
        elif self.pool_type == "avgmax":
            x = 0.5 * (x.amax((1, 2)) + x.mean((1, 2)))  # [B, H, W, C] -> [B, C]
        x = self.drop(self.hidden_norm(self.act(self.fc1(self.norm(x)))))
        return x if pre_logits else self.fc(x)


def _check_pool_type(pool_type: str) -> str:
    if pool_type not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {pool_type!r}")
    return pool_type
