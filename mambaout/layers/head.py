"""The MLP classifier head: global average pool -> LN -> Linear -> act -> [LN] -> Linear."""

import torch
from torch import nn


class MlpHead(nn.Module):
    """Classifier on a channels-last map `[B, H, W, C]` (or already pooled `[B, C]`).

    Args:
        in_features: Channels C of the last stage.
        num_classes: Output classes; 0 makes `fc` an identity (features only).
        mlp_ratio: Hidden width is `mlp_ratio * in_features`.
        hidden_norm: LayerNorm after the hidden activation (paper variants; timm's rw heads have none).
        act_layer: Hidden activation (exact GELU).
        drop_rate: Dropout before the classifier.
    """

    def __init__(
        self,
        in_features: int,
        num_classes: int = 1000,
        mlp_ratio: float = 4,
        hidden_norm: bool = True,
        act_layer: type[nn.Module] = nn.GELU,
        drop_rate: float = 0.0,
    ):
        super().__init__()
        self.num_features = int(mlp_ratio * in_features)
        self.norm = nn.LayerNorm(in_features, eps=1e-6)
        self.fc1 = nn.Linear(in_features, self.num_features)
        self.act = act_layer()
        self.hidden_norm = nn.LayerNorm(self.num_features, eps=1e-6) if hidden_norm else nn.Identity()
        self.drop = nn.Dropout(drop_rate)
        self.fc = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()

    def reset(self, num_classes: int) -> None:
        """Replace the classifier with a freshly initialised one for `num_classes` (0: none)."""
        if num_classes <= 0:
            self.fc = nn.Identity()
            return
        ref = self.fc1.weight
        self.fc = nn.Linear(self.num_features, num_classes, device=ref.device, dtype=ref.dtype)
        nn.init.trunc_normal_(self.fc.weight, std=0.02)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        if x.ndim == 4:
            x = x.mean((1, 2))  # [B, H, W, C] -> [B, C]
        x = self.drop(self.hidden_norm(self.act(self.fc1(self.norm(x)))))
        return x if pre_logits else self.fc(x)
