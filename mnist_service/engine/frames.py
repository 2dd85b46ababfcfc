"""Lines drawn around a digit or under it, and the part of the image they enclose. Pure numpy
on masks of ink; knows nothing of files, Pillow or the model. (Ruled lines, which need not
enclose anything, are `ruled`'s: see there.)

A digit written in a form's box comes with the box: four long straight lines, or two or three
where the crop cut the others (a field ruled above and below, a corner of a table). Read as
ink, they make the digit's box the frame's, and the model sees a square. `inside` finds such
lines and tells where the digit is between them, so the preprocessing can leave them out.

It must never take a digit's own strokes for a frame: the bar of a 7 or a 4 is as long and as
straight as a form's line in a tight crop. So lines count as a frame only where all of these
hold:

- each runs along at least `SPAN` of the image's side, and is thin (`THIN`), straight and
  near level or upright (up to `SKEW`: a scan or a photo turned a little);
- at least two of them bound the part that holds the most other ink (two sides of a box, or
  a line above and one below);
- that ink is clear of every line that bounds it: it touches none (a 4's bar and stem, a 7's
  bar and its stroke, touch). A digit written across its box's line is left as it is.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

__all__ = ["inside", "ruled"]

Mask = npt.NDArray[np.bool_]
Spans = list[tuple[int, int]]
"""Runs of rows (or columns) of a mask, [start, stop), in order and apart."""

SPAN: Final = 0.75
"""A line runs along at least this share of the image's side (a form's line crosses the whole
crop)."""

THIN: Final = 0.08
"""A line is at most this share of the image's side thick, plus 2 px (its edges)."""

SKEW: Final = 0.04
"""Lines rise or fall by up to this share of their length (2.3 degrees): a page scanned or
photographed a little turned."""

MIN_SIDE: Final = 32
"""Masks smaller than this on either side are not looked at (a digit in a box that small would
be a dozen pixels tall)."""

MIN_INK: Final = 8
"""The part the lines enclose must hold at least this many inked pixels: a digit."""

OVERHANG: Final = 0.15
"""A ruled line runs past the rest of the ink at both ends by at least this share of its
length (`ruled`); a digit's own bar ends where its other strokes do, at one end at least."""


Box = tuple[int, int, int, int]
"""The ink's bounding box in a mask: (top, bottom, left, right), bottom and right exclusive."""


def inside(inked: Mask, box: Box) -> Mask | None:
    """Where the digit is, within lines drawn around it; None where there are no such lines
    (see the module's docstring). `box` bounds the mask's ink. The part is bounded by the
    lines, and shrunk to within a pixel of the ink it holds on the sides where they are, so no
    edge of a line stays in it.

    Most images are let go at once: by their size, by the ink's box (it must span `SPAN` of
    the image one way or the other: an MNIST digit spans 20 px of 28), and by the ink along
    its outer edges (`_outermost`)."""
    height, width = inked.shape
    top, bottom, left, right = box
    if min(height, width) < MIN_SIDE:
        return None
    if bottom - top < SPAN * height and right - left < SPAN * width:
        return None
    if not _outermost(inked, box):
        return None
    level, upright = _lines(inked), _lines(inked.T)
    if len(level) + len(upright) < 2:
        return None
    # The ink on no line, and in which rows and columns it lies.
    other = inked.copy()
    for start, stop in level:
        other[start:stop] = False
    for start, stop in upright:
        other[:, start:stop] = False
    bounds = []
    bounded = 0
    for lines, counts in ((level, other.sum(axis=1)), (upright, other.sum(axis=0))):
        most = _most(lines, counts)
        if most is None:
            return None  # lines everywhere: ruled or squared paper, not a frame
        start, stop = most
        below = any(end == start for _, end in lines)
        above = any(begin == stop for begin, _ in lines)
        held = np.flatnonzero(counts[start:stop])
        if held.size == 0:
            return None
        first, last = start + int(held[0]), start + int(held[-1])
        if (below and first == start) or (above and last == stop - 1):
            return None  # the ink touches a line: a digit's own strokes, or one on its box
        bounded += below + above
        # Within a pixel of the ink on a bounded side; to the image's edge on the others.
        bounds.append((first - 1 if below else 0, last + 2 if above else counts.size))
    rows, columns = (slice(*ends) for ends in bounds)
    if bounded < 2 or np.count_nonzero(other[rows, columns]) < MIN_INK:
        return None
    part = np.zeros_like(inked)
    part[rows, columns] = True
    return part


def ruled(inked: Mask, box: Box) -> Mask | None:
    """The pixels of ruled lines to leave out (a line under the digit, a notebook's rules
    across it): level lines (`_lines`) that run past the rest of the ink at both ends
    (`OVERHANG`) and are `THIN` on average, less where a stroke crosses them (ink next to the
    line on both sides, within the line's own thickness across) or runs along them (where the
    line is thicker than along most of its length); None where there are none. `box` bounds
    the ink.

    Level lines only: a digit's long level strokes end where its other strokes do (a 7's bar,
    a 2's base, a 5's and a 4's bar), but an upright one need not (a 4's stem runs past its
    other strokes above and below). A stroke that ends on a line (a digit written on it) loses
    the line under its end; one that runs along it keeps the line under it."""
    height, width = inked.shape
    _, _, left, right = box
    if min(height, width) < MIN_SIDE or right - left < SPAN * width:
        return None
    spans = _lines(inked)
    if not spans:
        return None
    rest = inked.copy()
    for start, stop in spans:
        rest[start:stop] = False
    columns = np.flatnonzero(rest.any(axis=0))
    if columns.size == 0:
        return None  # nothing but lines: no digit to leave them out of
    first, last = int(columns[0]), int(columns[-1])
    out = np.zeros_like(inked)
    for start, stop in spans:
        along = np.flatnonzero(inked[start:stop].any(axis=0))
        begin, end = int(along[0]), int(along[-1])
        if min(first - begin, end - last) < OVERHANG * (end - begin):
            continue  # the line ends where the digit does: it may be a stroke of it
        if np.count_nonzero(inked[start:stop]) > THIN * height * along.size:
            continue  # thicker on average than a line: a bar, blurred or broad
        above = inked[start - 1] if start > 0 else np.zeros(width, bool)
        below = inked[stop] if stop < height else np.zeros(width, bool)
        crossed = _spread(above, stop - start) & _spread(below, stop - start)
        # A stroke along the line (a 2's base on it) makes it thicker there than elsewhere.
        thickness = np.count_nonzero(inked[start:stop], axis=0)
        along_it = thickness > int(np.median(thickness[begin : end + 1])) + 1
        out[start:stop] |= inked[start:stop] & ~(crossed | along_it)
    return out if out.any() else None


def _spread(flags: npt.NDArray[np.bool_], reach: int) -> npt.NDArray[np.bool_]:
    """`flags` widened by `reach` each way."""
    spread = flags.copy()
    for shift in range(1, reach + 1):
        spread[shift:] |= flags[:-shift]
        spread[:-shift] |= flags[shift:]
    return spread


def _outermost(inked: Mask, box: Box) -> bool:
    """Whether the outermost ink, on two sides or more, could be lines: a strip along the
    ink's box, as thick as a line may be (`_thickest`), in which `SPAN` of the image's side is
    inked."""
    height, width = inked.shape
    top, bottom, left, right = box
    deep, wide = _thickest(height, width), _thickest(width, height)
    strips = (
        inked[top : top + deep].any(axis=0),
        inked[max(bottom - deep, 0) : bottom].any(axis=0),
        inked[:, left : left + wide].any(axis=1),
        inked[:, max(right - wide, 0) : right].any(axis=1),
    )
    sides = (width, width, height, height)
    inked_along = [int(np.count_nonzero(strip)) for strip in strips]
    long = [bool(along >= SPAN * side) for along, side in zip(inked_along, sides, strict=True)]
    return sum(long) >= 2


def _thickest(height: int, width: int) -> int:
    """The most rows a level line of a height x width mask lies within: `THIN` of the height
    and 2 px, and a rise of `SKEW` of the width."""
    return int(THIN * height) + 2 + int(np.ceil(SKEW * width))


def _lines(inked: Mask) -> Spans:
    """The rows that the level lines of a mask lie within (the columns of the upright ones, of
    its transpose): runs of rows in which, taken with the rows up to `SKEW` of the width
    around them, `SPAN` of the columns are inked, and that are thin (`THIN`)."""
    height, width = inked.shape
    reach = max(1, int(np.ceil(SKEW * width / 2)))
    near = inked.copy()
    for shift in range(1, reach + 1):
        near[shift:] |= inked[:-shift]
        near[:-shift] |= inked[shift:]
    spans: Spans = []
    for start, stop in _runs(near.sum(axis=1) >= SPAN * width):
        if stop - start - 2 * reach > THIN * height + 2:
            continue  # a thick band: strokes
        # The rows the line's pixels lie within: each long row has them within `reach`.
        start, stop = max(start - reach, 0), min(stop + reach, height)
        if spans and start <= spans[-1][1]:
            start = spans.pop()[0]  # two lines that close are one
        spans.append((start, stop))
    return spans


def _runs(flags: Mask) -> Spans:
    """[start, stop) of each run of True."""
    if not flags.any():
        return []
    edges = np.flatnonzero(np.diff(flags.astype(np.int8), prepend=0, append=0))
    return [(int(start), int(stop)) for start, stop in edges.reshape(-1, 2)]


def _most(spans: Spans, counts: npt.NDArray[np.intp]) -> tuple[int, int] | None:
    """Of the parts between the lines' spans (and the image's edges), the one whose rows hold
    the most of `counts`: [start, stop); None where the spans leave no row."""
    cuts = [0, *(edge for span in spans for edge in span), counts.size]
    bounds = zip(cuts[::2], cuts[1::2], strict=True)
    parts = [(start, stop) for start, stop in bounds if stop > start]
    if not parts:
        return None
    held = [int(counts[start:stop].sum()) for start, stop in parts]
    return parts[int(np.argmax(held))]
