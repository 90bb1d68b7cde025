"""mambaout.data.pathfinder: determinism, balanced labels, markers on the snakes the label says, equal ink."""

import dataclasses
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage, stats

from mambaout.data import PathfinderConfig, make_sample, make_samples

_COUNTS = {(32, 6): 200, (32, 9): 200, (32, 14): 400, (64, 14): 40, (128, 14): 20}


@pytest.fixture(scope="module")
def samples():
    return {key: list(make_samples(*key, count=count, seed=0)) for key, count in _COUNTS.items()}


def _pixel(marker):
    return round(marker[0]), round(marker[1])


def test_same_seed_same_sample_other_seed_differs():
    a, b, c = make_sample(32, 9, 5), make_sample(32, 9, 5), make_sample(32, 9, 6)
    for field in ("image", "mask", "instances"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert (a.label, a.markers) == (b.label, b.markers)
    assert not np.array_equal(a.image, c.image)
    assert a.image.shape == a.mask.shape == (32, 32) and a.image.dtype == a.mask.dtype == np.uint8


def test_make_samples_is_make_sample_of_consecutive_seeds():
    for i, sample in enumerate(make_samples(64, 6, count=3, seed=10)):
        np.testing.assert_array_equal(sample.image, make_sample(64, 6, 10 + i).image)


def test_labels_are_balanced(samples):
    labels = [s.label for s in samples[32, 14]]
    low, high = stats.binom.interval(0.99, len(labels), 0.5)
    assert low <= sum(labels) <= high


@pytest.mark.parametrize("key", list(_COUNTS))
def test_markers_sit_on_the_snakes_the_label_says(samples, key):
    for s in samples[key]:
        (r0, c0), (r1, c1) = map(_pixel, s.markers)
        on = (s.instances[r0, c0], s.instances[r1, c1])
        if s.label:
            assert s.mask[r0, c0] == s.mask[r1, c1] == 2 and on[0] == on[1]
            assert (s.mask == 1).any()  # the other target snake is there too
        else:
            assert not (s.mask == 2).any()
            assert s.mask[r0, c0] == s.mask[r1, c1] == 1 and set(on) == {1, 2}
        np.testing.assert_array_equal(s.mask > 0, np.isin(s.instances, (1, 2)))
        assert not s.image[s.instances == 0].any()  # no ink outside the snakes


@pytest.mark.parametrize("key", list(_COUNTS))
def test_snakes_never_touch(samples, key):
    touching = np.ones((3, 3), dtype=bool)  # 8-neighbourhood: a 1 px gap at least
    for s in samples[key]:
        targets = ndimage.binary_dilation(np.isin(s.instances, (1, 2)), touching)
        assert not (targets & (s.instances >= 3)).any()
        assert not (ndimage.binary_dilation(s.instances == 1, touching) & (s.instances == 2)).any()
    assert np.mean([s.instances.max() >= 3 for s in samples[key]]) > 0.9  # distractors are drawn


def test_both_classes_carry_the_same_ink(samples):
    ink = np.array([s.image.mean() for s in samples[32, 14]])
    labels = np.array([s.label for s in samples[32, 14]])
    one, zero = ink[labels == 1], ink[labels == 0]
    # 4 standard errors of the difference: a two-sample z-test that a fixed-seed run passes unless the classes differ
    # (p < 1e-4 by chance), yet tight enough to catch one marker missing or extra in a class.
    bound = 4 * np.sqrt(one.var(ddof=1) / len(one) + zero.var(ddof=1) / len(zero))
    marker_ink = np.pi * (PathfinderConfig.for_size(32, 14).marker_radius + 0.5) ** 2 * 255 / 32**2
    assert bound < marker_ink / 2
    assert abs(one.mean() - zero.mean()) < bound


def test_longer_contours_draw_more_target_pixels(samples):
    area = [np.mean([(s.mask > 0).sum() for s in samples[32, length]]) for length in (6, 9, 14)]
    assert area[0] < area[1] < area[2]


def test_config_follows_lra():
    config = PathfinderConfig.for_size(32, 14)
    assert (config.paddle_length, config.thickness, config.marker_radius, config.seed_distance) == (2, 0.5, 1.5, 7)
    assert (config.distractor_length, config.num_distractors) == (4, 5)
    assert PathfinderConfig.for_size(128, 9).marker_radius == 3
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.size = 64  # type: ignore[misc]


@pytest.mark.parametrize(
    ("size", "contour_length", "seed", "match"),
    [(48, 6, 0, "32, 64, 128"), (32, 0, 0, "contour_length"), (32, 6, -1, "seed")],
)
def test_bad_arguments_raise(size, contour_length, seed, match):
    with pytest.raises(ValueError, match=match):
        make_sample(size, contour_length, seed)


def test_docs_picture_is_what_the_generator_draws_today():
    import importlib.util

    from PIL import Image

    root = Path(__file__).parents[1]
    spec = importlib.util.spec_from_file_location("pathfinder_figure", root / "scripts" / "pathfinder_figure.py")
    figure = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(figure)
    committed = np.asarray(Image.open(root / "docs" / "pathfinder_samples.png"))
    np.testing.assert_array_equal(committed, figure.draw(), err_msg="rerun scripts/pathfinder_figure.py")
