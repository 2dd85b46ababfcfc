"""The two MNIST architectures, with the parameter names of the Rust/candle project they replace.

Both take normalised images ``[N, 1, 28, 28]`` (see :func:`normalize`) and return logits; the
softmax and the normalisation live in the exported graph (``export.onnx_export``), not here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention
from torch import nn

from mnist_service.constants import (
    ARCHITECTURES,
    IMAGE_SIZE,
    MNIST_MEAN,
    MNIST_STD,
    NUM_CLASSES,
    PIXELS,
    Architecture,
)

MLP_HIDDEN = (128, 64)
CONV_CHANNELS = (32, 64)
CONV_KERNEL = 3
POOL = 2
CONV_HIDDEN = 128
# Two 2x2 max-pools: 28 -> 14 -> 7.
CONV_FLAT = CONV_CHANNELS[1] * (IMAGE_SIZE // POOL // POOL) ** 2


def normalize(images: torch.Tensor) -> torch.Tensor:
    """Map [0, 1] pixels to the zero-mean, unit-variance inputs the networks are trained on."""
    return (images - MNIST_MEAN) / MNIST_STD


class MLP(nn.Module):
    """784 -> 128 -> 64 -> 10 with ReLU between layers (parameters fc1, fc2, fc3)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(PIXELS, MLP_HIDDEN[0])
        self.fc2 = nn.Linear(MLP_HIDDEN[0], MLP_HIDDEN[1])
        self.fc3 = nn.Linear(MLP_HIDDEN[1], NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, 10] for normalised images [N, 1, 28, 28]."""
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = F.relu(self.fc2(x))
        return self.fc3(x)  # type: ignore[no-any-return]


class ConvNet(nn.Module):
    """Two 3x3 conv + ReLU + 2x2 max-pool blocks (32, 64 channels), then 3136 -> 128 -> 10."""

    def __init__(self) -> None:
        super().__init__()
        padding = CONV_KERNEL // 2
        self.conv2d_1 = nn.Conv2d(1, CONV_CHANNELS[0], CONV_KERNEL, padding=padding)
        self.conv2d_2 = nn.Conv2d(CONV_CHANNELS[0], CONV_CHANNELS[1], CONV_KERNEL, padding=padding)
        self.linear_1 = nn.Linear(CONV_FLAT, CONV_HIDDEN)
        self.linear_2 = nn.Linear(CONV_HIDDEN, NUM_CLASSES)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Return logits [N, 10] for normalised images [N, 1, 28, 28]."""
        x = F.max_pool2d(F.relu(self.conv2d_1(x)), POOL)
        x = F.max_pool2d(F.relu(self.conv2d_2(x)), POOL)
        x = torch.flatten(x, 1)
        x = F.relu(self.linear_1(x))
        return self.linear_2(x)  # type: ignore[no-any-return]


def build_model(arch: Architecture) -> nn.Module:
    """Return a freshly initialised network of the given architecture."""
    if arch == "mlp":
        return MLP()
    if arch == "conv":
        return ConvNet()
    raise ValueError(f"unknown architecture {arch!r}; expected one of {ARCHITECTURES}")
