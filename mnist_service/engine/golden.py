"""The golden check: a model version must read known MNIST digits well before it serves.

`golden.npz` (package data) holds 500 real MNIST test digits: every 20th of the 10,000 of
the test split's IDX files, with their labels and indices (`scripts/make_golden.py` made it;
`tests/test_golden.py` checks it against the IDX files). `check` runs a freshly loaded model
on them in the batch sizes the batcher will make (its warm-up: the first run of each size
is the slow one), checks every output against the model contract, and measures its accuracy.
Nothing here knows about gRPC.
"""

from __future__ import annotations

import importlib.resources
from dataclasses import dataclass
from functools import cache
from typing import Final

import numpy as np
import numpy.typing as npt

from ..constants import IMAGE_SIZE, NUM_CLASSES, PIXEL_MAX
from ..errors import ModelError
from .inference import Classifier, FloatArray

GOLDEN_FILE: Final = "golden.npz"
_SUM_TOLERANCE: Final = 1e-3


@dataclass(frozen=True, slots=True)
class GoldenSet:
    """The golden digits as model input, float32 [N, 1, 28, 28], and their labels [N]."""

    images: FloatArray
    labels: npt.NDArray[np.uint8]
    indices: npt.NDArray[np.uint16]
    """Where each digit is in the MNIST test split."""


@cache
def golden_set() -> GoldenSet:
    """The golden digits shipped in the package (read once)."""
    with (importlib.resources.files(__package__) / GOLDEN_FILE).open("rb") as file:
        archive = np.load(file)
        pixels, labels, indices = archive["images"], archive["labels"], archive["indices"]
    images = (pixels.astype(np.float32) / PIXEL_MAX).reshape(-1, 1, IMAGE_SIZE, IMAGE_SIZE)
    images.setflags(write=False)
    return GoldenSet(images, labels, indices)


def check(classifier: Classifier, *, max_batch_size: int, floor: float | None, what: str) -> float:
    """Warm `classifier` up and measure its golden accuracy; raise ModelError when an output
    breaks the contract or the accuracy is under `floor` (None: any accuracy passes)."""
    golden = golden_set()
    images = golden.images
    for size in range(1, min(max_batch_size, len(images)) + 1):  # the warm-up
        _contract(classifier.classify(images[:size]), size, what)
    answers = []
    for start in range(0, len(images), max_batch_size):
        batch = images[start : start + max_batch_size]
        answers.append(_contract(classifier.classify(batch), len(batch), what))
    predicted = np.concatenate(answers).argmax(axis=1)
    accuracy = float(np.mean(predicted == golden.labels))
    if floor is not None and accuracy < floor:
        raise ModelError(
            f"{what} reads {accuracy:.1%} of the {len(images)} golden MNIST digits right; "
            f"the floor is {floor:.1%}"
        )
    return accuracy


def _contract(probabilities: FloatArray, rows: int, what: str) -> FloatArray:
    """The model contract on one answer: float32 [rows, 10], finite probabilities that sum
    to 1."""
    if probabilities.shape != (rows, NUM_CLASSES) or probabilities.dtype != np.float32:
        raise ModelError(
            f"{what} answered {probabilities.dtype} {list(probabilities.shape)} for {rows} "
            f"images; the contract is float32 [{rows}, {NUM_CLASSES}]"
        )
    sums = probabilities.sum(axis=1)
    if not (
        np.isfinite(probabilities).all()
        and (probabilities >= 0).all()
        and np.allclose(sums, 1.0, atol=_SUM_TOLERANCE)
    ):
        raise ModelError(
            f"{what} answered values that are not probabilities (negative, not finite, or rows "
            "not summing to 1)"
        )
    return probabilities
