"""The paper's long-sequence analysis as a calculator: token counts, the Transformer block's FLOPs, and τ.

A Transformer block of width D on L tokens costs `24·D²·L` FLOPs in its linear layers (QKV, output projection and
a 4× MLP) and `4·D·L²` in attention (`2·D·L²` when causal: half the score matrix). The quadratic term passes the
linear one when L > τ = 6·D, the paper's line between short and long sequences: τ = 2304 for ViT-S (D = 384) and
4608 for ViT-B (D = 768). ImageNet at 224² with 16² patches is 196 tokens, short; COCO detection (800×1280) and
ADE20K segmentation (512×2048) are about 4000, long for ViT-S and close to τ for ViT-B.
"""

from dataclasses import asdict, dataclass

from mambaout.errors import UserError
from mambaout.models import get_spec

__all__ = [
    "PAPER_MODELS",
    "PAPER_TASKS",
    "TokenRow",
    "markdown",
    "model_rows",
    "paper_table",
    "token_row",
    "transformer_flops",
]

PAPER_TASKS = (("ImageNet", 224, 224), ("COCO", 800, 1280), ("ADE20K", 512, 2048))
"""(task, height, width) of the paper's three input sizes."""
PAPER_MODELS = (("ViT-S", 384), ("ViT-B", 768))
"""(model, token width D) of the paper's two ViTs (16² patches)."""
PATCH = 16


@dataclass(frozen=True)
class TokenRow:
    """One line of the analysis: a model (or stage) of width D on one input size.

    Attributes:
        task: The task or input size.
        model: The model, or a model's stage.
        D: Token width (channels).
        tau: `6·D`: the token count where attention's FLOPs pass the linear layers'.
        L: Tokens.
        long: `L > tau`.
        flops_linear: `24·D²·L`, one block's linear layers.
        flops_attention: `4·D·L²`, one block's attention (`2·D·L²` when causal).
        input: (height, width) in pixels.
        stride: Pixels per token side (patch size or stage stride).
    """

    task: str
    model: str
    D: int
    tau: int
    L: int
    long: bool
    flops_linear: int
    flops_attention: int
    input: tuple[int, int]
    stride: int

    def record(self) -> dict:
        """The row as the JSON keys the issue names (task, model, D, tau, L, long, flops_linear, flops_attention)."""
        return {k: v for k, v in asdict(self).items() if k not in ("input", "stride")}


def transformer_flops(dim: int, tokens: int, causal: bool = False) -> tuple[int, int]:
    """(linear, attention) FLOPs of one Transformer block of width `dim` on `tokens` tokens."""
    return 24 * dim**2 * tokens, (2 if causal else 4) * dim * tokens**2


def token_row(
    task: str, model: str, dim: int, height: int, width: int, stride: int, causal: bool = False, pad: bool = False
) -> TokenRow:
    """The analysis of width `dim` on a `height × width` input cut into `stride`-pixel tokens.

    Args:
        pad: Count partial tokens at the borders (a strided conv with padding, as MambaOut's stages) instead of
            dropping them (non-overlapping patches, as ViT's).
    """
    for name, value in (("--dim", dim), ("--img-size", min(height, width)), ("--patch", stride)):
        if value < 1:
            raise UserError(f"{name} must be at least 1, got {value}")
    rows, cols = (-(-height // stride), -(-width // stride)) if pad else (height // stride, width // stride)
    tokens = rows * cols
    if tokens < 1:
        raise UserError(f"--img-size {height}x{width} holds no {stride}-pixel token")
    linear, attention = transformer_flops(dim, tokens, causal)
    return TokenRow(task, model, dim, 6 * dim, tokens, tokens > 6 * dim, linear, attention, (height, width), stride)


def model_rows(name: str, task: str, height: int, width: int, causal: bool = False) -> list[TokenRow]:
    """One row per stage of registered model `name` (stage widths, strides 4, 8, 16, 32)."""
    dims = get_spec(name).arch["dims"]
    return [
        token_row(task, f"{name} stage {i + 1}", dim, height, width, 4 * 2**i, causal, pad=True)
        for i, dim in enumerate(dims)
    ]


def paper_table(causal: bool = False) -> list[TokenRow]:
    """The paper's analysis: ViT-S and ViT-B at 16² patches, and MambaOut-Tiny's stages, on its three tasks."""
    rows = []
    for task, height, width in PAPER_TASKS:
        rows += [token_row(task, model, dim, height, width, PATCH, causal) for model, dim in PAPER_MODELS]
        rows += model_rows("mambaout_tiny", task, height, width, causal)
    return rows


def markdown(rows: list[TokenRow], causal: bool = False) -> str:
    """The rows as a Markdown table, FLOPs in GFLOPs per block and image."""
    quadratic = "2·D·L²" if causal else "4·D·L²"
    lines = [
        f"| task | model | input | stride | D | τ = 6·D | L | linear GFLOPs (24·D²·L) | attention GFLOPs ({quadratic}) "
        "| attention share | long (L > τ) |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.flops_attention / (r.flops_linear + r.flops_attention)
        lines.append(
            f"| {r.task} | {r.model} | {r.input[0]}×{r.input[1]} | {r.stride} | {r.D} | {r.tau} | {r.L} | "
            f"{r.flops_linear / 1e9:.2f} | {r.flops_attention / 1e9:.2f} | {100 * share:.0f}% | "
            f"{'yes' if r.long else 'no'} |"
        )
    return "\n".join(lines)
