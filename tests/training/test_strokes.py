"""Pen redrawings of MNIST digits for training (`training.strokes`) and their augmentation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from mnist_service.constants import IMAGE_SIZE
from mnist_service.engine.preprocess import centre_like_mnist, model_batch, stroke_width
from training import strokes
from training.augment import centred_like_serving, random_thickness, with_pens

MnistSplit = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]


def test_thinning_many_masks_at_once_equals_one_at_a_time(mnist_test_set: MnistSplit) -> None:
    digits = mnist_test_set[0][:12]
    together = strokes.centre_lines(digits)
    assert together.shape == (12, IMAGE_SIZE * strokes.THIN_SCALE, IMAGE_SIZE * strokes.THIN_SCALE)
    for digit, line in zip(digits, together, strict=True):
        np.testing.assert_array_equal(strokes.centre_lines(digit[np.newaxis])[0], line)


def test_a_bar_thins_to_a_one_pixel_line() -> None:
    bar = np.zeros((1, 40, 40), bool)
    bar[0, 5:35, 15:24] = True  # 9 px wide, 30 px tall
    line = strokes.thin(bar)[0]
    rows = line.sum(axis=1)
    assert rows[10:30].max() == 1  # one pixel wide along the bar
    assert np.count_nonzero(rows) >= 20  # and most of its length is kept


def test_enclosed_is_the_background_that_ink_surrounds() -> None:
    ring = np.ones((1, 9, 9), bool)
    ring[0, 2:7, 2:7] = False  # ink: a square ring around a 3x3 hole
    ring[0, 3:6, 3:6] = True
    holes = strokes.enclosed(ring)[0]
    assert holes.sum() == 9
    assert holes[3:6, 3:6].all()
    opened = ring.copy()
    opened[0, 4, 2] = True  # a gap in the ring: the hole joins the outside
    assert not strokes.enclosed(opened).any()


@pytest.mark.parametrize(("eye", "loop"), [(0.7, True), (1.0, False)])
def test_a_loop_a_broad_pen_inked_in_is_drawn_as_a_loop_if_it_shows(eye: float, loop: bool) -> None:
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    blob = np.hypot(yy - 14, xx - 14) <= 6  # a filled 0, 13 px across
    digit = np.where(blob, 255, 0).astype(np.uint8)
    digit[np.hypot(yy - 14, xx - 14) <= 1.5] = round(eye * 255)  # its eye, faintly visible or not
    line = strokes.centre_lines(digit[np.newaxis])
    found = strokes.enclosed(~line)[0]
    assert bool(found.any()) == loop
    if loop:
        rows = np.nonzero(line[0])[0]
        assert rows.max() - rows.min() >= 3 * strokes.THIN_SCALE  # a loop, not a dot


@pytest.mark.parametrize(("head", "loop"), [(4.5, True), (1.5, False)])
def test_a_loop_inked_in_solid_is_drawn_as_a_loop(head: float, loop: bool) -> None:
    yy, xx = np.mgrid[:IMAGE_SIZE, :IMAGE_SIZE]
    stem = (abs(xx - 17) <= 1) & (yy >= 9) & (yy <= 25)  # a 3 px stroke
    digit = np.where(stem | (np.hypot(yy - 9, xx - 14) <= head), 255, 0).astype(np.uint8)
    line = strokes.centre_lines(digit[np.newaxis])
    found = strokes.enclosed(~line)[0]
    # A head three times as wide as the stem is a 9 whose loop was inked in: drawn as a loop.
    # A knob on the stem no wider than twice the stroke stays a stroke.
    assert bool(found.any()) == loop
    if loop:
        rows = np.nonzero(found)[0]
        assert rows.mean() < 14 * strokes.THIN_SCALE  # in the head, not the stem
        assert rows.max() - rows.min() >= 2 * strokes.THIN_SCALE  # a loop, not a pinhole


@pytest.mark.parametrize(("gap", "whole"), [(70, True), (0, False)])
def test_a_faint_stroke_is_kept_whole_but_a_gap_is_not_closed(gap: int, whole: bool) -> None:
    digit = np.zeros((IMAGE_SIZE, IMAGE_SIZE), np.uint8)
    digit[4:25, 13:15] = 255
    digit[13:15, 13:15] = gap  # 0.27 of full ink: below the trace's half, a light stroke
    line = strokes.centre_lines(digit[np.newaxis])[0]
    rows = np.flatnonzero(line.any(axis=1))
    assert rows.max() - rows.min() >= 18 * strokes.THIN_SCALE  # top to bottom, either way
    assert (len(rows) == rows.max() - rows.min() + 1) == whole  # no row skipped: one stroke


def test_a_bridge_joins_the_nearest_ends_over_ink_only() -> None:
    line = np.zeros((40, 40), bool)
    line[2:15, 20] = True
    line[22:38, 20] = True  # a gap of 7 px: rows 15-21
    line[18, 30:38] = True  # a third piece, 10 px to the side
    inked = np.zeros_like(line)
    inked[:, 19:22] = True
    joined = strokes.bridge(line, inked)
    assert joined[15:22, 20].all()  # the gap was inked: joined straight
    assert np.array_equal(joined & ~line, np.pad(np.ones((7, 1), bool), ((15, 18), (20, 19))))
    assert np.array_equal(strokes.bridge(line, np.zeros_like(line)), line)  # no ink: no bridge
    far = np.zeros_like(line)
    far[2:5, 2] = far[2:5, 38] = True
    assert strokes.BRIDGE_REACH < 36  # the nearest ends, (2, 2) and (2, 38)
    assert np.array_equal(strokes.bridge(far, np.ones_like(far)), far)  # too far apart


def test_random_pens_span_hairlines_to_felt_tips_and_are_seeded() -> None:
    pens = strokes.Pens.random(2000, seed=3)
    low, high = strokes.CANVAS_SIDES
    assert pens.sides.min() >= low
    assert pens.sides.max() <= high
    assert pens.widths.min() == 1  # hairlines
    assert (pens.widths <= np.rint(pens.sides * strokes.MAX_PEN_WIDTH)).all()
    assert pens.widths.max() >= 0.9 * high * strokes.MAX_PEN_WIDTH  # felt tips
    assert 0.2 < float(pens.smooth.mean()) < 0.9  # anti-aliased and hard-edged
    again = strokes.Pens.random(2000, seed=3)
    np.testing.assert_array_equal(again.widths, pens.widths)
    assert not np.array_equal(strokes.Pens.random(2000, seed=4).widths, pens.widths)


@pytest.mark.parametrize("smooth", [False, True])
def test_a_line_is_drawn_with_the_pen_width_along_its_length(smooth: bool) -> None:
    line = np.zeros((112, 112), bool)
    line[20:92, 56] = True  # a vertical stroke, 72 of the 112 px
    ink = strokes.draw(line, 224, 6, smooth=smooth)
    assert ink.shape == (224, 224)
    assert ink.dtype == np.float32
    assert float(ink.min()) >= 0.0
    assert float(ink.max()) == 1.0
    length = 72 * 224 / 112
    assert 0.85 < float(ink.sum()) / (6 * length) < 1.25  # width x length, round ends
    columns = np.flatnonzero(ink[112] > 0.5)
    assert 5 <= len(columns) <= 7
    assert abs(columns.mean() - 113) < 1.5  # centred on the line
    partial = np.count_nonzero((ink > 0) & (ink < 1))
    assert (partial > 0) == smooth  # anti-aliased edges, or a hard brush


def test_pen_redrawings_look_like_the_serving_preprocessing_output(
    mnist_test_set: MnistSplit,
) -> None:
    digits = mnist_test_set[0][:60]
    drawn = strokes.pen_redraw(digits, strokes.Pens.random(60, seed=0))
    assert drawn.shape == digits.shape
    assert drawn.dtype == np.uint8
    for image in drawn:
        patch = image.astype(np.float32) / 255
        assert 1.1 < stroke_width(patch) < 3.3  # MNIST-like strokes (1.3-2.7), whatever the pen
        total = patch.sum()
        centre_y = patch.sum(axis=1) @ np.arange(IMAGE_SIZE) / total
        centre_x = patch.sum(axis=0) @ np.arange(IMAGE_SIZE) / total
        assert abs(centre_y - 14) < 1.5  # centred by mass
        assert abs(centre_x - 14) < 1.5
        assert image.max() == 255  # saturated ink


def test_pen_digits_are_seeded_and_cached(
    mnist_test_set: MnistSplit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    digits = mnist_test_set[0][:30]
    first = strokes.pen_digits(digits, 7, tmp_path, workers=1)
    key = strokes.fingerprint(digits, strokes.Pens.random(30, 7))
    assert list(tmp_path.glob("*.npy")) == [tmp_path / f"pens-{key}-n30-seed7.npy"]

    redrawn: list[int] = []
    redraw = strokes.pen_redraw

    def counted(digits: npt.NDArray[np.uint8], pens: strokes.Pens) -> npt.NDArray[np.uint8]:
        redrawn.append(len(digits))
        return redraw(digits, pens)

    monkeypatch.setattr(strokes, "pen_redraw", counted)
    np.testing.assert_array_equal(strokes.pen_digits(digits, 7, tmp_path, workers=1), first)
    assert redrawn == [strokes.PROBE]  # only the fingerprint's probe: the rest came from disk
    monkeypatch.undo()
    other_seed = strokes.pen_digits(digits, 8, None, workers=1)
    assert not np.array_equal(other_seed, first)  # other pens
    np.testing.assert_array_equal(strokes.pen_digits(digits, 7, None, workers=1), first)


def test_a_change_in_the_serving_preprocessing_makes_a_new_cache(
    mnist_test_set: MnistSplit, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pens go through the serving preprocessing: a cache drawn before it changed is stale,
    and is replaced; the cache of another seed is left alone."""
    digits = mnist_test_set[0][:20]

    def cache(seed: int) -> str:
        return (
            f"pens-{strokes.fingerprint(digits, strokes.Pens.random(20, seed))}-n20-seed{seed}.npy"
        )

    strokes.pen_digits(digits, 3, tmp_path, workers=1)
    strokes.pen_digits(digits, 4, tmp_path, workers=1)
    other_seed, before = cache(4), cache(3)
    monkeypatch.setattr(strokes, "centre_like_mnist", lambda ink: centre_like_mnist(ink) * 0.5)
    after = cache(3)
    assert after != before
    strokes.pen_digits(digits, 3, tmp_path, workers=1)
    assert sorted(p.name for p in tmp_path.glob("*.npy")) == sorted([after, other_seed])


def test_with_pens_swaps_the_asked_fraction(mnist_test_set: MnistSplit) -> None:
    images = torch.from_numpy(model_batch(mnist_test_set[0][:400]))
    pens = torch.from_numpy(
        model_batch(strokes.pen_redraw(mnist_test_set[0][:400], strokes.Pens.random(400, 0)))
    )
    generator = torch.Generator().manual_seed(0)
    assert torch.equal(with_pens(images, pens, 0.0, generator), images)
    assert torch.equal(with_pens(images, pens, 1.0, generator), pens)
    mixed = with_pens(images, pens, 0.3, generator)
    swapped = (mixed == pens).flatten(1).all(1) & ~(mixed == images).flatten(1).all(1)
    assert 0.2 < float(swapped.float().mean()) < 0.4


def test_thickening_reaches_past_one_dilation(mnist_test_set: MnistSplit) -> None:
    images = torch.from_numpy(model_batch(mnist_test_set[0][:300]))
    once = F.max_pool2d(images, 3, stride=1, padding=1)
    thick = random_thickness(images, 1.0, torch.Generator().manual_seed(0))
    grown = thick.flatten(1).sum(1) / images.flatten(1).sum(1)
    one_step = once.flatten(1).sum(1) / images.flatten(1).sum(1)
    assert bool((grown > one_step * 1.2).any())  # some strokes grow by more than a dilation
    assert bool((grown < 1).any())  # and some are thinned


def _box(image: torch.Tensor) -> int:
    rows = torch.nonzero(image.flatten(0, -2).any(-1)).flatten()
    cols = torch.nonzero(image.flatten(0, -2).any(-2)).flatten()
    return int(max(rows[-1] - rows[0], cols[-1] - cols[0])) + 1


def test_thickened_digits_are_recentred_as_the_serving_would(mnist_test_set: MnistSplit) -> None:
    images = torch.from_numpy(model_batch(mnist_test_set[0][:200]))
    in_place = random_thickness(images, 1.0, torch.Generator().manual_seed(0))
    recentred = random_thickness(images, 1.0, torch.Generator().manual_seed(0), recentre=True)
    served = centred_like_serving(in_place)
    np.testing.assert_array_equal(
        served[0, 0].numpy(), centre_like_mnist(in_place[0, 0].numpy().copy())
    )
    same = (recentred == in_place).flatten(1).all(1)
    centred = (recentred == served).flatten(1).all(1)
    assert bool((same | centred).all())  # each image is one or the other
    thickened = centred & ~same
    assert 0.35 < float(thickened.float().mean()) < 0.65  # half of them are thickened
    # A dilation in place grows the digit past MNIST's 20 px box; the serving fits it back.
    assert max(_box(image) for image in in_place[thickened]) > 20
    assert max(_box(image) for image in recentred[thickened]) <= 20
