"""Pathfinder: are the two markers joined by one curved dashed path?

The task is Linsley et al., "Learning long-range spatial dependencies with horizontal gated recurrent units"
(NeurIPS 2018); the per-size parameters in `PathfinderConfig.for_size` are those of the Long Range Arena
(Tay et al., "Long Range Arena: A Benchmark for Efficient Transformers", 2020) for 32², 64² and 128². An image holds
two target snakes of `contour_length` paddles, distractor snakes a third as long and two markers; label 1 when one
target snake joins the markers, 0 when they sit on different snakes. Both classes carry the same ink: two target
snakes, two markers, the same distractors; only which snake end carries the second marker differs.

The generator is ours, written from that description (not from the original code):
- A snake grows paddle by paddle. A paddle is a segment of `paddle_length` px; the next one starts `gap` px past the
  end of the previous one along its own direction (the dashes), which turns by an angle drawn from a von Mises
  distribution of concentration `4 * continuity**2` (a spread of about `1 / (2 * continuity)` rad), so a larger
  `continuity` gives straighter paths. A paddle that would leave the canvas less its `padding`, or touch
  (8-neighbourhood) ink already placed, is redrawn up to 6 times, each time with a quarter of the concentration so the
  snake bends away from what is in its way; then the snake restarts from a new seed point on a free pixel (a
  distractor that finds no room after 8 seeds is left out), and a sample whose target snakes or second marker find no
  room restarts from a derived seed, deterministically. Paddle angles are continuous.
- Ink is drawn analytically, no supersampling: a pixel's coverage is `clip(thickness / 2 + 0.5 - distance, 0, 1)`,
  the distance from its centre to the paddle segment (to the centre for a marker disc of `marker_radius`), i.e. a
  1 px box filter across the stroke; the image is the max over everything drawn, times 255.
- `mask` is the target of Pathfinder-segmentation (Gupta et al. 2022): 0 background and distractors, 2 the snake that
  joins the markers, 1 a target snake that does not (label 0: both; label 1: the other one), markers part of their
  snake. `instances` tells the snakes apart (what the tests check connectivity with).
"""

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

__all__ = ["PathfinderConfig", "PathfinderSample", "make_sample", "make_samples"]

# size: (paddle_length, thickness, gap, marker_radius, seed_distance, continuity, distractor paddles in all).
# LRA sets 32² fully; at 64² and 128² it keeps the original generator's paddle length of 5 px, and its paddle margin
# (1 at 64², 2-3 at 128²) is our gap. The distractor count is `distractor paddles // distractor_length`, as LRA's.
_LRA = {
    32: (2.0, 0.5, 1.0, 1.5, 7.0, 1.0, 20),
    64: (5.0, 1.0, 1.0, 2.5, 12.0, 1.8, 22),
    128: (5.0, 1.5, 2.0, 3.0, 20.0, 1.8, 35),
}
_PADDLE_TRIES = 7  # a first draw and 6 redraws
_SNAKE_TRIES = 8
_SAMPLE_TRIES = 50
_NEIGHBOURS = np.array([(dr, dc) for dr in (-1, 0, 1) for dc in (-1, 0, 1)])  # [9, 2], the 8-neighbourhood and self


@dataclass(frozen=True)
class PathfinderConfig:
    """How one size of Pathfinder is drawn; lengths in pixels, angles in radians.

    Attributes:
        size: Side of the square canvas.
        contour_length: Paddles per target snake.
        paddle_length: Length of one paddle (a dash).
        thickness: Stroke width of a paddle.
        gap: Space between consecutive paddles of a snake.
        padding: Border kept free of paddles (marker discs may reach into it).
        marker_radius: Radius of the marker discs.
        seed_distance: Least distance between the start points of the two target snakes.
        continuity: Straightness; the turn between paddles has a von Mises concentration of `4 * continuity**2`.
        distractor_length: Paddles per distractor snake.
        num_distractors: Distractor snakes attempted (one that finds no room is left out).
    """

    size: int
    contour_length: int
    paddle_length: float
    thickness: float
    gap: float
    padding: int
    marker_radius: float
    seed_distance: float
    continuity: float
    distractor_length: int
    num_distractors: int

    def __post_init__(self) -> None:
        if self.padding < 0:
            raise ValueError(f"PathfinderConfig padding must be non-negative, got {self.padding}")

    @classmethod
    def for_size(cls, size: int, contour_length: int) -> "PathfinderConfig":
        """The Long Range Arena parameters for a canvas of `size`² and target snakes of `contour_length` paddles.

        Raises:
            ValueError: `size` is not 32, 64 or 128, or `contour_length` is not a positive integer.
        """
        if size not in _LRA:
            raise ValueError(f"Pathfinder size {size!r} is not one of {', '.join(map(str, _LRA))}")
        if isinstance(contour_length, bool) or not isinstance(contour_length, int) or contour_length < 1:
            raise ValueError(f"Pathfinder contour_length {contour_length!r} is not a positive integer (LRA: 6, 9, 14)")
        paddle_length, thickness, gap, marker_radius, seed_distance, continuity, distractor_paddles = _LRA[size]
        distractor_length = max(1, contour_length // 3)
        return cls(
            size=size,
            contour_length=contour_length,
            paddle_length=paddle_length,
            thickness=thickness,
            gap=gap,
            padding=1,
            marker_radius=marker_radius,
            seed_distance=seed_distance,
            continuity=continuity,
            distractor_length=distractor_length,
            num_distractors=distractor_paddles // distractor_length,
        )


@dataclass(frozen=True, eq=False)
class PathfinderSample:
    """One Pathfinder image with its label and segmentation.

    Attributes:
        image: [H, W] uint8, ink bright on black.
        label: 1 when one snake joins the two markers, else 0.
        mask: [H, W] uint8, 0 background and distractors, 1 a target snake that does not join the markers, 2 the one
            that does; markers count as part of their snake.
        instances: [H, W] uint8, 0 background, 1 and 2 the target snakes (with their markers), 3 and up the
            distractors; snake 1 carries the first marker.
        markers: (row, col) centres of the two markers, in pixels (pixel centres at integers).
    """

    image: np.ndarray
    label: int
    mask: np.ndarray
    instances: np.ndarray
    markers: tuple[tuple[float, float], tuple[float, float]]


def make_sample(size: int, contour_length: int, seed: int) -> PathfinderSample:
    """One sample, a pure function of its arguments.

    Args:
        size: Canvas side, 32, 64 or 128.
        contour_length: Paddles per target snake (LRA: 6, 9, 14).
        seed: Non-negative; with `size` and `contour_length` it seeds the numpy Generator.

    Returns:
        The sample; its label is drawn uniformly from the seed.

    Raises:
        ValueError: A bad size, contour length or seed, or target snakes too long to fit the canvas.
    """
    config = PathfinderConfig.for_size(size, contour_length)
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Pathfinder seed must be a non-negative integer, got {seed!r}")
    rng = np.random.default_rng((size, contour_length, seed))
    label = int(rng.integers(2))  # drawn once, so that retries cannot bias the classes
    for attempt in range(_SAMPLE_TRIES):
        if attempt:
            rng = np.random.default_rng((size, contour_length, seed, attempt))
        sample = _draw(config, label, rng)
        if sample is not None:
            return sample
    raise ValueError(
        f"Pathfinder snakes of {contour_length} paddles do not fit a {size}² canvas; give a shorter contour_length"
    )


def make_samples(size: int, contour_length: int, count: int, seed: int) -> Iterator[PathfinderSample]:
    """`count` samples; sample `i` is `make_sample(size, contour_length, seed + i)`, so give disjoint splits disjoint
    seed ranges.

    Raises:
        ValueError: A negative count, or what `make_sample` raises.
    """
    if count < 0:
        raise ValueError(f"Pathfinder count must be non-negative, got {count}")
    for i in range(count):
        yield make_sample(size, contour_length, seed + i)


@dataclass(frozen=True)
class _Stroke:
    """One paddle or marker disc: its coverage [h, w] (0..1) and ink (coverage > 0) placed at (row, col) of the
    canvas."""

    row: int
    col: int
    coverage: np.ndarray
    ink: np.ndarray

    @property
    def window(self) -> tuple[slice, slice]:
        h, w = self.coverage.shape
        return slice(self.row, self.row + h), slice(self.col, self.col + w)


def _segment(start: tuple[float, float], end: tuple[float, float], reach: float) -> _Stroke:
    """The stroke of a segment whose ink reaches `reach` px from it (half the thickness plus half a pixel)."""
    (r0, c0), (r1, c1) = start, end
    top, left = math.floor(min(r0, r1) - reach), math.floor(min(c0, c1) - reach)
    rows = np.arange(top - r0, max(r0, r1) + reach - r0).reshape(-1, 1)  # [h, 1], relative to start
    cols = np.arange(left - c0, max(c0, c1) + reach - c0)  # [w]
    dr, dc = r1 - r0, c1 - c0
    scale = 1.0 / (dr * dr + dc * dc)
    t = np.minimum(np.maximum(rows * (dr * scale) + cols * (dc * scale), 0.0), 1.0)  # [h, w], nearest point
    return _stroke(top, left, reach, np.hypot(rows - t * dr, cols - t * dc))


def _disc(centre: tuple[float, float], radius: float, size: int) -> _Stroke:
    """A marker disc, clipped to the canvas."""
    reach = radius + 0.5
    top, left = max(0, math.floor(centre[0] - reach)), max(0, math.floor(centre[1] - reach))
    rows = np.arange(top - centre[0], min(size - 0.5, centre[0] + reach) - centre[0]).reshape(-1, 1)  # [h, 1]
    cols = np.arange(left - centre[1], min(size - 0.5, centre[1] + reach) - centre[1])  # [w]
    return _stroke(top, left, reach, np.hypot(rows, cols))


def _stroke(row: int, col: int, reach: float, distance: np.ndarray) -> _Stroke:
    """The stroke whose pixels lie `distance` [h, w] from its axis: coverage is a 1 px box filter across its edge."""
    coverage = np.minimum(reach - distance, 1.0)
    return _Stroke(row, col, np.maximum(coverage, 0.0, out=coverage), coverage > 0)


def _touches(grid: np.ndarray, stroke: _Stroke) -> bool:
    """Whether the stroke's ink lands on a set pixel of a boolean [H + 2, W + 2] grid (the canvas with a 1 px rim)."""
    h, w = stroke.ink.shape
    return bool((grid[stroke.row + 1 : stroke.row + 1 + h, stroke.col + 1 : stroke.col + 1 + w] & stroke.ink).any())


def _block(grid: np.ndarray, stroke: _Stroke) -> None:
    """Set the stroke's ink, dilated by 1 px (8-neighbourhood), in a boolean [H + 2, W + 2] grid: the rim takes
    the dilation of ink on the canvas's edge."""
    rows, cols = np.nonzero(stroke.ink)
    rows = (rows + stroke.row + 1)[:, None] + _NEIGHBOURS[:, 0]  # [n, 9]
    cols = (cols + stroke.col + 1)[:, None] + _NEIGHBOURS[:, 1]
    grid[rows, cols] = True


def _grow(
    config: PathfinderConfig, rng: np.random.Generator, start: tuple[float, float], length: int, blocked: np.ndarray
) -> tuple[list[_Stroke], tuple[float, float]] | None:
    """A snake of `length` paddles from `start` touching no pixel of `blocked`: its paddles and end point, or None when
    it gets stuck. The snake blocks its own paddles, one paddle behind its head, so it does not run into itself.
    """
    reach = config.thickness / 2 + 0.5
    low, high = config.padding + reach, config.size - 1 - config.padding - reach
    kappa = 4 * config.continuity**2
    taken = blocked.copy()
    paddles: list[_Stroke] = []
    hinge, heading = start, 0.0
    for i in range(length):
        for attempt in range(_PADDLE_TRIES):  # each redraw bends more freely, to turn away from what is in the way
            angle = rng.uniform(-math.pi, math.pi) if i == 0 else heading + rng.vonmises(0.0, kappa / 4**attempt)
            dr, dc = math.sin(angle), math.cos(angle)
            skip = config.gap if i else 0.0
            first = (hinge[0] + skip * dr, hinge[1] + skip * dc)
            last = (first[0] + config.paddle_length * dr, first[1] + config.paddle_length * dc)
            if not (low <= min(first + last) and max(first + last) <= high):
                continue
            paddle = _segment(first, last, reach)
            if not _touches(taken, paddle):
                break
        else:
            return None
        if paddles:
            _block(taken, paddles[-1])
        paddles.append(paddle)
        hinge, heading = last, angle
    return paddles, hinge


def _place(
    config: PathfinderConfig,
    rng: np.random.Generator,
    blocked: np.ndarray,
    length: int,
    away_from: tuple[float, float] | None = None,
) -> tuple[tuple[float, float], list[_Stroke], tuple[float, float]] | None:
    """A snake from a seed point on a free pixel at least `seed_distance` from `away_from`: (start, paddles, end),
    or None when `_SNAKE_TRIES` seeds all got stuck."""
    reach = config.thickness / 2 + 0.5
    low, high = config.padding + reach, config.size - 1 - config.padding - reach
    inner = slice(math.ceil(low), math.floor(high) + 1)
    free = np.argwhere(~blocked[1:-1, 1:-1][inner, inner]) + inner.start  # [n, 2] (row, col) pixels
    if away_from is not None:
        free = free[np.hypot(*(free - np.asarray(away_from)).T) >= config.seed_distance]
    if not len(free):
        return None
    for _ in range(_SNAKE_TRIES):
        row, col = free[rng.integers(len(free))] + rng.uniform(-0.5, 0.5, size=2)
        start = (min(max(float(row), low), high), min(max(float(col), low), high))
        grown = _grow(config, rng, start, length, blocked)
        if grown is not None:
            return start, grown[0], grown[1]
    return None


def _draw(config: PathfinderConfig, label: int, rng: np.random.Generator) -> PathfinderSample | None:
    """One attempt at a sample of `label`; None when a target snake or the second marker finds no room."""
    size = config.size
    blocked = np.zeros((size + 2, size + 2), dtype=bool)  # placed ink dilated by 1 px, on the canvas with a 1 px rim
    first = _place(config, rng, blocked, config.contour_length)
    if first is None:
        return None
    start, target1, end = first
    target1.append(_disc(start, config.marker_radius, size))
    if label:  # reserve the second marker before the other snake can take its place
        target1.append(_disc(end, config.marker_radius, size))
    for stroke in target1:
        _block(blocked, stroke)
    second = _place(config, rng, blocked, config.contour_length, away_from=start)
    if second is None:
        return None
    _, target2, other_end = second
    markers = (start, end if label else other_end)
    if not label:
        marker = _disc(other_end, config.marker_radius, size)
        if _touches(blocked, marker):
            return None
        target2.append(marker)
    for stroke in target2:
        _block(blocked, stroke)
    snakes = [target1, target2]
    for _ in range(config.num_distractors):
        distractor = _place(config, rng, blocked, config.distractor_length)
        if distractor is not None:
            snakes.append(distractor[1])
            for stroke in distractor[1]:
                _block(blocked, stroke)

    ink = np.zeros((size, size), dtype=np.float32)
    instances = np.zeros((size, size), dtype=np.uint8)
    for number, strokes in enumerate(snakes, start=1):
        for stroke in strokes:
            window = stroke.window
            np.maximum(ink[window], stroke.coverage, out=ink[window])
            instances[window][stroke.ink] = number
    targets = np.minimum(instances, 3) % 3  # 1, 2 the target snakes, 0 the rest
    mask = (3 - targets) % 3 if label else (targets > 0).astype(np.uint8)  # label 1: snake 1 joins (2), snake 2 (1)
    image = np.rint(ink * 255).astype(np.uint8)
    return PathfinderSample(image=image, label=label, mask=mask, instances=instances, markers=markers)
