"""A benchmark's figures in timm's `benchmark.py` columns (`mambaout bench --csv`), to set beside timm's tables.

timm publishes its throughput tables (`results/benchmark-infer-*.csv`, `benchmark-train-*.csv` in
huggingface/pytorch-image-models, MambaOut included) as `benchmark.py --results-file` output: one row per model and
input size, `infer_samples_per_sec`, `infer_step_time` (ms), `infer_batch_size`, `infer_img_size`, `infer_gmacs` (per
image), `param_count` (millions), or the `train_*` columns of a training step, which have no GMACs. We write those
columns, in `benchmark.py`'s order and rounded as it rounds them, one row per benchmark path:

- `model` is timm's name of the network the row runs, so that the file joins timm's on `model` and
  `infer_img_size`: the variant itself (every path runs it with the same weights); with `--token-mixer`,
  `<variant>+<mixer>`, a network timm does not have, which no join pairs with timm's row.
- `mambaout_path`, our one column after timm's, names the path ("timm eager", "mambaout fast", ...). Readers that take
  timm's columns by name (pandas, `csv.DictReader`) pass it by; its name tells our files from timm's.
- The step time is the median call's and samples/s is the batch over it, the figures of the Markdown table; timm's
  are the mean of consecutive calls and the batches over the loop's wall time.
"""

import csv
import io
from pathlib import Path

from mambaout.bench.run import BenchReport
from mambaout.weights.io import atomic_write

__all__ = ["PATH_COLUMN", "timm_columns", "timm_rows", "write_timm_csv"]

PATH_COLUMN = "mambaout_path"


def timm_columns(train: bool) -> list[str]:
    """The header: timm's inference (or, with `train`, training-step) columns, then `PATH_COLUMN`."""
    prefix = "train" if train else "infer"
    timed = [f"{prefix}_{c}" for c in ("samples_per_sec", "step_time", "batch_size", "img_size")]
    return ["model", *timed, *([] if train else ["infer_gmacs"]), "param_count", PATH_COLUMN]


def timm_rows(report: BenchReport) -> list[dict[str, str | int | float]]:
    """One row per measured path, keyed by `timm_columns`."""
    s = report.settings
    prefix = "train" if s.train else "infer"
    rows = []
    for r in report.results:
        row: dict[str, str | int | float] = {
            "model": f"{s.model}+{r.name}" if s.token_mixers else s.model,
            f"{prefix}_samples_per_sec": round(r.images_per_s(s.batch_size), 2),
            f"{prefix}_step_time": round(r.quantile_ms(0.5), 3),  # the median call, the table's p50
            f"{prefix}_batch_size": s.batch_size,
            f"{prefix}_img_size": s.img_size,
        }
        if not s.train:
            row["infer_gmacs"] = round((r.macs or report.macs) / 1e9, 2)
        row["param_count"] = round((r.params or report.params) / 1e6, 2)
        row[PATH_COLUMN] = r.name
        rows.append(row)
    return rows


def write_timm_csv(path: Path, report: BenchReport) -> None:
    """Write `report` as timm's benchmark CSV to `path` (atomically; `\\r\\n` line ends, as timm's files have)."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=timm_columns(report.settings.train))
    writer.writeheader()
    writer.writerows(timm_rows(report))
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as f:
        f.write(text.getvalue().encode())
