"""Digits redrawn with a pen along their centre line, as the serving preprocessing outputs them.

People draw digits with pens far thinner than MNIST's broad strokes: a one-pixel line, which
the serving preprocessing (`mnist_service.engine.preprocess.centre_like_mnist`) widens to an
MNIST-like stroke. A digit drawn that way loses what a thin pen cannot draw: an inked-in loop
becomes a line, touching strokes part. Training on MNIST's own digits redrawn like that (thinned
to their centre line at 4x, drawn again with a pen of random width, then put through the
serving preprocessing's own crop, resize, stroke normalisation and centring) teaches the model
what the service will really feed it for a pen drawing. The robustness report
(`export.robustness`) draws its pen variants from the same centre line.

The redrawings of the 60,000 training digits take a minute or two on two cores, so they are
cached next to the MNIST files, keyed by `VERSION` and the seed.
"""

from __future__ import annotations

import itertools
import logging
import os
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageFilter

from mnist_service.constants import IMAGE_SIZE, PIXEL_MAX
from mnist_service.engine.preprocess import centre_like_mnist

log = logging.getLogger(__name__)

THIN_SCALE: Final = 4
"""The centre line is traced at this multiple of 28 px (MNIST's strokes are ~10 px wide there)."""

MAX_PEN_STEPS: Final = 3
"""Training pens are the centre line widened by 0 to this many 3x3 dilations at 4x: from a
hairline to ~7 px at 112 px, about MNIST's narrowest stroke after the resize to 20 px."""

VERSION: Final = 1
"""Bump when the redrawing changes, so stale caches are not used."""

CHUNK: Final = 500
"""Digits thinned together in one vectorised pass."""


def centre_lines(digits: npt.NDArray[np.uint8]) -> npt.NDArray[np.bool_]:
    """The strokes of digits [N, 28, 28] thinned to a one-pixel centre line, [N, 112, 112]."""
    side = IMAGE_SIZE * THIN_SCALE
    masks = np.empty((len(digits), side, side), bool)
    for index, digit in enumerate(digits):
        big = Image.fromarray(digit).resize((side, side), Image.Resampling.BICUBIC)
        smooth = np.asarray(big.filter(ImageFilter.GaussianBlur(THIN_SCALE / 2)))
        masks[index] = smooth > PIXEL_MAX / 2
    return thin(masks)


def thin(inked: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """Zhang-Suen thinning of masks [N, H, W] to one-pixel lines, all masks at once."""
    image = np.pad(inked, ((0, 0), (1, 1), (1, 1))).astype(np.uint8)
    inner = image[:, 1:-1, 1:-1]
    changed = True
    while changed:
        changed = False
        for first in (True, False):
            p2, p3, p4 = image[:, :-2, 1:-1], image[:, :-2, 2:], image[:, 1:-1, 2:]
            p5, p6, p7 = image[:, 2:, 2:], image[:, 2:, 1:-1], image[:, 2:, :-2]
            p8, p9 = image[:, 1:-1, :-2], image[:, :-2, :-2]
            ring = (p2, p3, p4, p5, p6, p7, p8, p9, p2)
            count = sum(n.astype(np.int8) for n in ring[:-1])
            crossings = sum(
                ((a == 0) & (b == 1)).astype(np.int8) for a, b in itertools.pairwise(ring)
            )
            if first:
                side_ok = ((p2 & p4 & p6) == 0) & ((p4 & p6 & p8) == 0)
            else:
                side_ok = ((p2 & p4 & p8) == 0) & ((p2 & p6 & p8) == 0)
            remove = (inner == 1) & (count >= 2) & (count <= 6) & (crossings == 1) & side_ok
            if remove.any():
                inner[remove] = 0
                changed = True
    return inner.astype(bool)


def pen_redraw(
    digits: npt.NDArray[np.uint8], steps: npt.NDArray[np.int64]
) -> npt.NDArray[np.uint8]:
    """Digits [N, 28, 28] redrawn along their centre line with pens widened by `steps` [N]
    dilations, as the serving preprocessing outputs such drawings: uint8 [N, 28, 28]."""
    out = np.empty_like(digits)
    for start in range(0, len(digits), CHUNK):
        lines = centre_lines(digits[start : start + CHUNK])
        for offset, line in enumerate(lines):
            ink = Image.fromarray(line.astype(np.uint8) * PIXEL_MAX)
            for _ in range(int(steps[start + offset])):
                ink = ink.filter(ImageFilter.MaxFilter(3))
            drawn = centre_like_mnist(np.asarray(ink, np.float32) / PIXEL_MAX)
            out[start + offset] = np.rint(drawn * PIXEL_MAX).astype(np.uint8)
    return out


def pen_digits(
    digits: npt.NDArray[np.uint8], seed: int, cache_dir: Path | None, workers: int
) -> npt.NDArray[np.uint8]:
    """`pen_redraw` of every digit with a seeded random pen width, cached in `cache_dir`."""
    cache = None
    if cache_dir is not None:
        cache = cache_dir / f"pens-v{VERSION}-n{len(digits)}-seed{seed}.npy"
        if cache.exists():
            cached: npt.NDArray[np.uint8] = np.load(cache)
            if cached.shape == digits.shape and cached.dtype == np.uint8:
                return cached
    steps = np.random.default_rng(seed).integers(0, MAX_PEN_STEPS + 1, len(digits))
    log.info("Redrawing %d digits with pens along their centre line", len(digits))
    parts = range(0, len(digits), CHUNK)
    with ProcessPoolExecutor(max(1, workers)) as pool:
        drawn = list(
            pool.map(
                pen_redraw,
                (digits[i : i + CHUNK] for i in parts),
                (steps[i : i + CHUNK] for i in parts),
            )
        )
    pens = np.concatenate(drawn) if drawn else np.empty_like(digits)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        partial = cache.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(partial, pens)
        partial.replace(cache)
    return pens


__all__ = ["THIN_SCALE", "centre_lines", "pen_digits", "pen_redraw", "thin"]
