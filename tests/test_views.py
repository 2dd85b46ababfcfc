"""Shifted views (`mnist_service.engine.views`): a redrawn image and its copies one pixel off."""

from __future__ import annotations

import numpy as np
import pytest

from mnist_service.engine.preprocess import Prepared
from mnist_service.engine.views import (
    SHIFTS,
    VIEW_MARGIN,
    cascaded,
    collapse,
    expand,
    others,
    shifted,
    unshifted,
    unsure,
    views,
)


def numbered() -> np.ndarray:
    """A [1, 28, 28] image whose pixels are all different (and none is 0)."""
    return (np.arange(1, 785, dtype=np.float32) / 784).reshape(1, 28, 28)


@pytest.mark.parametrize(("rows", "columns"), [(-1, 0), (1, 0), (0, -1), (0, 1), (2, -3)])
def test_a_shift_moves_every_pixel_and_fills_black_without_wrapping(
    rows: int, columns: int
) -> None:
    image = numbered()
    out = shifted(image, rows, columns)
    assert out.shape == image.shape
    assert out.dtype == np.float32
    for y in range(28):
        for x in range(28):
            source = (y - rows, x - columns)
            inside = 0 <= source[0] < 28 and 0 <= source[1] < 28
            assert out[0, y, x] == (image[0, source[0], source[1]] if inside else 0)


def test_the_views_are_the_image_then_one_pixel_up_down_left_right() -> None:
    image = numbered()
    rows = views(Prepared(image, redrawn=True))
    assert rows.shape == (5, 1, 28, 28)
    np.testing.assert_array_equal(rows[0], image)
    assert SHIFTS == ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
    np.testing.assert_array_equal(rows[1, 0, :27], image[0, 1:])  # up
    np.testing.assert_array_equal(rows[2, 0, 1:], image[0, :27])  # down
    np.testing.assert_array_equal(rows[3, 0, :, :27], image[0, :, 1:])  # left
    np.testing.assert_array_equal(rows[4, 0, :, 1:], image[0, :, :27])  # right


def test_an_image_in_mnist_format_or_with_views_off_is_one_row() -> None:
    image = numbered()
    for rows in (views(Prepared(image, redrawn=False)), views(Prepared(image, True), False)):
        assert rows.shape == (1, 1, 28, 28)
        np.testing.assert_array_equal(rows[0], image)


def test_expand_and_collapse_average_each_image_over_its_own_views() -> None:
    images = [Prepared(numbered() * k, redrawn=k % 2 == 1) for k in (1, 2, 3, 4)]
    batch, counts = expand(images)
    assert counts.tolist() == [5, 1, 5, 1]
    assert batch.shape == (12, 1, 28, 28)
    probabilities = np.random.default_rng(0).random((12, 10)).astype(np.float32)
    out = collapse(probabilities, counts)
    assert out.shape == (4, 10)
    assert out.dtype == np.float32
    np.testing.assert_allclose(out[0], probabilities[0:5].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(out[1], probabilities[5])
    np.testing.assert_allclose(out[2], probabilities[6:11].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(out[3], probabilities[11])
    np.testing.assert_array_equal(unshifted(probabilities, counts), probabilities[[0, 5, 6, 11]])


def test_one_view_each_is_passed_through_as_is() -> None:
    batch, counts = expand([Prepared(numbered(), False)] * 3, enabled=True)
    probabilities = np.ones((3, 10), np.float32)
    assert collapse(probabilities, counts) is probabilities
    assert batch.shape == (3, 1, 28, 28)


def test_a_reading_is_unsure_when_its_top_two_are_closer_than_the_margin() -> None:
    sure = np.zeros(10, np.float32)
    sure[3] = 0.96
    sure[7] = 0.04
    close = np.full(10, 0.01, np.float32)
    close[[2, 5]] = [0.48, 0.44]
    edge = np.zeros(10, np.float32)
    edge[[0, 1]] = [VIEW_MARGIN + 0.04, 0.04]  # the lead is the margin, to rounding
    assert unsure(np.stack([sure, close, edge])).tolist() == [False, True, False]


def test_others_are_the_four_shifted_views_after_the_own_one() -> None:
    image = numbered()
    np.testing.assert_array_equal(others(image), views(Prepared(image, True))[1:])
    assert others(image).shape == (len(SHIFTS) - 1, 1, 28, 28)


def test_the_cascade_reads_the_own_view_when_sure_and_all_views_when_unsure() -> None:
    """Three redrawn images (sure, unsure, unsure) and one in MNIST format (unsure, no views)."""
    counts = np.array([5, 5, 5, 1], np.intp)
    rng = np.random.default_rng(1)
    probabilities = rng.random((16, 10)).astype(np.float32) * 0.01
    probabilities[0, 4] = 0.99  # sure: the own view decides, whatever the shifted ones say
    probabilities[1:5, 8] = 0.9
    probabilities[5, [1, 2]] = [0.5, 0.45]  # unsure: the mean of all five
    probabilities[6:10, 2] = 0.9
    probabilities[10, [6, 9]] = [0.4, 0.35]
    probabilities[15, [0, 1]] = [0.5, 0.5]  # unsure, but one row: as it is
    out = cascaded(probabilities, counts)
    np.testing.assert_array_equal(out[0], probabilities[0])
    np.testing.assert_allclose(out[1], probabilities[5:10].mean(axis=0), rtol=1e-6)
    np.testing.assert_allclose(out[2], probabilities[10:15].mean(axis=0), rtol=1e-6)
    np.testing.assert_array_equal(out[3], probabilities[15])
    assert out.argmax(axis=1).tolist() == [4, 2, 6, 0]
