"""Fixtures of the training/export tests: the real MNIST folder and small helpers."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.data import ALL_FILES, default_data_dir, ensure_mnist


@pytest.fixture(scope="session")
def mnist_dir() -> Path:
    """The verified MNIST cache folder holding all four real IDX files (fetched if missing)."""
    data_dir = default_data_dir()
    ensure_mnist(data_dir, ALL_FILES)
    return data_dir


@pytest.fixture(scope="session")
def weights_dir() -> Path:
    """The repository's ``weights/`` folder with the shipped ONNX models."""
    return Path(__file__).resolve().parents[2] / "weights"


@pytest.fixture(scope="session")
def shipped_mlp(weights_dir: Path) -> Path:
    """The shipped MLP ONNX model."""
    return weights_dir / "mnist_mlp.onnx"
