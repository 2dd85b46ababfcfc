"""Batch augmentation with torch ops: small random affine warps and stroke-thickness changes.

Users draw digits thicker, thinner, tilted and off-centre compared with MNIST's own; these
light perturbations make the models robust to that without hurting MNIST test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from mnist_service.constants import IMAGE_SIZE


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random perturbations; zero everywhere disables augmentation."""

    max_rotation_deg: float = 12.0
    max_shift_px: float = 2.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    thickness_fraction: float = 0.3
    """Fraction of images whose strokes get thicker or thinner (half each)."""


NO_AUGMENTATION = AugmentConfig(0.0, 0.0, (1.0, 1.0), 0.0)

_MORPH_KERNEL = 3
MAX_EROSION_STRENGTH = 0.5


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def random_affine(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Rotate, scale and shift each [0, 1] image by its own small random amount."""
    n = images.shape[0]
    angle = torch.deg2rad(_uniform(n, -config.max_rotation_deg, config.max_rotation_deg, generator))
    scale = _uniform(n, *config.scale_range, generator)
    # affine_grid works in [-1, 1] coordinates spanning IMAGE_SIZE pixels.
    pixel = 2.0 / IMAGE_SIZE
    shift = _uniform(2 * n, -config.max_shift_px, config.max_shift_px, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack(
        [
            torch.stack([cos, -sin, shift[:, 0] * pixel], dim=1),
            torch.stack([sin, cos, shift[:, 1] * pixel], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    # Zero padding is the black MNIST background.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def random_thickness(
    images: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Dilate or erode a random fraction of the images' strokes by a random strength."""
    n = images.shape[0]
    pad = _MORPH_KERNEL // 2
    dilated = F.max_pool2d(images, _MORPH_KERNEL, stride=1, padding=pad)
    eroded = -F.max_pool2d(-images, _MORPH_KERNEL, stride=1, padding=pad)
    choice = torch.rand(n, generator=generator)
    thick = (choice < fraction / 2).view(n, 1, 1, 1)
    thin = ((choice >= fraction / 2) & (choice < fraction)).view(n, 1, 1, 1)
    # Blend towards the morphed image by a random strength so thickness varies continuously.
    # A full 3x3 erosion erases MNIST's one-pixel strokes, hence its capped strength.
    strength = torch.rand(n, generator=generator).view(n, 1, 1, 1)
    strength = torch.where(thin, strength * MAX_EROSION_STRENGTH, strength)
    target = torch.where(thick, dilated, torch.where(thin, eroded, images))
    return images + strength * (target - images)


def augment(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Apply the configured random perturbations to a batch of [0, 1] images [N, 1, 28, 28]."""
    if config.thickness_fraction > 0:
        images = random_thickness(images, config.thickness_fraction, generator)
    if config.max_rotation_deg > 0 or config.max_shift_px > 0 or config.scale_range != (1.0, 1.0):
        images = random_affine(images, config, generator)
    return images.clamp_(0.0, 1.0)


__all__ = ["NO_AUGMENTATION", "AugmentConfig", "augment", "random_affine", "random_thickness"]
