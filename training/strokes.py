"""Digits redrawn with a pen along their centre line, as the serving preprocessing outputs them.

People draw digits with pens far thinner than MNIST's broad strokes, on canvases of a few
hundred pixels; the serving preprocessing (`mnist_service.engine.preprocess.centre_like_mnist`)
shrinks such a drawing to MNIST's 20 px box and widens its strokes to MNIST's. A digit drawn
that way loses what a thin pen cannot draw: an inked-in loop becomes a line, touching strokes
part. Training on MNIST's own digits redrawn like that teaches the model what the service will
really feed it for a pen drawing: each digit is thinned to its centre line at 4x
(`centre_lines`), drawn again by `draw` on a canvas of random size with a round pen of random
width, anti-aliased or not, then put through the serving preprocessing's own crop, resize,
stroke normalisation and centring. The robustness report (`export.robustness`) draws its pen
variants of the test digits with the same two functions.

A loop that a broad pen inked in still shows in most MNIST digits as paper a little less
inked than the ring around it (the eye of a filled 9, 6 or 8). A person with a thin pen draws
that loop as a loop, so the centre line keeps it open: background enclosed by brighter ink in
the 28 px digit (`enclosed`, at any of `LOOP_LEVELS`) is cut out of the stroke before
thinning, and the thinning, which keeps holes, draws a loop around it. A loop inked in with
no eye left (the solid head of a 9) is a blob more than twice as deep as the digit's own
stroke (`open_blob`): its core is cut out the same way. A stroke so faint that its traced
outline breaks into pieces is joined again where the digit shows ink all along the gap
(`bridge`): a thin pen does not lift where the broad one only pressed lightly.

The redrawings of the 60,000 training digits take about two minutes on two cores,
so they are cached next to the MNIST files, keyed by the seed and a fingerprint of the
redrawing itself (`fingerprint`): a change anywhere along the way, here or in the serving
preprocessing, makes a new cache instead of reusing a stale one, and the stale one is deleted.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

from mnist_service.constants import IMAGE_SIZE, PIXEL_MAX
from mnist_service.engine.preprocess import centre_like_mnist, scale_pixels

log = logging.getLogger(__name__)

THIN_SCALE: Final = 4
"""The centre line is traced at this multiple of 28 px (MNIST's strokes are ~10 px wide there)."""

CANVAS_SIDES: Final = (128, 320)
"""Training digits are drawn on square canvases of a random side in this range (px)."""

MAX_PEN_WIDTH: Final = 0.05
"""Training pens are from 1 px to this fraction of the canvas wide (log-uniform): a hairline to
a felt tip. Broader markers look like MNIST's own strokes, which the model sees anyway."""

ALIASED_FRACTION: Final = 0.25
"""Fraction of training pens drawn without anti-aliasing (a hard-edged canvas brush)."""

SUPERSAMPLE: Final = 2
"""Anti-aliased pens are drawn at this multiple of their size, then box-averaged down."""

_NEIGHBOURS: Final = ((0, 1), (1, 0), (1, 1), (1, -1))
"""Offsets to the next pixel of an 8-connected centre line, each pair counted once."""

SMOOTHING: Final = THIN_SCALE / 4
"""Gaussian blur (px at 4x, a quarter pixel at 28 px) that rounds the upscaled outline before
it is traced at half of full scale. More (half a pixel at 28 px, as before) fades faint thin
strokes below the threshold, so they broke into dots, and rounds shapes off: the redrawn test
digits that three ConvNets misread went from 135-138 to 111-113 in 10,000, and from 116 to 96
for a third, without retraining."""

LOOP_LEVELS: Final = (0.6, 0.7, 0.8, 0.9)
"""Background enclosed by ink brighter than one of these fractions of full scale, in the 28 px
digit, is a loop the writer drew: it is kept open even where the stroke's outline (traced at
half of full scale) covers it."""

BLOB_DEPTH: Final = 2.0
"""Ink deeper inside the outline than this multiple of the stroke's own half-width (its median
along the centre line) is a loop the writer inked in solid, not a stroke: it is opened. The
10,000 test digits redrawn with random training pens (seed 1) that three ConvNets misread went
from 101 / 101 / 99 to 91 / 96 / 89, without retraining (1.8: 97 / 104 / 93; 2.5 and a wider
cut: 97 / 98 / 95). Cutting short side branches of the centre line as well (spurs of a blunt
stroke end) misread twice as many: at MNIST's width the 7's bar and the 4's arm are such
branches too."""

BRIDGE_INK: Final = 0.2
"""Two pieces of a centre line are joined by a straight line between their ends where the
smoothed 4x digit has at least this fraction of full ink all along it: a faint stroke that fell
below the trace's threshold, not a gap the writer left. With `BLOB_DEPTH`: 88 / 91 / 86."""

BRIDGE_REACH: Final = 6 * THIN_SCALE
"""Ends further apart than this (px at 4x: 6 px at 28 px) are never joined."""

_RING: Final = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))
"""Offsets to the eight neighbours of a pixel."""

PROBE: Final = 16
"""Digits redrawn to fingerprint the redrawing for the cache's name."""

CHUNK: Final = 500
"""Digits thinned together in one vectorised pass."""


def centre_lines(digits: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """The strokes of digits [N, 28, 28] thinned to a one-pixel centre line, [N, 112, 112],
    with the loops the writer left visible or inked in solid kept as loops, and faint strokes
    kept whole."""
    side = IMAGE_SIZE * THIN_SCALE
    smooth = np.empty((len(digits), side, side), np.uint8)
    for index, digit in enumerate(digits):
        big = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
        smooth[index] = np.asarray(big.filter(ImageFilter.GaussianBlur(SMOOTHING)))
    loops = np.zeros(digits.shape, bool)
    for level in LOOP_LEVELS:
        loops |= enclosed(digits <= level * PIXEL_MAX)
    masks = (smooth > PIXEL_MAX / 2) & ~loops.repeat(THIN_SCALE, axis=1).repeat(THIN_SCALE, axis=2)
    lines = thin(masks)
    depths = depth(masks)
    blobs = [i for i in range(len(digits)) if open_blob(masks[i], depths[i], lines[i])]
    if blobs:
        lines[blobs] = thin(masks[blobs])
    inked = smooth >= BRIDGE_INK * PIXEL_MAX
    for index, line in enumerate(lines):
        lines[index] = bridge(line, inked[index])
    return lines


def enclosed(free: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The pixels of masks [N, H, W] that no path of 4-connected `free` pixels joins to the
    border: the holes that `free` (the background) leaves inside the ink."""
    outside = np.zeros_like(free)
    outside[:, [0, -1], :] = free[:, [0, -1], :]
    outside[:, :, [0, -1]] |= free[:, :, [0, -1]]
    while True:
        grown = outside.copy()
        grown[:, 1:] |= outside[:, :-1]
        grown[:, :-1] |= outside[:, 1:]
        grown[:, :, 1:] |= outside[:, :, :-1]
        grown[:, :, :-1] |= outside[:, :, 1:]
        grown &= free
        if np.array_equal(grown, outside):
            return free & ~outside
        outside = grown


def thin(inked: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Zhang-Suen thinning of masks [N, H, W] to one-pixel lines, all masks at once.

    A mask that lost no pixel in a whole pass is done (the next pass would see the same mask),
    so each pass works on the masks still thinning only: a chunk's passes are as many as its
    thickest stroke needs, and most masks finish long before it."""
    image = np.pad(inked, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    active = np.arange(len(image))
    while active.size:
        work = image[active]
        inner = work[:, 1:-1, 1:-1]
        changed = np.zeros(len(active), bool)
        for first in (True, False):
            p2, p3, p4 = work[:, :-2, 1:-1], work[:, :-2, 2:], work[:, 1:-1, 2:]
            p5, p6, p7 = work[:, 2:, 2:], work[:, 2:, 1:-1], work[:, 2:, :-2]
            p8, p9 = work[:, 1:-1, :-2], work[:, :-2, :-2]
            ring = (p2, p3, p4, p5, p6, p7, p8, p9, p2)
            count = p2 + p3 + p4 + p5 + p6 + p7 + p8 + p9  # pixels are 0 or 1: no overflow
            # A 0 -> 1 step around the ring (b > a) is one crossing into ink.
            crossings = sum((b > a).view(np.uint8) for a, b in itertools.pairwise(ring))
            if first:
                side_ok = ((p2 & p4 & p6) == 0) & ((p4 & p6 & p8) == 0)
            else:
                side_ok = ((p2 & p4 & p8) == 0) & ((p2 & p6 & p8) == 0)
            remove = (inner == 1) & (count >= 2) & (count <= 6) & (crossings == 1) & side_ok
            inner[remove] = 0
            changed |= remove.any(axis=(1, 2))
        image[active] = work
        active = active[changed]
    return image[:, 1:-1, 1:-1].astype(bool)


def depth(masks: npt.NDArray[np.bool_]) -> npt.NDArray[np.int16]:
    """How many erosions each pixel of masks [N, H, W] survives, alternating 4- and
    8-neighbourhoods (an octagonal, nearly Euclidean distance to the outside, plus one)."""
    out = np.zeros(masks.shape, np.int16)
    inside = masks.copy()
    octagonal = False
    while inside.any():
        out += inside
        pad = np.pad(inside, ((0, 0), (1, 1), (1, 1)))
        eroded = inside & pad[:, :-2, 1:-1] & pad[:, 2:, 1:-1]
        eroded &= pad[:, 1:-1, :-2] & pad[:, 1:-1, 2:]
        if octagonal:
            eroded &= pad[:, :-2, :-2] & pad[:, :-2, 2:] & pad[:, 2:, :-2] & pad[:, 2:, 2:]
        inside, octagonal = eroded, not octagonal
    return out


def _grow(mask: npt.NDArray[np.bool_], steps: int) -> npt.NDArray[np.bool_]:
    """`mask` [H, W] dilated `steps` times by its 4-neighbourhood."""
    for _ in range(steps):
        pad = np.pad(mask, 1)
        mask = mask | pad[:-2, 1:-1] | pad[2:, 1:-1] | pad[1:-1, :-2] | pad[1:-1, 2:]
    return mask


def open_blob(
    mask: npt.NDArray[np.bool_], depths: npt.NDArray[np.int16], line: npt.NDArray[np.bool_]
) -> bool:
    """Cut the core of any blob out of `mask` [H, W], in place: ink more than `BLOB_DEPTH`
    times as deep as the stroke's median `depths` along its centre line `line`, widened by
    half a stroke so that the loop drawn around it shows. Whether there was one."""
    along = depths[line]
    if not along.size:
        return False
    half_width = float(np.median(along))
    core = depths > BLOB_DEPTH * half_width
    if not core.any():
        return False
    mask &= ~_grow(core, round(half_width / 2))
    return True


def _label(line: npt.NDArray[np.bool_]) -> npt.NDArray[np.int32]:
    """Labels 0, 1, ... of the 8-connected pieces of `line` [H, W]; -1 off the line."""
    labels = np.full(line.shape, -1, np.int32)
    height, width = line.shape
    count = 0
    for start in zip(*np.nonzero(line), strict=True):
        if labels[start] >= 0:
            continue
        labels[start] = count
        todo = [start]
        while todo:
            y, x = todo.pop()
            for dy, dx in _RING:
                near = (y + dy, x + dx)
                inside = 0 <= near[0] < height and 0 <= near[1] < width
                if inside and line[near] and labels[near] < 0:
                    labels[near] = count
                    todo.append(near)
        count += 1
    return labels


def bridge(line: npt.NDArray[np.bool_], inked: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """`line` [H, W] with its pieces joined, nearest ends first, by straight lines no longer
    than `BRIDGE_REACH` that run over `inked` pixels only."""
    labels = _label(line)
    pieces = int(labels.max()) + 1
    if pieces < 2:
        return line
    pad = np.pad(line, 1).astype(np.int8)
    height, width = line.shape
    neighbours = sum(pad[1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width] for dy, dx in _RING)
    ends = np.argwhere(line & (neighbours <= 1))
    across = [
        (float(np.hypot(*(a - b))), (int(a[0]), int(a[1])), (int(b[0]), int(b[1])))
        for a, b in itertools.combinations(ends, 2)
        if labels[tuple(a)] != labels[tuple(b)]
    ]
    gaps = sorted(gap for gap in across if gap[0] <= BRIDGE_REACH)
    joined = list(range(pieces))

    def root(piece: int) -> int:
        while joined[piece] != piece:
            piece = joined[piece]
        return piece

    line = line.copy()
    for distance, a, b in gaps:
        first, second = root(int(labels[a])), root(int(labels[b]))
        if first == second:
            continue
        steps = np.linspace(0.0, 1.0, max(1, int(np.ceil(distance))) + 1)
        ys = np.rint(a[0] + (b[0] - a[0]) * steps).astype(np.intp)
        xs = np.rint(a[1] + (b[1] - a[1]) * steps).astype(np.intp)
        if inked[ys, xs].all():
            line[ys, xs] = True
            joined[first] = second
    return line


def draw(
    line: npt.NDArray[np.bool_], side: int, width: int, *, smooth: bool = True
) -> npt.NDArray[np.float32]:
    """A centre line [112, 112] drawn on a side x side canvas with a round pen `width` px wide,
    anti-aliased if `smooth`: ink coverage, float32 in [0, 1]."""
    factor = SUPERSAMPLE if smooth else 1
    scale = side * factor / line.shape[0]
    canvas = Image.new("L", (side * factor, side * factor), 0)
    ink = 255
    pen = ImageDraw.Draw(canvas)
    ys, xs = np.nonzero(line)
    points = {(int(y), int(x)) for y, x in zip(ys, xs, strict=True)}
    thickness = width * factor
    for y, x in points:
        start = ((x + 0.5) * scale, (y + 0.5) * scale)
        for dy, dx in _NEIGHBOURS:
            if (y + dy, x + dx) in points:
                end = ((x + dx + 0.5) * scale, (y + dy + 0.5) * scale)
                pen.line((start, end), fill=ink, width=thickness)
        if thickness > 2:  # round joints
            radius = thickness / 2
            box = (start[0] - radius, start[1] - radius, start[0] + radius, start[1] + radius)
            pen.ellipse(box, ink)
    if smooth:
        canvas = canvas.reduce(factor)
    return scale_pixels(np.asarray(canvas))


@dataclass(frozen=True)
class Pens:
    """How each of N digits is redrawn: canvas side, pen width (px) and anti-aliasing, [N]."""

    sides: npt.NDArray[np.int64]
    widths: npt.NDArray[np.int64]
    smooth: npt.NDArray[np.bool_]

    @classmethod
    def random(cls, count: int, seed: int) -> Pens:
        """Pens for `count` digits, from `CANVAS_SIDES`, `MAX_PEN_WIDTH`, `ALIASED_FRACTION`."""
        rng = np.random.default_rng(seed)
        sides = rng.integers(CANVAS_SIDES[0], CANVAS_SIDES[1] + 1, count)
        widths = np.exp(rng.uniform(0, np.log(sides * MAX_PEN_WIDTH)))
        smooth = rng.random(count) >= ALIASED_FRACTION
        return cls(sides, np.maximum(1, np.rint(widths)).astype(np.int64), smooth)

    def __getitem__(self, part: slice) -> Pens:
        return Pens(self.sides[part], self.widths[part], self.smooth[part])


def pen_redraw(digits: npt.NDArray[np.uint8], pens: Pens) -> npt.NDArray[np.uint8]:
    """Digits [N, 28, 28] redrawn along their centre line with `pens`, as the serving
    preprocessing outputs such drawings: uint8 [N, 28, 28]."""
    out = np.empty_like(digits)
    for start in range(0, len(digits), CHUNK):
        lines = centre_lines(digits[start : start + CHUNK])
        for offset, line in enumerate(lines):
            index = start + offset
            ink = draw(
                line,
                int(pens.sides[index]),
                int(pens.widths[index]),
                smooth=bool(pens.smooth[index]),
            )
            out[index] = np.rint(centre_like_mnist(ink) * PIXEL_MAX).astype(np.uint8)
    return out


def fingerprint(digits: npt.NDArray[np.uint8], pens: Pens) -> str:
    """A short digest of the first `PROBE` digits redrawn with their pens: it changes with any
    change to the centre line, the pen or the serving preprocessing they go through."""
    probe = pen_redraw(digits[:PROBE], pens[:PROBE])
    return hashlib.sha256(probe.tobytes()).hexdigest()[:12]


def pen_digits(
    digits: npt.NDArray[np.uint8], seed: int, cache_dir: Path | None, workers: int
) -> npt.NDArray[np.uint8]:
    """`pen_redraw` of every digit with seeded random pens (`Pens.random`), cached in
    `cache_dir` under the redrawing's `fingerprint`."""
    pens = Pens.random(len(digits), seed)
    cache = None
    if cache_dir is not None:
        name = f"pens-{fingerprint(digits, pens)}-n{len(digits)}-seed{seed}.npy"
        cache = cache_dir / name
        if cache.exists():
            cached: npt.NDArray[np.uint8] = np.load(cache)
            if cached.shape == digits.shape and cached.dtype == np.uint8:
                return cached
    log.info("Redrawing %d digits with pens along their centre line", len(digits))
    parts = range(0, len(digits), CHUNK)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        drawn = list(
            pool.map(
                pen_redraw,
                (digits[i : i + CHUNK] for i in parts),
                (pens[i : i + CHUNK] for i in parts),
            )
        )
    redrawn = np.concatenate(drawn) if drawn else np.empty_like(digits)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, redrawn)
        partial.replace(cache)
        # Caches of the same digits and seed under another fingerprint (or the older
        # `pens-v*` names) were drawn by a redrawing that no longer exists: 47 MB each.
        for stale in cache.parent.glob(f"pens-*-n{len(digits)}-seed{seed}.npy"):
            if stale != cache:
                stale.unlink(missing_ok=True)
                log.info("Removed the stale redrawing cache %s", stale.name)
    return redrawn


__all__ = [
    "BLOB_DEPTH",
    "BRIDGE_INK",
    "BRIDGE_REACH",
    "LOOP_LEVELS",
    "SMOOTHING",
    "THIN_SCALE",
    "Pens",
    "bridge",
    "centre_lines",
    "depth",
    "draw",
    "enclosed",
    "fingerprint",
    "open_blob",
    "pen_digits",
    "pen_redraw",
    "thin",
]
