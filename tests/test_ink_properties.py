"""Properties of the ink map on people's images: real MNIST digits cropped, shrunk, blown up,
in either polarity, on paper of any level, in even or uneven light.

Each image is made from a known ink coverage (the digit, resized as the image is), so the test
knows which pixels are the darkest strokes and which are paper: no step may turn the first into
paper or the second into ink. Hypothesis draws the digits and the ways of drawing them.
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_service.engine.preprocess import (
    FIND_SIDE,
    WORKING_SIDE,
    ink_map,
    load,
    open_image,
    preprocess,
)

Floats = npt.NDArray[np.float32]
Bytes = npt.NDArray[np.uint8]

PROPERTIES = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=150,
    suppress_health_check=[HealthCheck.too_slow],
)
DIGITS = 500
"""Hypothesis picks among the first this many test digits."""
LARGEST = 2 * FIND_SIDE - 1
"""Images up to this side are mapped whole and at their own size (`_digit_box`), so the
ink map lines up with the image pixel for pixel."""
RESAMPLING = (Image.Resampling.NEAREST, Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)
STRONG = 0.8
"""Coverage at or above this fraction of the image's strongest is a stroke's core."""


@pytest.fixture(scope="module")
def digits(mnist_test_set: tuple[Bytes, Bytes]) -> Bytes:
    return mnist_test_set[0][:DIGITS]


def cropped(digit: Bytes, margin: int) -> Floats:
    """The digit's coverage cut at its ink's box plus `margin` px of background (0: the ink
    touches every edge)."""
    rows, cols = np.nonzero(digit.any(axis=1))[0], np.nonzero(digit.any(axis=0))[0]
    padded = np.pad(digit, margin).astype(np.float32) / np.float32(255)
    return padded[rows[0] : rows[-1] + 1 + 2 * margin, cols[0] : cols[-1] + 1 + 2 * margin]


def resized(coverage: Floats, longer: int, resample: Image.Resampling) -> Floats:
    """Coverage resized (aspect kept) so its longer side is `longer` px, clipped to [0, 1]
    (bicubic overshoots)."""
    height, width = coverage.shape
    scale = longer / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    out = np.asarray(Image.fromarray(coverage).resize(size, resample), np.float32)
    return np.clip(out, 0, 1)


@dataclass(frozen=True)
class Drawing:
    """An image file and the ink coverage each of its pixels was made from."""

    data: bytes
    coverage: Floats


def draw(coverage: Floats, paper: float, ink: float, light: Floats | None = None) -> Drawing:
    """Grey pixels `paper + (ink - paper) * coverage`, dimmed by `light`, as a PNG."""
    pixels = paper + (ink - paper) * coverage
    if light is not None:
        pixels = pixels * light
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return Drawing(buffer.getvalue(), coverage)


@st.composite
def levels(draw_: st.DrawFn) -> tuple[float, float]:
    """(paper, ink) grey levels at least 90 apart, dark on light or light on dark."""
    if draw_(st.booleans()):
        paper = draw_(st.floats(150, 255))
        return paper, draw_(st.floats(0, paper - 90))
    paper = draw_(st.floats(0, 105))
    return paper, draw_(st.floats(paper + 90, 255))


@st.composite
def evenly_lit(draw_: st.DrawFn, digits: Bytes) -> Drawing:
    """A digit cropped (tightly, or with up to 6 px at MNIST's scale), then either scaled
    x1-x4 or shrunk to an 8-16 px thumbnail shown at 64-127 px, in either polarity."""
    digit = digits[draw_(st.integers(0, DIGITS - 1))]
    coverage = cropped(digit, draw_(st.integers(0, 6)))
    resample = draw_(st.sampled_from(RESAMPLING))
    if draw_(st.booleans()):
        longer = round(max(coverage.shape) * draw_(st.integers(1, 4)))
        coverage = resized(coverage, min(longer, LARGEST), resample)
    else:
        thumbnail = resized(coverage, draw_(st.integers(8, 16)), Image.Resampling.LANCZOS)
        coverage = resized(thumbnail, draw_(st.integers(64, LARGEST)), resample)
    return draw(coverage, *draw_(levels()))


@st.composite
def unevenly_lit(draw_: st.DrawFn, digits: Bytes) -> Drawing:
    """A photo's framing: the digit in the middle third of a 96-127 px frame, the light
    falling by up to 35 % across it in any direction."""
    digit = digits[draw_(st.integers(0, DIGITS - 1))]
    side = draw_(st.integers(96, LARGEST))
    inner = resized(cropped(digit, 0), side // 3, Image.Resampling.BILINEAR)
    coverage = np.zeros((side, side), np.float32)
    top = (side - inner.shape[0]) // 2
    left = (side - inner.shape[1]) // 2
    coverage[top : top + inner.shape[0], left : left + inner.shape[1]] = inner
    angle = draw_(st.floats(0, 2 * np.pi))
    fall = draw_(st.floats(0, 0.35))
    y, x = np.mgrid[0:side, 0:side].astype(np.float32) / side - 0.5
    light = (1 - fall * (0.5 + np.cos(angle) * x + np.sin(angle) * y)).astype(np.float32)
    paper = draw_(st.floats(200, 255))
    return draw(coverage, paper, draw_(st.floats(0, paper - 120)), light)


def shows_paper(coverage: Floats) -> bool:
    """Whether at least half of the image's border is bare paper. A thin 1 cropped to its ink
    and shrunk to a thumbnail can be ink all over: no paper to measure, and no way to tell
    which level is the ink."""
    border = np.concatenate([coverage[0], coverage[-1], coverage[:, 0], coverage[:, -1]])
    return bool(np.count_nonzero(border == 0) >= border.size / 2)


def assert_strokes_stay_ink_and_paper_stays_paper(drawing: Drawing) -> None:
    coverage = drawing.coverage
    assume(shows_paper(coverage))
    opened = open_image(drawing.data, 1 << 24)
    assert not isinstance(opened, np.ndarray)  # a file to decode, not MNIST-format pixels
    ink = ink_map(load(opened))
    assert ink.shape == coverage.shape, "the map must line up with the image"
    core = coverage >= STRONG * coverage.max()
    assert float(ink[core].min()) >= 0.5, "a stroke's core was mapped to paper"
    assert not ink[coverage == 0].any(), "paper was mapped to ink"


@pytest.mark.parametrize("light", [evenly_lit, unevenly_lit], ids=["even light", "uneven light"])
def test_the_strokes_stay_ink_and_the_paper_stays_paper(
    digits: Bytes, light: Callable[[Bytes], st.SearchStrategy[Drawing]]
) -> None:
    @PROPERTIES
    @given(light(digits))
    def check(drawing: Drawing) -> None:
        assert_strokes_stay_ink_and_paper_stays_paper(drawing)

    check()


# --- low resolution: strokes whole, loops open ------------------------------------------------


def _components(mask: npt.NDArray[np.bool_]) -> int:
    """4-connected regions of a mask (a flood fill: the images are 28x28)."""
    seen = np.zeros_like(mask)
    count = 0
    height, width = mask.shape
    for start in zip(*np.nonzero(mask), strict=True):
        if seen[start]:
            continue
        count += 1
        seen[start] = True
        stack = [start]
        while stack:
            y, x = stack.pop()
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < height and 0 <= nx < width and mask[ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
    return count


def topology(image: Floats) -> tuple[int, int]:
    """(strokes, loops): the pieces of ink at half of full scale, and the background regions
    they enclose."""
    inked = image >= 0.5 * float(image.max())
    return _components(inked), _components(np.pad(~inked, 1, constant_values=True)) - 1


def as_shown(data: bytes) -> Floats:
    """What the file shows, brought to the 20 px box by a plain resize: dark ink of a light
    thumbnail, its own contrast, no paper model, no stroke treatment."""
    ink = 255 - np.asarray(Image.open(io.BytesIO(data)).convert("L"), np.float32)
    ink /= ink.max()
    rows, cols = np.nonzero((ink > 0.15).any(axis=1))[0], np.nonzero((ink > 0.15).any(axis=0))[0]
    return resized(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1], 20, RESAMPLING[1])


def thumbnail(digit: Bytes, side: int) -> bytes:
    """The digit cropped to its ink, shrunk to `side` px, shown at 96 px (bilinear), dark on
    white."""
    coverage = resized(cropped(digit, 0), side, Image.Resampling.LANCZOS)
    return draw(resized(coverage, 96, RESAMPLING[1]), 255, 0).data


@pytest.mark.parametrize("side", [12, 16])
def test_a_blown_up_thumbnail_keeps_its_strokes_whole_and_its_loops_open(
    digits: Bytes, side: int
) -> None:
    """Against what the file itself shows: the preprocessing may join a stroke that a plain
    resize breaks (it saturates strokes) but not break one, and may not close a loop. Counted
    at half of full ink, where a loop one pixel wide flips with rounding: 98-100 % of 300
    digits hold both at 12 and 16 px; the bound leaves a few digits of room."""
    count = 150
    whole = loops = 0
    for digit in digits[:count]:
        data = thumbnail(digit, side)
        shown = topology(as_shown(data))
        out = topology(preprocess(data, max_pixels=1 << 24)[0])
        whole += out[0] <= shown[0]
        loops += out[1] >= shown[1]
    assert whole >= 0.96 * count
    assert loops >= 0.96 * count


# --- decoding at the size the digit needs ----------------------------------------------------


@pytest.mark.parametrize(
    ("size", "decoded"),
    [((4000, 3000), (500, 375)), ((1024, 768), (256, 192)), ((640, 480), (320, 240))],
)
def test_a_large_jpeg_is_decoded_at_a_reduced_scale(
    digits: Bytes, size: tuple[int, int], decoded: tuple[int, int]
) -> None:
    """libjpeg decodes at 1/2-1/8 scale, keeping the shorter side at least WORKING_SIDE."""
    page = np.full((size[1], size[0]), 235, np.uint8)
    digit = Image.fromarray(255 - digits[0]).resize((size[1] // 3, size[1] // 3))
    page[size[1] // 3 : size[1] // 3 + digit.height, size[0] // 3 : size[0] // 3 + digit.width] = (
        np.asarray(digit)
    )
    buffer = io.BytesIO()
    Image.fromarray(page).save(buffer, "JPEG", quality=90)
    opened = open_image(buffer.getvalue(), 1 << 24)
    assert isinstance(opened, Image.Image)
    assert opened.size == size
    image = load(opened)
    assert image.size == decoded
    assert min(image.size) >= WORKING_SIDE
    assert preprocess(buffer.getvalue(), max_pixels=1 << 24).max() == 1.0
