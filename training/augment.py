"""Batch augmentation with torch ops: digits redrawn with pens, random affine warps with shear,
elastic distortion, stroke-thickness and stroke-intensity changes.

Users draw digits thicker, thinner, fainter, tilted, slanted and wobblier than MNIST's own, and
the serving preprocessing turns a thin pen into strokes thickened from a one-pixel line
(`mnist_service.engine.preprocess`); these perturbations cover what it outputs without hurting
MNIST test accuracy.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F  # noqa: N812 - the PyTorch convention

from mnist_service.constants import IMAGE_SIZE
from mnist_service.engine.preprocess import centre_like_mnist
from mnist_service.errors import BlankImageError


@dataclass(frozen=True)
class AugmentConfig:
    """Ranges of the random perturbations; zero everywhere disables augmentation."""

    max_rotation_deg: float = 12.0
    max_shift_px: float = 2.5
    scale_range: tuple[float, float] = (0.9, 1.1)
    thickness_fraction: float = 0.4
    """Fraction of images whose strokes get thicker or thinner (half each)."""
    recentre_thickened: bool = True
    """Put thickened digits through the serving preprocessing's crop, fit and centring
    (`centre_like_mnist`), as a drawing with such strokes comes out of it."""
    max_shear: float = 0.15
    """Horizontal shear (slant) up to this fraction of the height, either way."""
    elastic_px: float = 1.0
    """Largest displacement of the smooth random (elastic) distortion, in pixels."""
    faint_fraction: float = 0.15
    """Fraction of images whose ink is dimmed (a faint pen the preprocessing only half saved)."""
    pen_fraction: float = 0.2
    """Fraction of images swapped for the same digit redrawn with a pen along its centre line,
    as the serving preprocessing outputs it (`training.strokes`)."""
    clean_fraction: float = 0.25
    """Fraction of images left as they are: MNIST's own look stays in every batch, which keeps
    the clean test accuracy up under the stronger perturbations."""


NO_AUGMENTATION = AugmentConfig(
    max_rotation_deg=0.0,
    max_shift_px=0.0,
    scale_range=(1.0, 1.0),
    thickness_fraction=0.0,
    recentre_thickened=False,
    max_shear=0.0,
    elastic_px=0.0,
    faint_fraction=0.0,
    pen_fraction=0.0,
    clean_fraction=1.0,
)

_MORPH_KERNEL = 3
MAX_EROSION_STRENGTH = 0.6
"""A full 3x3 erosion erases MNIST's thinnest strokes, hence its capped strength."""
MAX_DILATION_STEPS = 2
"""Thickened strokes grow by up to two 3x3 dilations (~4 px): a fat marker's, loops filling in."""
ELASTIC_GRID = 4
"""The elastic field is random on a 4x4 grid, interpolated smoothly over the 28x28 image."""
FAINT_RANGE = (0.7, 1.0)
"""Dimmed images keep this fraction of their intensity; the mid-tones are raised (gamma)."""


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def random_affine(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Rotate, scale, shear, shift and elastically distort each [0, 1] image by its own small
    random amount, in one resampling."""
    n = images.shape[0]
    angle = torch.deg2rad(_uniform(n, -config.max_rotation_deg, config.max_rotation_deg, generator))
    scale = _uniform(n, *config.scale_range, generator)
    shear = _uniform(n, -config.max_shear, config.max_shear, generator)
    # affine_grid works in [-1, 1] coordinates spanning IMAGE_SIZE pixels.
    pixel = 2.0 / IMAGE_SIZE
    shift = _uniform(2 * n, -config.max_shift_px, config.max_shift_px, generator).view(n, 2)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    # Rotation-and-scale times a horizontal shear [[1, shear], [0, 1]].
    theta = torch.stack(
        [
            torch.stack([cos, cos * shear - sin, shift[:, 0] * pixel], dim=1),
            torch.stack([sin, sin * shear + cos, shift[:, 1] * pixel], dim=1),
        ],
        dim=1,
    )
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    if config.elastic_px > 0:
        grid = grid + elastic_field(n, config.elastic_px * pixel, generator)
    # Zero padding is the black MNIST background.
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def elastic_field(n: int, amplitude: float, generator: torch.Generator) -> torch.Tensor:
    """Smooth random displacements [N, 28, 28, 2], each component within +-amplitude."""
    coarse = (torch.rand(n, 2, ELASTIC_GRID, ELASTIC_GRID, generator=generator) * 2 - 1) * amplitude
    field = F.interpolate(coarse, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bicubic", align_corners=True)
    return field.clamp_(-amplitude, amplitude).permute(0, 2, 3, 1)


def random_faintness(
    images: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Dim a random fraction of the images' ink, raising the mid-tones (a faint, grainy pen)."""
    n = images.shape[0]
    faint = (torch.rand(n, generator=generator) < fraction).view(n, 1, 1, 1)
    level = _uniform(n, *FAINT_RANGE, generator).view(n, 1, 1, 1)
    dimmed = level * images.clamp(0.0, 1.0).sqrt()
    return torch.where(faint, dimmed, images)


def random_thickness(
    images: torch.Tensor,
    fraction: float,
    generator: torch.Generator,
    *,
    recentre: bool = False,
) -> torch.Tensor:
    """Dilate or erode a random fraction of the images' strokes by a random strength.

    With `recentre`, the thickened digits then go through the serving centring
    (`centred_like_serving`): a thick stroke widens the digit's box, and the serving fits the
    box back to 20 px, so a fat marker's digit reaches the model smaller and re-centred, not
    grown to up to 24 px as a dilation in place leaves it."""
    n = images.shape[0]
    pad = _MORPH_KERNEL // 2
    dilated = F.max_pool2d(images, _MORPH_KERNEL, stride=1, padding=pad)
    twice = F.max_pool2d(dilated, _MORPH_KERNEL, stride=1, padding=pad)
    eroded = -F.max_pool2d(-images, _MORPH_KERNEL, stride=1, padding=pad)
    choice = torch.rand(n, generator=generator)
    thick = (choice < fraction / 2).view(n, 1, 1, 1)
    thin = ((choice >= fraction / 2) & (choice < fraction)).view(n, 1, 1, 1)
    # Blend towards the morphed image by a random strength so thickness varies continuously:
    # up to MAX_DILATION_STEPS dilations, or part of one erosion.
    strength = torch.rand(n, generator=generator).view(n, 1, 1, 1)
    grown = strength * MAX_DILATION_STEPS
    thickened = torch.where(
        grown <= 1, images + grown * (dilated - images), dilated + (grown - 1) * (twice - dilated)
    )
    thinned = images + strength * MAX_EROSION_STRENGTH * (eroded - images)
    morphed = torch.where(thick, thickened, torch.where(thin, thinned, images))
    if recentre:
        chosen = thick.view(n)
        morphed[chosen] = centred_like_serving(morphed[chosen])
    return morphed


def centred_like_serving(images: torch.Tensor) -> torch.Tensor:
    """Each [0, 1] image [N, 1, 28, 28] cropped to its ink, fitted to 20 px, saturated and
    centred by mass, by the serving preprocessing's own `centre_like_mnist`; an image with no
    ink stays as it is."""
    out = images.clone()
    for index, image in enumerate(images[:, 0].numpy()):
        try:
            out[index, 0] = torch.from_numpy(centre_like_mnist(np.ascontiguousarray(image)))
        except BlankImageError:
            continue
    return out


def with_pens(
    images: torch.Tensor, pens: torch.Tensor, fraction: float, generator: torch.Generator
) -> torch.Tensor:
    """Swap a random fraction of the images for their pen redrawings (same digits, same order)."""
    n = images.shape[0]
    swap = (torch.rand(n, generator=generator) < fraction).view(n, 1, 1, 1)
    return torch.where(swap, pens, images)


def augment(
    images: torch.Tensor, config: AugmentConfig, generator: torch.Generator
) -> torch.Tensor:
    """Apply the configured random perturbations to a batch of [0, 1] images [N, 1, 28, 28]."""
    if config.clean_fraction >= 1:
        return images
    n = images.shape[0]
    clean = (torch.rand(n, generator=generator) < config.clean_fraction).view(n, 1, 1, 1)
    original = images
    if config.thickness_fraction > 0:
        images = random_thickness(
            images, config.thickness_fraction, generator, recentre=config.recentre_thickened
        )
    warps = (config.max_rotation_deg, config.max_shift_px, config.max_shear, config.elastic_px)
    if any(w > 0 for w in warps) or config.scale_range != (1.0, 1.0):
        images = random_affine(images, config, generator)
    if config.faint_fraction > 0:
        images = random_faintness(images, config.faint_fraction, generator)
    return torch.where(clean, original, images.clamp(0.0, 1.0))


__all__ = [
    "NO_AUGMENTATION",
    "AugmentConfig",
    "augment",
    "centred_like_serving",
    "elastic_field",
    "random_affine",
    "random_faintness",
    "random_thickness",
    "with_pens",
]
