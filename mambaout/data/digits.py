"""The embedded default dataset: scikit-learn's bundled handwritten digits as an ImageFolder tree.

1,797 real 8×8 scans (16 gray levels) of the digits 0-9, split once into train (80%) and val (20%), stratified by
class with a fixed seed, and written as 8-bit grayscale PNGs to `<cache>/digits-v1/{train,val}/<digit>/<index>.png`
(the index is the sample's position in `sklearn.datasets.load_digits`). The tree is built in a temporary folder and
renamed into place, so a half-written tree is never used and concurrent writers (distributed ranks) are harmless.
"""

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["cache_dir", "digits_tree", "write_tree_once"]

_NAME = "digits-v1"
_VAL_FRACTION = 0.2
_SPLIT_SEED = 0


def cache_dir() -> Path:
    """`$MAMBAOUT_CACHE`, else `$XDG_CACHE_HOME/mambaout`, else `~/.cache/mambaout`."""
    if "MAMBAOUT_CACHE" in os.environ:
        return Path(os.environ["MAMBAOUT_CACHE"]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")).expanduser() / "mambaout"


def digits_tree(root: str | os.PathLike | None = None) -> Path:
    """The digits ImageFolder tree, written on first use.

    Args:
        root: Parent folder of the tree; default `cache_dir()`.

    Returns:
        The tree's path, holding `train/` (1,437 images) and `val/` (360 images), 10 classes `0`..`9`.
    """
    return write_tree_once(_NAME, root, _write_digits, f"sklearn load_digits, stratified split, val {_VAL_FRACTION}")


def _write_digits(tree: Path) -> None:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)  # [N, 8, 8], 0..16 -> 0..255
    train_idx, val_idx = train_test_split(
        np.arange(len(images)), test_size=_VAL_FRACTION, stratify=digits.target, random_state=_SPLIT_SEED
    )
    for split, indices in (("train", train_idx), ("val", val_idx)):
        for i in sorted(indices):
            folder = tree / split / str(digits.target[i])
            folder.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i]).save(folder / f"{i:04d}.png")


def write_tree_once(name: str, root: str | os.PathLike | None, write: Callable[[Path], None], provenance: str) -> Path:
    """`<root>/<name>`, written by `write(folder)` on first use: in a temporary folder renamed into place, so a
    half-written tree is never used and concurrent writers (distributed ranks) are harmless.

    Args:
        name: The tree's folder name (with a version, e.g. `digits-v1`).
        root: Parent folder; default `cache_dir()`.
        write: Fills the (empty) folder it is given.
        provenance: One line saying where the data came from, kept in the tree's `COMPLETE` marker.
    """
    parent = Path(root).expanduser() if root is not None else cache_dir()
    tree = parent / name
    if (tree / "COMPLETE").is_file():
        return tree
    parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=parent))
    try:
        write(staging)
        (staging / "COMPLETE").write_text(provenance + "\n")
        os.rename(staging, tree)
    except OSError:
        if not (tree / "COMPLETE").is_file():  # else another process finished the same tree first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return tree
