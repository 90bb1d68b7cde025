"""Training curves from a run's `metrics.jsonl`: loss, accuracy (or AP, mIoU) and learning rate against epochs, as
one PNG."""

import os
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure

from mambaout.outputs import PNG_SOFTWARE
from mambaout.weights.io import atomic_write

__all__ = ["plot_curves"]

_PANELS = (
    ("loss", (("train_loss", "train"), ("val_loss", "val"), ("val_loss_ema", "val (EMA)"))),
    (
        "accuracy, AP, mIoU (%)",
        (
            ("val_top1", "top-1"),
            ("val_top5", "top-5"),
            ("val_top1_ema", "top-1 (EMA)"),
            ("val_bbox_ap", "box AP"),
            ("val_segm_ap", "mask AP"),
            ("val_bbox_ap_ema", "box AP (EMA)"),
            ("val_miou", "mIoU"),
            ("val_aacc", "aAcc"),
            ("val_miou_ema", "mIoU (EMA)"),
        ),
    ),
    ("learning rate", (("lr", "lr"),)),
)


def plot_curves(records: list[dict[str, Any]], path: str | os.PathLike, title: str = "") -> Path:
    """Draw three panels (loss, accuracy, learning rate) over epochs and write them atomically to `path`.

    Args:
        records: Lines of `metrics.jsonl`; missing or null values (epochs without evaluation) leave gaps.
        path: The PNG to write.
        title: Figure title, e.g. the run folder.
    """
    path = Path(path)
    fig = Figure(figsize=(15, 4.2))  # no pyplot: no GUI backend, no global figure state
    axes = fig.subplots(1, len(_PANELS))
    for ax, (ylabel, series) in zip(axes, _PANELS, strict=True):
        for key, label in series:
            points = [(r["epoch"], r[key]) for r in records if r.get(key) is not None]
            if points:
                epochs, values = zip(*points, strict=True)
                ax.plot(epochs, values, marker="." if len(points) < 50 else None, label=label)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend()
    axes[2].set_yscale("log")
    fig.suptitle(title)
    fig.tight_layout()
    with atomic_write(path) as f:
        fig.savefig(f, format="png", dpi=100, metadata={"Software": PNG_SOFTWARE})  # tells our plots from photos
    return path
