"""The ablation's summary: one row per setting (mixer and grid values) over seeds, as a Markdown table and a PNG.

Each row's top-1 is compared with the first row's paired by seed: on the seeds both rows ran, the differences
d_s = top1(row, s) - top1(first, s) give mean(d) ± t(0.975, n-1) · sd(d) / √n, Student's 95% interval for the mean
difference. Pairing removes what a seed does to both rows alike (initialisation, data order), so it is narrower than
comparing two means; it still only says what these seeds show.
"""

import json
import math
import os
import statistics
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from scipy import stats

from mambaout.weights.io import atomic_write

__all__ = [
    "PairedDifference",
    "RowSummary",
    "mean_interval",
    "paired_difference",
    "plot_ablation",
    "record_settings",
    "results_markdown",
    "row_label",
    "settings_key",
    "summarize",
]

CONFIDENCE = 0.95


def record_settings(record: dict[str, Any]) -> dict[str, Any]:
    """A results.jsonl line's settings (token_mixer first, then the grid's keys); lines from before the grid
    existed hold only their mixer."""
    return record.get("settings") or {"token_mixer": record["mixer"]}


def settings_key(settings: dict[str, Any]) -> str:
    """A hashable key of one row's settings, the same whatever the order of the keys."""
    return json.dumps(settings, sort_keys=True)


def value_text(value: Any) -> str:
    """A setting's value as a table cell or label shows it: strings bare, the rest as JSON (`[16, 32]`, `true`)."""
    return value if isinstance(value, str) else json.dumps(value)


def row_label(settings: dict[str, Any]) -> str:
    """`conv, kernel_size=7`: the mixer bare, the grid's values as key=value."""
    return ", ".join(value_text(v) if k == "token_mixer" else f"{k}={value_text(v)}" for k, v in settings.items())


def mean_interval(values: list[float], confidence: float = CONFIDENCE) -> float | None:
    """Half-width of Student's t interval for the mean of `values` (None for fewer than two)."""
    n = len(values)
    if n < 2:
        return None
    return float(stats.t.ppf((1 + confidence) / 2, n - 1)) * statistics.stdev(values) / math.sqrt(n)


@dataclass(frozen=True)
class PairedDifference:
    """A row's top-1 minus the reference row's, over the seeds both ran.

    Attributes:
        n: Seeds both rows ran (the pairs).
        mean: Mean of the per-seed differences, in top-1 points; None when no seed is shared.
        low: Lower end of the 95% interval; None when n < 2.
        high: Upper end of the 95% interval; None when n < 2.
    """

    n: int
    mean: float | None
    low: float | None
    high: float | None

    @property
    def excludes_zero(self) -> bool:
        return self.low is not None and self.high is not None and (self.low > 0 or self.high < 0)

    def text(self) -> str:
        """`+1.23 [-0.40, +2.86]`, with a trailing `*` when the interval excludes 0."""
        if self.mean is None:
            return "no shared seed"
        if self.low is None or self.high is None:
            return f"{self.mean:+.2f} (n=1, no interval)"
        return f"{self.mean:+.2f} [{self.low:+.2f}, {self.high:+.2f}]{' *' if self.excludes_zero else ''}"


def paired_difference(top1: dict[int, float], reference: dict[int, float]) -> PairedDifference:
    """`top1 - reference` paired by seed (each maps seed -> top-1), with Student's 95% interval of the mean."""
    seeds = sorted(top1.keys() & reference.keys())
    differences = [top1[s] - reference[s] for s in seeds]
    if not differences:
        return PairedDifference(0, None, None, None)
    mean = statistics.fmean(differences)
    half = mean_interval(differences)
    if half is None:
        return PairedDifference(1, mean, None, None)
    return PairedDifference(len(differences), mean, mean - half, mean + half)


@dataclass(frozen=True)
class RowSummary:
    """One row's runs, summarised (speeds and wall time as medians over the runs).

    Attributes:
        settings: The row's value of every axis, token_mixer first.
        top1_by_seed: Top-1 of each seed's run.
        top1_interval: Half-width of the 95% interval of the mean top-1 over seeds (None for one seed).
        num_classes: The runs' number of classes (None for records without it, or runs that differ).
        delta: Top-1 against the first row, paired by seed (None for the first row).
    """

    settings: dict[str, Any]
    runs: int
    top1_by_seed: dict[int, float]
    top1: float
    top1_std: float
    top1_interval: float | None
    top5: float
    params: int
    macs: int
    train_img_per_s: float | None
    infer_img_per_s: float
    wall_s: float
    num_classes: int | None
    delta: PairedDifference | None

    @property
    def label(self) -> str:
        return row_label(self.settings)

    @property
    def chance(self) -> float | None:
        """Top-1 (%) of guessing."""
        return 100 / self.num_classes if self.num_classes else None


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def summarize(results: list[dict[str, Any]], order: list[dict[str, Any]] | None = None) -> list[RowSummary]:
    """Per row: mean ± sample std of top-1 over seeds, its 95% interval, the difference to the first row and the rest.

    Args:
        results: results.jsonl's records.
        order: Rows (settings) in the order to show them, the first being the reference; rows of `results` not in
            it follow in the order the results first name them.
    """
    by_row: dict[str, list[dict[str, Any]]] = {settings_key(s): [] for s in order or []}
    for r in results:
        by_row.setdefault(settings_key(record_settings(r)), []).append(r)
    rows: list[RowSummary] = []
    for runs in by_row.values():
        if not runs:
            continue
        top1 = [r["top1"] for r in runs]
        by_seed = {r["seed"]: r["top1"] for r in runs}
        classes = {r.get("num_classes") for r in runs}
        rows.append(
            RowSummary(
                settings=record_settings(runs[0]),
                runs=len(runs),
                top1_by_seed=by_seed,
                top1=statistics.fmean(top1),
                top1_std=statistics.stdev(top1) if len(top1) > 1 else 0.0,
                top1_interval=mean_interval(top1),
                top5=statistics.fmean(r["top5"] for r in runs),
                params=runs[0]["params"],
                macs=runs[0]["macs"],
                train_img_per_s=_median([r.get("train_img_per_s") for r in runs]),
                infer_img_per_s=_median([r["infer_img_per_s"] for r in runs]),
                wall_s=_median([r["wall_s"] for r in runs]),
                num_classes=next(iter(classes)) if len(classes) == 1 else None,
                delta=paired_difference(by_seed, rows[0].top1_by_seed) if rows else None,
            )
        )
    return rows


def _fmt(x: float | None, digits: int = 0) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _chance_note(rows: list[RowSummary]) -> str:
    classes = {r.num_classes for r in rows}
    if None in classes or not classes:
        return "n/a (runs recorded without their number of classes)"
    if len(classes) == 1:
        (n,) = classes
        return f"{100 / n:.2f}% top-1 (1 of {n} classes)"
    return "per row, 100 / classes: " + "; ".join(f"{r.label} {r.chance:.2f}%" for r in rows)


def results_markdown(
    results: list[dict[str, Any]], title: str, command: str, order: list[dict[str, Any]] | None = None
) -> str:
    """The ablation table: one row per setting (in `order`, see `summarize`), each with its top-1 difference to
    the first row and that difference's 95% interval over seeds, paired by seed."""
    rows = summarize(results, order)
    keys = list(rows[0].settings) if rows else ["token_mixer"]
    seeds = sorted({r["seed"] for r in results})
    loads = sorted({r["load"] for r in results if r.get("load")})
    reference = rows[0].label if rows else "the first row"
    header = ["mixer" if k == "token_mixer" else k for k in keys]
    header += ["runs", "top-1 (mean ± std)", f"Δ top-1 vs {reference} [95% CI]", "n", "top-5", "params (M)"]
    header += ["MMACs/img", "train img/s", "inference img/s", "wall per run (s)"]
    lines = [
        f"### Ablation: {title}",
        "",
        f"- command: `{command}`",
        f"- seeds {', '.join(map(str, seeds))}; top-1/top-5: validation accuracy (%) after the last epoch, mean ± "
        "sample std over the seeds; params and MACs per image at the training size (MACs: FlopCounterMode / 2, "
        "the selective scan by its analytic count); train img/s: median of the engine's per-epoch figure; "
        "inference img/s: eval mode, no grad, one training-size batch; speeds and wall time are medians over runs",
        f"- Δ top-1: each row minus the first row ({reference}) on the n seeds both ran, paired by seed: mean "
        "[95% interval, mean ± t(0.975, n-1) · sd / √n]; `*`: the interval excludes zero; an interval that "
        "contains 0 is no evidence of a difference (nor evidence of none)",
        f"- chance: {_chance_note(rows)}",
        f"- load average (1/5/15 min) when the runs ended: {'; '.join(loads) if loads else 'n/a'}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        delta = "reference" if r.delta is None else r.delta.text()
        paired = len(r.top1_by_seed) if r.delta is None else r.delta.n
        cells = [_cell(value_text(r.settings.get(k))) for k in keys]
        cells += [str(r.runs), f"{r.top1:.2f} ± {r.top1_std:.2f}", delta, str(paired), f"{r.top5:.2f}"]
        cells += [f"{r.params / 1e6:.3f}", f"{r.macs / 1e6:.1f}", _fmt(r.train_img_per_s)]
        cells += [_fmt(r.infer_img_per_s), _fmt(r.wall_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(
    results: list[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    order: list[dict[str, Any]] | None = None,
    chance: float | None = None,
) -> Path:
    """Top-1 per row (bars with their 95% interval over seeds) beside training and inference speed, written
    atomically.

    Args:
        results: results.jsonl's records.
        path: The PNG to write.
        title: The figure's title.
        order: The rows' order (see `summarize`).
        chance: Top-1 (%) of guessing, drawn as a dashed line; None: 100 / the records' `num_classes` per row,
            when recorded.
    """
    rows = summarize(results, order)
    x = list(range(len(rows)))
    fig = Figure(figsize=(max(12, 1.2 * len(rows) + 4), 4.6))  # no pyplot: no GUI backend, no global figure state
    accuracy, speed = fig.subplots(1, 2)
    halves = [r.top1_interval or 0.0 for r in rows]
    accuracy.bar(x, [r.top1 for r in rows], yerr=halves, capsize=4, color="tab:blue")
    levels = [chance] * len(rows) if chance is not None else [r.chance for r in rows]
    if len(set(levels)) == 1 and levels[0] is not None:
        accuracy.axhline(levels[0], color="gray", linestyle="--", label=f"chance ({levels[0]:.3g}%)")
        accuracy.legend(loc="best")
    else:
        for i, level in zip(x, levels, strict=True):
            if level is not None:
                accuracy.hlines(level, i - 0.45, i + 0.45, color="gray", linestyle="--")
    low = min([r.top1 - h for r, h in zip(rows, halves, strict=True)] + [v for v in levels if v is not None], default=0)
    accuracy.set_ylim(max(0.0, low - 2), 100)
    accuracy.set_ylabel("val top-1 (%): mean, 95% interval over seeds")
    width = 0.4
    speed.bar([i - width / 2 for i in x], [r.train_img_per_s or 0 for r in rows], width, label="train")
    speed.bar([i + width / 2 for i in x], [r.infer_img_per_s for r in rows], width, label="inference")
    speed.set_ylabel("images/s")
    speed.legend()
    names = [r.label.replace(", ", "\n") for r in rows]
    for ax in (accuracy, speed):
        ax.set_xticks(x, names, rotation=20, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100)
    return path
