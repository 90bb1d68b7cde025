"""The ablation's summary: one row per setting (mixer and grid values) over seeds, as a Markdown table and a PNG.

The figure summarised is the report's metric (`--metric`): a classification ablation's `top1` (default) or `top5`,
a segmentation ablation's `miou` (default), `macc`, `aacc` or `iou:CLASS` (one class's IoU from `class_iou`). Each
row's figure is compared with the first row's paired by seed: on the seeds both rows ran, the differences
d_s = m(row, s) - m(first, s) give mean(d) ± t(0.975, n-1) · sd(d) / √n, Student's 95% interval for the mean
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

from mambaout.outputs import PNG_SOFTWARE
from mambaout.weights.io import atomic_write

__all__ = [
    "CLASSIFY_METRICS",
    "SEGMENT_METRICS",
    "PairedDifference",
    "RowSummary",
    "mean_interval",
    "metric_label",
    "metric_value",
    "paired_difference",
    "plot_ablation",
    "record_settings",
    "results_markdown",
    "row_label",
    "settings_key",
    "summarize",
]

CONFIDENCE = 0.95
CLASSIFY_METRICS = ("top1", "top5")
SEGMENT_METRICS = ("miou", "macc", "aacc")  # and iou:CLASS
CLASS_IOU = "iou:"
_TOP_K = {"top1": 1, "top5": 5}
_LABELS = {"top1": "top-1", "top5": "top-5", "miou": "mIoU", "macc": "mAcc", "aacc": "aAcc"}


def metric_label(metric: str) -> str:
    """How tables and plots name `metric`: `top-1`, `mIoU`, `IoU target_joined`."""
    return f"IoU {metric.removeprefix(CLASS_IOU)}" if metric.startswith(CLASS_IOU) else _LABELS[metric]


def metric_value(record: dict[str, Any], metric: str) -> float | None:
    """A results.jsonl line's `metric` (percent); None for a class's IoU where the class was neither in the
    validation labels nor predicted."""
    if metric.startswith(CLASS_IOU):
        return record["class_iou"][metric.removeprefix(CLASS_IOU)]
    return record[metric]


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
    """A row's metric minus the reference row's, over the seeds both ran.

    Attributes:
        n: Seeds both rows ran (the pairs).
        mean: Mean of the per-seed differences, in the metric's points; None when no seed is shared.
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


def paired_difference(values: dict[int, float], reference: dict[int, float]) -> PairedDifference:
    """`values - reference` paired by seed (each maps seed -> the metric), with Student's 95% interval of the mean."""
    seeds = sorted(values.keys() & reference.keys())
    differences = [values[s] - reference[s] for s in seeds]
    if not differences:
        return PairedDifference(0, None, None, None)
    mean = statistics.fmean(differences)
    half = mean_interval(differences)
    if half is None:
        return PairedDifference(1, mean, None, None)
    return PairedDifference(len(differences), mean, mean - half, mean + half)


@dataclass(frozen=True)
class RowSummary:
    """One row's runs, summarised for one metric (speeds and wall time as medians over the runs).

    Attributes:
        settings: The row's value of every axis, token_mixer first.
        runs: Runs recorded.
        metric: What `by_seed`, `mean`, `std`, `interval` and `delta` are of (`top1`, `miou`, `iou:CLASS`, ...).
        by_seed: The metric of each seed's run (seeds where it is undefined left out).
        mean: Its mean over `by_seed`; None when no run defines it.
        std: Its sample standard deviation (0 for one run; None for none).
        interval: Half-width of the 95% interval of the mean over seeds (None for fewer than two).
        others: The mean of each of the task's other figures (`top5` beside `top1`; `miou`, `macc`, `aacc` less the
            metric), by name.
        params: Parameters of the trained model (the whole segmenter for segmentation).
        backbone_params: The backbone's alone (segmentation; None for classification).
        macs: Multiply-accumulates per image (None where not counted).
        num_classes: The runs' number of classes (None for records without it, or runs that differ).
        chance: The metric of guessing, percent (classification; None for segmentation or unknown classes).
        delta: The metric against the first row, paired by seed (None for the first row).
    """

    settings: dict[str, Any]
    runs: int
    metric: str
    by_seed: dict[int, float]
    mean: float | None
    std: float | None
    interval: float | None
    others: dict[str, float | None]
    params: int
    backbone_params: int | None
    macs: int | None
    train_img_per_s: float | None
    infer_img_per_s: float | None
    wall_s: float | None
    num_classes: int | None
    chance: float | None
    delta: PairedDifference | None

    @property
    def label(self) -> str:
        return row_label(self.settings)


def _median(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.median(present) if present else None


def _mean(values: list[float | None]) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _chance(metric: str, num_classes: int | None) -> float | None:
    """Top-k accuracy (%) of guessing among `num_classes`; None for segmentation's figures."""
    if metric not in CLASSIFY_METRICS or not num_classes:
        return None
    return 100 * min(_TOP_K[metric], num_classes) / num_classes


def _other_metrics(metric: str) -> tuple[str, ...]:
    family = CLASSIFY_METRICS if metric in CLASSIFY_METRICS else SEGMENT_METRICS
    return tuple(m for m in family if m != metric)


def summarize(
    results: list[dict[str, Any]], order: list[dict[str, Any]] | None = None, metric: str = "top1"
) -> list[RowSummary]:
    """Per row: mean ± sample std of `metric` over seeds, its 95% interval, the difference to the first row and the
    rest.

    Args:
        results: results.jsonl's records.
        order: Rows (settings) in the order to show them, the first being the reference; rows of `results` not in
            it follow in the order the results first name them.
        metric: The figure compared (see the module's docstring).
    """
    by_row: dict[str, list[dict[str, Any]]] = {settings_key(s): [] for s in order or []}
    for r in results:
        by_row.setdefault(settings_key(record_settings(r)), []).append(r)
    rows: list[RowSummary] = []
    for runs in by_row.values():
        if not runs:
            continue
        by_seed = {r["seed"]: v for r in runs if (v := metric_value(r, metric)) is not None}
        values = list(by_seed.values())
        classes = {r.get("num_classes") for r in runs}
        num_classes = next(iter(classes)) if len(classes) == 1 else None
        rows.append(
            RowSummary(
                settings=record_settings(runs[0]),
                runs=len(runs),
                metric=metric,
                by_seed=by_seed,
                mean=statistics.fmean(values) if values else None,
                std=(statistics.stdev(values) if len(values) > 1 else 0.0) if values else None,
                interval=mean_interval(values),
                others={m: _mean([r.get(m) for r in runs]) for m in _other_metrics(metric)},
                params=runs[0]["params"],
                backbone_params=runs[0].get("backbone_params"),
                macs=runs[0].get("macs"),
                train_img_per_s=_median([r.get("train_img_per_s") for r in runs]),
                infer_img_per_s=_median([r.get("infer_img_per_s") for r in runs]),
                wall_s=_median([r.get("wall_s") for r in runs]),
                num_classes=num_classes,
                chance=_chance(metric, num_classes),
                delta=paired_difference(by_seed, rows[0].by_seed) if rows else None,
            )
        )
    return rows


def _fmt(x: float | None, digits: int = 0, scale: float = 1.0) -> str:
    return "-" if x is None else f"{x / scale:.{digits}f}"


def _cell(text: str) -> str:
    return text.replace("|", "\\|")


def _chance_note(rows: list[RowSummary], metric: str) -> str:
    classes = {r.num_classes for r in rows}
    label = metric_label(metric)
    if None in classes or not classes:
        return "n/a (runs recorded without their number of classes)"
    if len(classes) == 1:
        (n,) = classes
        return f"{_chance(metric, n):.2f}% {label} ({min(_TOP_K[metric], n)} of {n} classes)"
    rule = "100 / classes" if metric == "top1" else "100 · min(5, classes) / classes"
    return f"per row, {rule}: " + "; ".join(f"{r.label} {r.chance:.2f}%" for r in rows)


def _figures_note(metric: str) -> str:
    """What the table's figures are and how they were measured."""
    if metric in CLASSIFY_METRICS:
        return (
            "top-1/top-5: validation accuracy (%) after the last epoch, mean ± sample std over the seeds; params and "
            "MACs per image at the training size (MACs: FlopCounterMode / 2, the selective scan by its analytic "
            "count); train img/s: median of the engine's per-epoch figure; inference img/s: eval mode, no grad, "
            "one training-size batch"
        )
    return (
        "mIoU/mAcc/aAcc and each class's IoU (results.jsonl's class_iou): validation figures (%) of each run's last "
        "checkpoint, evaluated as `mambaout segment eval` does (whole images), mean ± sample std over the seeds "
        "(a class's IoU is left out of the runs where the class was neither labelled nor predicted); params: the "
        "whole segmenter, and its backbone alone; MACs per image at the crop size (FlopCounterMode / 2, the "
        "selective scan by its analytic count; the auxiliary head is not run at test time, so not counted); train "
        "img/s: median of the engine's per-epoch figure; inference img/s: eval mode, no grad, one batch of crops"
    )


def results_markdown(
    results: list[dict[str, Any]],
    title: str,
    command: str,
    order: list[dict[str, Any]] | None = None,
    metric: str = "top1",
) -> str:
    """The ablation table: one row per setting (in `order`, see `summarize`), each with its `metric` difference to
    the first row and that difference's 95% interval over seeds, paired by seed."""
    rows = summarize(results, order, metric)
    keys = list(rows[0].settings) if rows else ["token_mixer"]
    seeds = sorted({r["seed"] for r in results})
    loads = sorted({r["load"] for r in results if r.get("load")})
    reference = rows[0].label if rows else "the first row"
    label, others = metric_label(metric), _other_metrics(metric)
    segmentation = metric not in CLASSIFY_METRICS
    header = ["mixer" if k == "token_mixer" else k for k in keys]
    header += ["runs", f"{label} (mean ± std)", f"Δ {label} vs {reference} [95% CI]", "n", *map(metric_label, others)]
    header += ["params (M)", *(["backbone params (M)"] if segmentation else []), "MMACs/img"]
    header += ["train img/s", "inference img/s", "wall per run (s)"]
    lines = [
        f"### Ablation: {title}",
        "",
        f"- command: `{command}`",
        f"- seeds {', '.join(map(str, seeds))}; {_figures_note(metric)}; speeds and wall time are medians over runs",
        f"- Δ {label}: each row minus the first row ({reference}) on the n seeds both ran, paired by seed: mean "
        "[95% interval, mean ± t(0.975, n-1) · sd / √n]; `*`: the interval excludes zero; an interval that "
        "contains 0 is no evidence of a difference (nor evidence of none)",
        *([] if segmentation else [f"- chance: {_chance_note(rows, metric)}"]),
        f"- load average (1/5/15 min) when the runs ended: {'; '.join(loads) if loads else 'n/a'}",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for r in rows:
        delta = "reference" if r.delta is None else r.delta.text()
        paired = len(r.by_seed) if r.delta is None else r.delta.n
        spread = "-" if r.mean is None else f"{r.mean:.2f} ± {r.std:.2f}"
        cells = [_cell(value_text(r.settings.get(k))) for k in keys]
        cells += [str(r.runs), spread, delta, str(paired), *(_fmt(r.others[m], 2) for m in others)]
        cells += [_fmt(r.params, 3, 1e6), *([_fmt(r.backbone_params, 3, 1e6)] if segmentation else [])]
        cells += [_fmt(r.macs, 1, 1e6), _fmt(r.train_img_per_s), _fmt(r.infer_img_per_s), _fmt(r.wall_s)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_ablation(
    results: list[dict[str, Any]],
    path: str | os.PathLike,
    title: str = "",
    order: list[dict[str, Any]] | None = None,
    chance: float | None = None,
    metric: str = "top1",
) -> Path:
    """`metric` per row (bars with their 95% interval over seeds) beside training and inference speed, written
    atomically.

    Args:
        results: results.jsonl's records.
        path: The PNG to write.
        title: The figure's title.
        order: The rows' order (see `summarize`).
        chance: The metric (%) of guessing, drawn as a dashed line; None: for classification, from the records'
            `num_classes` per row when recorded (segmentation draws none).
        metric: The figure shown (see the module's docstring).
    """
    rows = summarize(results, order, metric)
    x = list(range(len(rows)))
    fig = Figure(figsize=(max(12, 1.2 * len(rows) + 4), 4.6))  # no pyplot: no GUI backend, no global figure state
    accuracy, speed = fig.subplots(1, 2)
    halves = [r.interval or 0.0 for r in rows]
    means = [r.mean or 0.0 for r in rows]
    accuracy.bar(x, means, yerr=halves, capsize=4, color="tab:blue")
    levels = [chance] * len(rows) if chance is not None else [r.chance for r in rows]
    if len(set(levels)) == 1 and levels[0] is not None:
        accuracy.axhline(levels[0], color="gray", linestyle="--", label=f"chance ({levels[0]:.3g}%)")
        accuracy.legend(loc="best")
    else:
        for i, level in zip(x, levels, strict=True):
            if level is not None:
                accuracy.hlines(level, i - 0.45, i + 0.45, color="gray", linestyle="--")
    low = min([m - h for m, h in zip(means, halves, strict=True)] + [v for v in levels if v is not None], default=0)
    accuracy.set_ylim(max(0.0, low - 2), 100)
    accuracy.set_ylabel(f"val {metric_label(metric)} (%): mean, 95% interval over seeds")
    width = 0.4
    speed.bar([i - width / 2 for i in x], [r.train_img_per_s or 0 for r in rows], width, label="train")
    speed.bar([i + width / 2 for i in x], [r.infer_img_per_s or 0 for r in rows], width, label="inference")
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
        fig.savefig(f, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})  # tells our plots from photos
    return path
