"""Tests of mnist_service.engine.frames: lines drawn around a digit, found on masks of ink."""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mnist_service.engine.frames import Box, inside, ruled

Mask = npt.NDArray[np.bool_]
Bytes = npt.NDArray[np.uint8]


def box_of(mask: Mask) -> Box:
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def drawn(
    size: tuple[int, int], lines: list[tuple[int, int, int, int]], width: int, angle: float = 0.0
) -> Mask:
    """A mask of `size` (width, height) with a blob (the digit) in its middle and `lines`
    (x0, y0, x1, y1) drawn `width` px wide, all turned by `angle` degrees."""
    image = Image.new("L", size, 0)
    draw = ImageDraw.Draw(image)
    w, h = size
    draw.ellipse((w * 0.35, h * 0.3, w * 0.65, h * 0.7), outline=255, width=4)
    for line in lines:
        draw.line(line, fill=255, width=width)
    if angle:
        image = image.rotate(angle, resample=Image.Resampling.BILINEAR)
    mask: Mask = np.asarray(image) >= 128
    return mask


def blob_box(size: tuple[int, int]) -> Box:
    """The blob's own box, drawn alone."""
    return box_of(drawn(size, [], 1))


def check_encloses_only_the_blob(mask: Mask, size: tuple[int, int]) -> None:
    part = inside(mask, box_of(mask))
    assert part is not None
    # The blob whole, and nothing of the lines: the part's ink is the blob's (give or take
    # a pixel where the mask was turned).
    assert np.abs(np.subtract(box_of(mask & part), blob_box(size))).max() <= 1


SIZE = (120, 100)
BOX = [(0, 6, 119, 6), (0, 93, 119, 93), (8, 0, 8, 99), (111, 0, 111, 99)]


@pytest.mark.parametrize("width", [1, 3])
def test_a_box_around_the_digit_is_left_out(width: int) -> None:
    check_encloses_only_the_blob(drawn(SIZE, BOX, width), SIZE)


@pytest.mark.parametrize(
    "lines",
    [BOX[1:3], BOX[:2], BOX[2:], BOX[1:]],
    ids=["a line below and one left", "above and below", "left and right", "three sides"],
)
def test_two_or_three_of_its_lines_are_left_out(lines: list[tuple[int, int, int, int]]) -> None:
    check_encloses_only_the_blob(drawn(SIZE, lines, 2), SIZE)


@pytest.mark.parametrize("angle", [-2.0, 1.5])
def test_a_box_turned_a_little_is_found(angle: float) -> None:
    check_encloses_only_the_blob(drawn(SIZE, BOX, 2, angle), SIZE)


def test_a_single_line_is_no_frame() -> None:
    """A line under a digit could be the bar of a 7 or the base of a 2 in a tight crop."""
    mask = drawn(SIZE, [BOX[1]], 2)
    assert inside(mask, box_of(mask)) is None


def test_lines_on_one_side_only_are_no_frame() -> None:
    """Two rules under a digit bound it on one side: like a single line, they could be its own
    strokes (a 2's base drawn twice)."""
    mask = drawn(SIZE, [BOX[1], (0, 80, 119, 80)], 2)
    assert inside(mask, box_of(mask)) is None


def test_a_digit_that_touches_its_box_is_left_as_it_is() -> None:
    """Ink that touches a line might be the digit's own stroke: no frame is taken out."""
    mask = drawn(SIZE, [*BOX, (60, 30, 60, 93)], 2)  # a stroke down from the blob to the line
    assert inside(mask, box_of(mask)) is None


def test_thick_bands_are_strokes_not_lines() -> None:
    mask = drawn(SIZE, [(0, 10, 119, 10), (0, 88, 119, 88)], 20)
    assert inside(mask, box_of(mask)) is None


def test_small_masks_and_ink_that_spans_little_are_let_go_at_once() -> None:
    small = drawn((28, 28), [(0, 2, 27, 2), (0, 25, 27, 25)], 1)
    assert inside(small, box_of(small)) is None
    # Lines of half the width are no form's lines.
    short = drawn(SIZE, [(30, 6, 90, 6), (30, 93, 90, 93)], 2)
    assert inside(short, box_of(short)) is None


def mnist_masks(digits: Bytes, scale: int, margin: int) -> Iterator[Mask]:
    """Each digit cropped to its ink plus `margin` px, enlarged `scale` times (bilinear), as
    masks of faint ink and of strong ink."""
    for digit in digits:
        rows, cols = np.flatnonzero(digit.any(axis=1)), np.flatnonzero(digit.any(axis=0))
        crop = np.pad(digit, margin)[
            rows[0] : rows[-1] + 1 + 2 * margin, cols[0] : cols[-1] + 1 + 2 * margin
        ]
        size = (crop.shape[1] * scale, crop.shape[0] * scale)
        big = np.asarray(Image.fromarray(crop).resize(size, Image.Resampling.BILINEAR))
        yield big >= 40
        yield big >= 128


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("margin", [0, 2])
def test_no_mnist_digit_is_taken_for_a_frame(
    mnist_test_set: tuple[Bytes, Bytes], scale: int, margin: int
) -> None:
    """1,000 MNIST test digits cropped to their ink (or with a margin) and enlarged: their own
    strokes (a 7's bar, a 4's bar and stem, a 0's sides) are never a frame."""
    for mask in mnist_masks(mnist_test_set[0][:1000], scale, margin):
        assert inside(mask, box_of(mask)) is None


# --- ruled lines --------------------------------------------------------------------------


def test_a_line_under_the_digit_that_runs_past_it_is_ruled_out() -> None:
    mask = drawn(SIZE, [(0, 85, 119, 85)], 2)
    lines = ruled(mask, box_of(mask))
    assert lines is not None
    assert not (mask & ~lines)[80:90].any()  # the whole line
    assert np.array_equal(box_of(mask & ~lines), blob_box(SIZE))  # and nothing of the blob


def test_where_a_stroke_crosses_a_rule_the_stroke_is_kept() -> None:
    # A rule through the blob's middle, and a stroke down across it.
    mask = drawn(SIZE, [(0, 50, 119, 50), (60, 30, 60, 75)], 2)
    lines = ruled(mask, box_of(mask))
    assert lines is not None
    kept = mask & ~lines
    stroke = np.flatnonzero(mask[40])  # the stroke's columns, above the rule
    rule = np.flatnonzero(mask[:, 5])  # the rule's rows, left of the blob
    assert kept[rule[0] : rule[-1] + 1, stroke].all()  # the crossing
    assert not kept[rule[0] : rule[-1] + 1, :30].any()  # the rule beside the blob


def test_a_line_that_ends_where_the_digit_does_is_no_rule() -> None:
    """A 7's bar or a 2's base: as long as the digit is wide, at one end at least."""
    blob = blob_box(SIZE)
    mask = drawn(SIZE, [(blob[2], 85, 119, 85)], 2)  # from the blob's left edge on
    assert ruled(mask, box_of(mask)) is None


def test_upright_lines_are_no_rules() -> None:
    """A 4's stem runs past its other strokes above and below: upright lines are left to the
    frames step (two of them or more, clear of the digit)."""
    mask = drawn(SIZE, [(10, 0, 10, 99)], 2)
    assert ruled(mask, box_of(mask)) is None


@pytest.mark.parametrize("scale", [2, 4])
@pytest.mark.parametrize("margin", [0, 2])
def test_no_mnist_digit_has_a_stroke_taken_for_a_rule(
    mnist_test_set: tuple[Bytes, Bytes], scale: int, margin: int
) -> None:
    """1,000 MNIST test digits, as in the frames' test above: no stroke is ruled out."""
    for mask in mnist_masks(mnist_test_set[0][:1000], scale, margin):
        assert ruled(mask, box_of(mask)) is None


PROPERTIES = settings(derandomize=True, database=None, deadline=None, max_examples=300)


@st.composite
def masks(draw: st.DrawFn) -> Mask:
    """Masks of any mix of long and short lines at any angle and width, ruled or squared
    grids, blobs, and noise, up to 160 px a side."""
    width, height = draw(st.integers(8, 160)), draw(st.integers(8, 160))
    image = Image.new("L", (width, height), 0)
    pen = ImageDraw.Draw(image)
    for _ in range(draw(st.integers(0, 6))):
        x0, x1 = draw(st.integers(-5, width + 5)), draw(st.integers(-5, width + 5))
        y0, y1 = draw(st.integers(-5, height + 5)), draw(st.integers(-5, height + 5))
        if draw(st.booleans()):  # near level or upright: the lines a frame is made of
            y1 = y0 + draw(st.integers(-3, 3)) if draw(st.booleans()) else y1
            x1 = x0 + draw(st.integers(-3, 3)) if y1 != y0 else x1
        pen.line((x0, y0, x1, y1), fill=255, width=draw(st.integers(1, 12)))
    spacing = draw(st.integers(0, 20))
    if spacing >= 3:  # ruled or squared paper
        pixels = np.asarray(image).copy()
        pixels[draw(st.integers(0, spacing - 1)) :: spacing] = 255
        if draw(st.booleans()):
            pixels[:, draw(st.integers(0, spacing - 1)) :: spacing] = 255
        image = Image.fromarray(pixels)
    mask: Mask = np.asarray(image) >= 128
    noise = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).random(mask.shape)
    return mask | (noise < draw(st.sampled_from([0.0, 0.0, 0.01, 0.2])))


@PROPERTIES
@given(masks())
def test_any_mask_gives_a_part_with_ink_in_it_or_none(mask: Mask) -> None:
    """Whatever the lines: no error; rules (where found) are inked pixels, not all of them; and
    a part (where one is found) is a box of the mask that holds ink and leaves ink out (the
    lines)."""
    if not mask.any():
        return
    lines = ruled(mask, box_of(mask))
    if lines is not None:
        assert lines.shape == mask.shape
        assert not (lines & ~mask).any()  # only inked pixels are ruled out
        assert (mask & ~lines).any()  # and never all of them
    part = inside(mask, box_of(mask))
    if part is None:
        return
    assert part.shape == mask.shape
    assert part.dtype == np.bool_
    assert np.count_nonzero(mask & part) >= 8
    assert np.count_nonzero(mask & ~part) > 0
    rows, cols = np.flatnonzero(part.any(axis=1)), np.flatnonzero(part.any(axis=0))
    assert part[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1].all()  # a box
