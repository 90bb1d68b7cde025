"""Draw docs/argument.md's Pathfinder picture: both classes at each contour length, from the generator itself.

    python scripts/pathfinder_figure.py [--output docs/pathfinder_samples.png]

Rows are contour lengths 6, 9 and 14 at 32²; the left three columns are label 0 (the markers sit on different
snakes), the right three label 1 (one snake joins them), each the first such seeds. Pixels only (no text), 4× nearest
upscaling, so the file is a pure function of the generator: tests/test_pathfinder.py checks the committed one.
"""

import argparse
from pathlib import Path

import numpy as np
from PIL import Image

from mambaout.data import make_sample
from mambaout.weights.io import atomic_write

LENGTHS = (6, 9, 14)
PER_CLASS = 3
SIZE = 32
FRAME, GAP, ZOOM = 2, 8, 4


def draw() -> np.ndarray:
    """The picture as a [H, W] uint8 array."""
    rows = []
    for length in LENGTHS:
        found: dict[int, list[np.ndarray]] = {0: [], 1: []}
        seed = 0
        while min(len(v) for v in found.values()) < PER_CLASS:
            sample = make_sample(SIZE, length, seed)
            seed += 1
            if len(found[sample.label]) < PER_CLASS:
                found[sample.label].append(np.pad(sample.image, FRAME, constant_values=96))
        gap = np.full((SIZE + 2 * FRAME, GAP), 255, np.uint8)
        rows.append(np.concatenate([*found[0], gap, *found[1]], axis=1))
    picture = np.concatenate(rows, axis=0)
    return picture.repeat(ZOOM, axis=0).repeat(ZOOM, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default=str(Path(__file__).parents[1] / "docs" / "pathfinder_samples.png"))
    path = Path(parser.parse_args().output)
    with atomic_write(path) as f:
        Image.fromarray(draw()).save(f, format="png", optimize=True)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
