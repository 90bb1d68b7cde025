"""The ablation's summary: per-mixer mean ± std over seeds as a Markdown table, and accuracy beside speed as a PNG."""

import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mambaout.weights.io import atomic_write

__all__ = ["MixerSummary", "plot_ablation", "results_markdown", "summarize"]


@dataclass(frozen=True)
class MixerSummary:
    """One mixer's runs, summarised (speeds and wall time as medians over the runs)."""

    mixer: str
    runs: int
    top1: float
    top1_std: float
    top5: float
    params: int
    macs: int
    train_img_per_s: float | None
    infer_img_per_s: float
    wall_s: float


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: list[dict[str, Any]]) -> list[MixerSummary]:
    """Per mixer, in the order the results first name them: mean ± sample std of top-1 over seeds and the rest."""
    by_mixer: dict[str, list[dict[str, Any]]] = {}
    for r in results:
        by_mixer.setdefault(r["mixer"], []).append(r)
    rows = []
    for mixer, runs in by_mixer.items():
        top1 = [r["top1"] for r in runs]
        rows.append(
            MixerSummary(
                mixer=mixer,
                runs=len(runs),
                top1=statistics.fmean(top1),
                top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
                top5=statistics.fmean(r["top5"] for r in runs),
                params=runs[0]["params"],
                macs=runs[0]["macs"],
                train_img_per_s=_median([r.get("train_img_per_s") for r in runs]),
                infer_img_per_s=_median([r["infer_img_per_s"] for r in runs]),
                wall_s=_median([r["wall_s"] for r in runs]),
            )
        )
    return rows


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def results_markdown(results: list[dict[str, Any]], title: str, command: str) -> str:
    """The ablation table: one row per mixer, with each row's top-1 difference to `conv` (when conv ran)."""
    rows = summarize(results)
    conv = next((r for r in rows if r.mixer == "conv"), None)
    seeds = sorted({r["seed"] for r in results})
    loads = sorted({r["load"] for r in results if r.get("load")})
    lines = [
        f"### Token-mixer ablation: {title}",
        "",
        f"- command: `{command}`",
        f"- seeds {', '.join(map(str, seeds))}; top-1/top-5: validation accuracy (%) after the last epoch, mean ± "
        "sample std over the seeds; params and MACs per image at the training size (MACs: FlopCounterMode / 2, "
        "the selective scan by its analytic count); train img/s: median of the engine's per-epoch figure; "
        "inference img/s: eval mode, no grad, one training-size batch; speeds and wall time are medians over runs",
        f"- load average (1/5/15 min) when the runs ended: {'; '.join(loads) if loads else 'n/a'}",
        "",
        "| mixer | runs | top-1 (mean ± std) | Δ top-1 vs conv | top-5 | params (M) | MMACs/img | train img/s "
        "| inference img/s | wall per run (s) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        delta = "-" if conv is None or r is conv else f"{r.top1 - conv.top1:+.2f}"
        lines.append(
            f"| {r.mixer} | {r.runs} | {r.top1:.2f} ± {r.top1_std:.2f} | {delta} | {r.top5:.2f} | "
            f"{r.params / 1e6:.3f} | {r.macs / 1e6:.1f} | {_fmt(r.train_img_per_s)} | {_fmt(r.infer_img_per_s)} | "
            f"{_fmt(r.wall_s)} |"
        )
    return "\n".join(lines) + "\n"


def plot_ablation(results: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Top-1 per mixer (bars with ± std error bars) beside training and inference speed, written atomically."""
    rows = summarize(results)
    names = [r.mixer for r in rows]
    x = range(len(rows))
    fig = Figure(figsize=(12, 4.2))  # no pyplot: no GUI backend, no global figure state
    accuracy, speed = fig.subplots(1, 2)
    accuracy.bar(x, [r.top1 for r in rows], yerr=[r.top1_std for r in rows], capsize=4, color="tab:blue")
    low = min(r.top1 - r.top1_std for r in rows)
    accuracy.set_ylim(max(0.0, low - 2), 100)
    accuracy.set_ylabel("val top-1 (%), mean ± std over seeds")
    width = 0.4
    speed.bar([i - width / 2 for i in x], [r.train_img_per_s or 0 for r in rows], width, label="train")
    speed.bar([i + width / 2 for i in x], [r.infer_img_per_s for r in rows], width, label="inference")
    speed.set_ylabel("images/s")
    speed.legend()
    for ax in (accuracy, speed):
        ax.set_xticks(list(x), names, rotation=20)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path
