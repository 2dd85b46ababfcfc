"""Shifted views: a redrawn image is classified as itself and four copies one pixel off.

The preprocessing redraws a user's digit the way MNIST made its own (`centre_like_mnist`):
crop, resize to 20 px, widen a thin pen, and shift the centre of mass to the centre, rounded
to a whole pixel. Where the digit lands is only known to about half a pixel, and a thin pen's
resized stroke sits across pixel borders by chance. Averaging the model's probabilities over
the image and its copies shifted by one pixel up, down, left and right reads the digit where
it might as well have landed. On held-out drawings (training digits 50,000-59,999 drawn as the
robustness report draws them, two ConvNets trained without them) it removed about 8 of each
pen row's 100 errors in 10,000 (docs/accuracy.md); MNIST-format images pass through untouched
and are classified once, as they are.

Each view is one more row in the model's batch: about 65 us of ConvNet on one core. So the
views are read in a cascade: the image's own view first, and the four shifted ones only when
that reading is unsure, its top probability less than `VIEW_MARGIN` ahead of the next one.
About 1 redrawn image in 100 is unsure, and the answers are those of the five views within
noise on every row of the robustness report (docs/accuracy.md). `--no-shift-views` reads
every image once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import numpy as np
import numpy.typing as npt

from .inference import FloatArray
from .preprocess import FloatImage, Prepared

SHIFTS: Final = ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))
"""(rows, columns) each view is moved by: the image itself, then up, down, left and right."""

VIEW_MARGIN: Final = 0.9
"""A redrawn image's own view decides alone when its top probability leads the next one by
at least this. Chosen on test digits 5,000-6,499 drawn in the report's 27 ways: at 0.5-0.95
the errors equal the five views' (133), and 0.4-1.4 % of the images are unsure."""


def shifted(image: FloatImage, rows: int, columns: int) -> FloatImage:
    """`image` [..., H, W] moved by `rows` down and `columns` right (negative: up, left); what
    moves out is dropped, what moves in is black (nothing wraps around)."""
    out = np.zeros_like(image)
    height, width = image.shape[-2:]
    into = (
        slice(max(rows, 0), height + min(rows, 0)),
        slice(max(columns, 0), width + min(columns, 0)),
    )
    source = (
        slice(max(-rows, 0), height + min(-rows, 0)),
        slice(max(-columns, 0), width + min(-columns, 0)),
    )
    out[(..., *into)] = image[(..., *source)]
    return out


def views(prepared: Prepared, enabled: bool = True) -> FloatImage:
    """The model input rows for one image, float32 [V, 1, 28, 28]: its `SHIFTS` if it was
    redrawn and views are `enabled`, else the image alone (V = 1)."""
    if not (enabled and prepared.redrawn):
        return prepared.image[np.newaxis]
    return np.stack([shifted(prepared.image, rows, columns) for rows, columns in SHIFTS])


def others(image: FloatImage) -> FloatImage:
    """The shifted views of a redrawn image [1, 28, 28] beyond its own, float32 [4, 1, 28, 28]:
    what an unsure reading (`unsure`) adds."""
    return np.stack([shifted(image, rows, columns) for rows, columns in SHIFTS[1:]])


def unsure(probabilities: FloatArray) -> npt.NDArray[np.bool_]:
    """Which readings [N, 10] are unsure: the top probability less than `VIEW_MARGIN` ahead."""
    top = np.partition(probabilities, -2, axis=1)
    lead: npt.NDArray[np.bool_] = top[:, -1] - top[:, -2] < VIEW_MARGIN
    return lead


def expand(
    items: Sequence[Prepared], enabled: bool = True
) -> tuple[FloatImage, npt.NDArray[np.intp]]:
    """Many images -> one model batch of all their `views`, and how many rows each has."""
    rows = [views(item, enabled) for item in items]
    return np.concatenate(rows), np.array([len(r) for r in rows], np.intp)


def collapse(probabilities: FloatArray, counts: npt.NDArray[np.intp]) -> FloatArray:
    """The batch's probabilities [sum(counts), 10] -> one row per image [len(counts), 10]:
    the mean over each image's views."""
    if len(probabilities) == len(counts):  # one view each: nothing to average
        return probabilities
    sums = np.add.reduceat(probabilities, _starts(counts), axis=0)
    mean: FloatArray = (sums / counts[:, np.newaxis]).astype(np.float32)
    return mean


def unshifted(probabilities: FloatArray, counts: npt.NDArray[np.intp]) -> FloatArray:
    """The batch's probabilities [sum(counts), 10] -> each image's own row [len(counts), 10]:
    its first view, the one `SHIFTS` leaves in place (what `--no-shift-views` reads)."""
    own: FloatArray = probabilities[_starts(counts)]
    return own


def cascaded(probabilities: FloatArray, counts: npt.NDArray[np.intp]) -> FloatArray:
    """The batch's probabilities [sum(counts), 10] -> one row per image [len(counts), 10], as
    the server reads them: the image's own view where it is sure or has no other views
    (`unsure`), else the mean over all its views (`collapse`)."""
    own = unshifted(probabilities, counts)
    recheck = unsure(own) & (counts > 1)
    if not recheck.any():
        return own
    mean = collapse(probabilities, counts)
    read: FloatArray = np.where(recheck[:, np.newaxis], mean, own)
    return read


def _starts(counts: npt.NDArray[np.intp]) -> npt.NDArray[np.intp]:
    """Where each image's rows start in a batch of `expand`."""
    return np.cumsum(counts) - counts


__all__ = [
    "SHIFTS",
    "VIEW_MARGIN",
    "cascaded",
    "collapse",
    "expand",
    "others",
    "shifted",
    "unshifted",
    "unsure",
    "views",
]
