"""The golden digits shipped in the package are real MNIST test digits (issue 24).

`mnist_service/engine/golden.npz` was made by `scripts/make_golden.py` from the MNIST test
split's IDX files; this checks it against those files (fetched into the cache by the
`mnist_test_set` fixture, as the rest of the suite does), and that the shipped models pass
the golden check they would face on a swap.
"""

from __future__ import annotations

import numpy as np
import pytest

from mnist_service.config import shipped_weights
from mnist_service.engine import golden
from mnist_service.engine.inference import OnnxClassifier
from mnist_service.errors import ModelError

from .conftest import MnistSplit


def test_the_golden_digits_are_the_mnist_test_digits_they_claim(mnist_test_set: MnistSplit) -> None:
    images, labels = mnist_test_set
    shipped = golden.golden_set()
    assert len(shipped.indices) == 500
    assert np.array_equal(shipped.indices, np.arange(0, 10_000, 20))
    assert np.array_equal(shipped.labels, labels[shipped.indices])
    assert np.array_equal(np.rint(shipped.images[:, 0] * 255), images[shipped.indices])
    assert set(shipped.labels.tolist()) == set(range(10))


@pytest.mark.parametrize("architecture", ["conv", "mlp"])
def test_the_shipped_models_pass_the_golden_check(architecture: str) -> None:
    model = OnnxClassifier.load(shipped_weights(architecture), architecture=architecture)  # type: ignore[arg-type]
    accuracy = golden.check(model, max_batch_size=32, floor=0.98, what=architecture)
    assert accuracy >= 0.98
    with pytest.raises(ModelError, match=r"golden MNIST digits right; the floor is 100\.0%"):
        golden.check(model, max_batch_size=32, floor=1.0 + 1e-9, what=architecture)
