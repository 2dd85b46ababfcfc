"""Fixtures shared by the whole suite."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt
import pytest


@pytest.fixture(scope="session")
def mnist_test_set() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The real 10,000-image MNIST test split: uint8 images [N, 28, 28] and labels [N]."""
    from training.data import load_mnist

    return load_mnist("test")
