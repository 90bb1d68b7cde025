"""The paper's argument at a scale anyone can rerun: the long-sequence analysis, measured cost against tokens, the
token-mixer ablation (classification or segmentation, with a grid of further settings, compared paired by seed on
a chosen metric: top-1, mIoU, one class's IoU, ...), and the mixers' effective receptive fields."""

from mambaout.ablate.erf import (
    DEFAULT_ERF_MIXERS,
    ErfMap,
    ErfSettings,
    effective_receptive_field,
    mass_radii,
    plot_erf,
    run_erf,
)
from mambaout.ablate.report import (
    CLASSIFY_METRICS,
    SEGMENT_METRICS,
    PairedDifference,
    RowSummary,
    paired_difference,
    plot_ablation,
    results_markdown,
    summarize,
)
from mambaout.ablate.runner import DEFAULT_MIXERS, AblationSettings, parse_grid, run_ablation
from mambaout.ablate.scaling import (
    ScalingResult,
    ScalingSettings,
    crossover_tokens,
    find_crossovers,
    growth_exponent,
    growth_fits,
    plot_scaling,
    run_scaling,
    scaling_markdown,
    write_scaling_json,
)
from mambaout.ablate.tokens import TokenRow, model_rows, paper_table, token_row, transformer_flops

__all__ = [
    "CLASSIFY_METRICS",
    "DEFAULT_ERF_MIXERS",
    "DEFAULT_MIXERS",
    "SEGMENT_METRICS",
    "AblationSettings",
    "ErfMap",
    "ErfSettings",
    "PairedDifference",
    "RowSummary",
    "ScalingResult",
    "ScalingSettings",
    "TokenRow",
    "crossover_tokens",
    "effective_receptive_field",
    "find_crossovers",
    "growth_exponent",
    "growth_fits",
    "mass_radii",
    "model_rows",
    "paired_difference",
    "paper_table",
    "parse_grid",
    "plot_ablation",
    "plot_erf",
    "plot_scaling",
    "results_markdown",
    "run_ablation",
    "run_erf",
    "run_scaling",
    "scaling_markdown",
    "summarize",
    "token_row",
    "transformer_flops",
    "write_scaling_json",
]
