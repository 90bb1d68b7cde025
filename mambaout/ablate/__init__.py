"""The paper's argument at a scale anyone can rerun: the long-sequence analysis and the token-mixer ablation."""

from mambaout.ablate.report import MixerSummary, plot_ablation, results_markdown, summarize
from mambaout.ablate.runner import DEFAULT_MIXERS, AblationSettings, run_ablation
from mambaout.ablate.tokens import TokenRow, model_rows, paper_table, token_row, transformer_flops

__all__ = [
    "DEFAULT_MIXERS",
    "AblationSettings",
    "MixerSummary",
    "TokenRow",
    "model_rows",
    "paper_table",
    "plot_ablation",
    "results_markdown",
    "run_ablation",
    "summarize",
    "token_row",
    "transformer_flops",
]
