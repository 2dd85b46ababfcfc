"""Make `mnist_service/engine/golden.npz`: the real MNIST test digits of the golden check.

Every `STRIDE`-th digit of the 10,000-digit MNIST test split (t10k-images-idx3-ubyte and
t10k-labels-idx1-ubyte, read by `training.data.load_mnist`, fetched and checksum-verified into
~/.cache/mnist-service/mnist when missing): 500 digits, their labels and their indices in the
split, stored as uint8 in a compressed numpy archive (about 100 KB). Nothing is synthesised;
`tests/test_golden.py` checks the file against the IDX files.

    python scripts/make_golden.py
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from training.data import load_mnist

STRIDE = 20
TARGET = Path(__file__).resolve().parent.parent / "mnist_service" / "engine" / "golden.npz"


def main() -> None:
    images, labels = load_mnist("test")
    indices = np.arange(0, len(images), STRIDE, dtype=np.uint16)
    np.savez_compressed(TARGET, images=images[indices], labels=labels[indices], indices=indices)
    print(f"{TARGET}: {len(indices)} digits, {TARGET.stat().st_size} bytes")


if __name__ == "__main__":
    main()
