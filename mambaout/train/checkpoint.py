"""Training checkpoints: what a run saves to continue exactly, written atomically, read back without unpickling code.

A checkpoint is a dict of tensors and plain Python values, so `torch.load(weights_only=True)` reads it:

    model, ema          state dicts (ema None without --ema)
    optimizer, scaler   their state dicts (scaler None without fp16); the learning-rate schedule is not saved: it is a
                        function of the config and the step, recomputed on resume
    rng                 per rank: torch CPU/CUDA, numpy and python generator states
    epoch               epochs completed; `epoch_progress` tells how far the next one got (mid-epoch saves)
    step                optimizer steps completed
    config              the resolved config (TrainConfig, DetectConfig, SegmentConfig) as a dict; class_names,
                        model_name; `task` ("detection", "segmentation") and `category_ids` for the dense tasks
    best_top1, metrics  best validation top-1 so far (`best_bbox_ap`, `best_miou` for the dense tasks) and the
                        last epoch's metrics

`best.pth` holds the same minus optimizer, scaler and rng. Both load with `mambaout.weights.load_checkpoint`.

A checkpoint read to resume also carries `READ_FROM` (never saved): the file and its `file_state` when it was read, so
that the run, once it holds its folder's lock, can refuse a file that another process has replaced since.
"""

import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mambaout.errors import UserError
from mambaout.weights.io import atomic_write, read_file, tensor_bytes

__all__ = [
    "READ_FROM",
    "file_state",
    "is_run_checkpoint",
    "read_checkpoint",
    "refuse_if_replaced",
    "rng_state",
    "save_checkpoint",
    "set_rng_state",
]


READ_FROM = "read_from"  # (path, file_state) of the file a resumed checkpoint was read from


def file_state(path: str | os.PathLike) -> tuple[int, int, int, int]:
    """(device, inode, size, mtime in ns) of `path`: an atomic replacement or a rewrite changes it."""
    st = os.stat(path)
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


def refuse_if_replaced(path: Path, state: tuple[int, int, int, int]) -> None:
    """Refuse to continue from `path` if another process replaced it after it was read, `state` being its
    `file_state` then (a run that held the folder's lock then and has let go of it since): the run would go on from an
    older state and overwrite the newer one. Call it holding the folder's lock.

    Raises:
        UserError: `path` changed or is gone.
    """
    try:
        now = file_state(path)
    except OSError:
        now = None
    if now != state:
        raise UserError(
            f"--resume: {path} was replaced by another process after this run read it: run the command again to "
            "continue from the new one"
        )


def rng_state() -> dict[str, Any]:
    """This process's random generator states (torch CPU and CUDA, numpy, python) as tensors and lists."""
    np_state = np.random.get_state()
    py_state = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured (CUDA states only when the device count matches)."""
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    keys = np_state["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def save_checkpoint(checkpoint: dict[str, Any], path: str | os.PathLike) -> None:
    """`torch.save` to a temporary file beside `path`, fsync, rename: `path` is always the old or the new file.

    Raises:
        UserError: The disk is full or the folder not writable (the previous file stays intact); a disk with less
            room than the checkpoint's tensors is refused before writing.
    """
    with atomic_write(Path(path), size_hint=tensor_bytes(checkpoint)) as f:
        torch.save(checkpoint, f)


def is_run_checkpoint(obj: Any) -> bool:
    """Whether `obj` is a checkpoint written by `mambaout train`."""
    return isinstance(obj, dict) and {"model", "model_name", "config"} <= obj.keys()


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a `mambaout train` checkpoint (weights-only unpickling).

    Raises:
        UserError: Missing or corrupt file, or a file that is not a training checkpoint.
    """
    path = Path(path).expanduser()
    checkpoint = read_file(path)
    if not is_run_checkpoint(checkpoint):
        raise UserError(f"{path} is not a `mambaout train` checkpoint (no model, model_name and config in it)")
    return checkpoint
