"""Turn a request's image bytes into the model input, the way MNIST itself was made.

The model was trained on MNIST, whose digits are white ink on black, scaled (with
anti-aliasing) so the longer side of the ink is 20 px, then placed in a 28x28 field with the
centre of mass at the centre. A user's drawing or photo classifies well only if it is brought
into that same form, so the pipeline is::

    decode       bytes -> upright 8-bit PIL image in mode L or LA.
                 Only PNG, JPEG, BMP, GIF, WebP and TIFF are opened (first frame only); the
                 pixel count is checked against ``max_pixels`` from the header, before any
                 pixel is decoded; big images are shrunk early (JPEG draft, integer reduce).
                 Exactly 784 bytes that are no image are taken as raw 28x28 MNIST pixels.
    ink_map      -> float32 HxW, 0 = paper, 1 = strongest ink. The paper is the most common
                 level (robust to any amount of ink, unlike the mean); the ink is on whichever
                 side of it holds more contrast, so dark-on-light and light-on-dark both work.
                 A transparent background (canvas exports) makes the alpha the ink channel.
                 Under uneven light (a photo of paper) a robust quadratic fit of the paper's
                 level is subtracted first. A soft noise floor, raised above the measured
                 sensor noise, keeps JPEG artefacts and grain from growing the bounding box,
                 and isolated specks are dropped.
    centre_like_mnist
                 -> float32 28x28: crop to the ink, anti-aliased resize of the longer side to
                 20 px, strokes brought to MNIST's (the ink's upper percentile saturated, a
                 thin pen widened to MNIST's median stroke), shift by the rounded centre of
                 mass to (14, 14) without clipping ink.

An image that is already in MNIST format (28x28 8-bit grey on a black background, as are raw
784-byte requests) passes through untouched, so MNIST's own test images score exactly the
offline accuracy. Everything here is a pure function of its arguments, safe to call from
worker threads, except `limit_pillow`: the server calls it once at startup, before any decode,
to set Pillow's own bomb limit (``MAX_IMAGE_PIXELS``) from ``--max-image-pixels``.
"""

from __future__ import annotations

import io
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageOps, UnidentifiedImageError

from mnist_service.constants import DIGIT_BOX, IMAGE_SIZE, PIXEL_MAX, PIXELS
from mnist_service.errors import (
    BlankImageError,
    EmptyImageError,
    ImageTooLargeError,
    UndecodableImageError,
)

__all__ = [
    "Prepared",
    "centre_like_mnist",
    "decode",
    "ink_map",
    "is_mnist_format",
    "limit_pillow",
    "load",
    "model_batch",
    "open_image",
    "pixel_count",
    "prepare",
    "preprocess",
    "scale_pixels",
    "stroke_width",
]

log = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]
Opened = Image.Image | npt.NDArray[np.uint8]
"""What `open_image` gives: a lazily decoded image file, or raw pixels that need no decoding."""

FORMATS: Final = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
"""The only formats we open (phone JPEGs that Pillow reads as MPO come in through JPEG)."""

WORKING_SIDE: Final = 512
"""Big images are shrunk by an integer factor until the longer side is near this: still 25x
the 20 px digit box, so even a digit filling a fifth of a photo keeps detail to spare."""

MIN_INK_CONTRAST: Final = 0.1
"""Ink must differ from the paper by this fraction of full scale, or the image is blank."""

NOISE_FLOOR: Final = 0.15
"""Ink below this fraction of the strongest ink is background noise (JPEG ringing, paper
texture): it is mapped to 0, and the rest rescaled so the ramp stays continuous."""

NOISE_SIGMAS: Final = 4.0
"""Sensor noise: ink must stand this many noise deviations above the paper."""

FLATTEN_MIN_SIDE: Final = 64
"""Smaller images are taken as evenly lit: a lighting fit would cost more than it could find."""

FLATTEN_GRID: Final = 32
"""The paper's lighting is fitted on the image box-averaged to about this many cells a side."""

FLATTEN_TOLERANCE: Final = 0.04
"""Lighting that varies less than this fraction of full scale across the page is left alone."""

FLATTEN_ROUNDS: Final = 4
"""Rounds of the robust surface fit: each drops the cells that do not look like paper."""

FLATTEN_OUTLIER: Final = 3.0
"""Cells further than this many robust deviations from the surface are ink, not paper."""

STROKE_SATURATION: Final = 50
"""After the resize, this percentile of the ink maps to full intensity: MNIST's strokes are
saturated (the median ink pixel of a test digit is 0.97), while a thin pen drawn large averages
down to a faint ghost."""

STROKE_THIN: Final = 1.5
"""Strokes narrower than this (px at the 20 px scale, `stroke_width`) are thickened. MNIST's
training digits: 5th percentile 1.30, median 1.92, 90th 2.67; pens of 1-4 px on drawings of
200-300 px measure 0.8-1.1 here (after `_saturate`), a 9 px felt tip on a 200 px drawing 1.3.
Widening from 1.5 rather than 1.2 brings the felt tip to MNIST's width too: the ConvNet
shipped before misread 103 of the 10,000 test digits drawn so, 95 widened, and MNIST's own
digits inverted at 28 px lost nothing (49 misread, 46)."""

STROKE_TARGET: Final = 1.9
"""The width thin strokes are brought to: MNIST's median."""

TRANSPARENT_PAPER: Final = 0.5
"""If the most common alpha is below this, the background is transparent: alpha is the ink."""

RESAMPLE: Final = Image.Resampling.BILINEAR
"""Scaling filter for the digit; Pillow widens it with the scale factor (anti-aliasing)."""

CENTRE: Final = IMAGE_SIZE / 2
"""MNIST's centre of mass sits at (14, 14) in pixel-index coordinates (measured: 13.99, 14.01)."""

_MAGIC: Final = (b"\x89PNG", b"\xff\xd8", b"BM", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*")
"""How the files of FORMATS start; 784 bytes starting otherwise are raw pixels, unopened."""

_SIXTEEN_BIT: Final = frozenset({"I;16", "I;16L", "I;16B", "I;16N"})

_PILLOW_BOMB: Final = (Image.DecompressionBombError, Image.DecompressionBombWarning)
_PILLOW_PIXELS: Final = re.compile(r"Image size \((\d+) pixels\)")


def limit_pillow(max_pixels: int) -> None:
    """Make Pillow's own decompression-bomb check enforce `max_pixels` (once, at startup).

    Pillow checks ``MAX_IMAGE_PIXELS`` at places our header check does not reach (a GIF
    frame that grows the canvas, TIFF tiles, crops), so its limit is ours rather than its
    unrelated default (89 M pixels: above it a bigger ``--max-image-pixels`` would be refused
    with Pillow's words, below it Pillow would not guard at all). Its warning between 1x and
    2x the limit becomes an error, so every refusal is an exception `open_image` turns into
    our message, and nothing is printed outside the log.
    """
    Image.MAX_IMAGE_PIXELS = max_pixels
    warnings.filterwarnings("error", category=Image.DecompressionBombWarning)


class Prepared(NamedTuple):
    """An image made model input, and how."""

    image: FloatImage
    """Float32 [1, 28, 28] in [0, 1], white ink on black."""
    redrawn: bool
    """Whether the preprocessing cropped, scaled and centred the ink (`centre_like_mnist`);
    False for an image in MNIST format, which passes through untouched."""


def preprocess(data: bytes, *, max_pixels: int) -> FloatImage:
    """One request's bytes -> model input: float32 [1, 28, 28] in [0, 1], white ink on black."""
    return prepare(open_image(data, max_pixels)).image


def prepare(opened: Opened) -> Prepared:
    """What `open_image` gave -> model input, and whether the preprocessing redrew it."""
    if isinstance(opened, np.ndarray):
        pixels = opened
    else:
        image = load(opened)
        if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
            return Prepared(centre_like_mnist(ink_map(image))[np.newaxis], redrawn=True)
        pixels = np.asarray(image)
    if not _black_background(pixels):
        return Prepared(centre_like_mnist(ink_map(Image.fromarray(pixels)))[np.newaxis], True)
    if pixels.max() < MIN_INK_CONTRAST * 255:
        raise BlankImageError("image has no ink: every pixel is (nearly) black")
    return Prepared(scale_pixels(pixels)[np.newaxis], redrawn=False)


def scale_pixels(pixels: npt.NDArray[np.uint8]) -> FloatImage:
    """8-bit pixels of any shape -> the model's float32 scale, 0-255 -> 0-1 (the one place
    it is defined: training, export and the tests use it too)."""
    return pixels.astype(np.float32) / np.float32(PIXEL_MAX)


def model_batch(images: npt.NDArray[np.uint8]) -> FloatImage:
    """MNIST-format uint8 images [N, 28, 28] -> model input float32 [N, 1, 28, 28] in [0, 1]."""
    return scale_pixels(images)[:, np.newaxis]


def is_raw(data: bytes) -> bool:
    """Whether request bytes are 784 raw pixels: no supported image format starts like them."""
    return len(data) == PIXELS and not data.startswith(_MAGIC)


def raw_batch(items: Sequence[bytes]) -> tuple[FloatImage, npt.NDArray[np.bool_]]:
    """Many raw 784-byte images (`is_raw`) at once -> model input float32 [N, 1, 28, 28], and
    which rows are final: MNIST format (mostly black, with ink), as `prepare` would
    pass them through. The other rows (dark on light, blank...) go through `prepare`
    one by one. One vectorised pass instead of one small numpy round per image."""
    pixels = np.frombuffer(b"".join(items), np.uint8).reshape(len(items), PIXELS)
    mostly_black = np.count_nonzero(pixels, axis=1) * 2 < PIXELS
    inked = pixels.max(axis=1) >= MIN_INK_CONTRAST * PIXEL_MAX
    inputs = scale_pixels(pixels).reshape(len(items), 1, IMAGE_SIZE, IMAGE_SIZE)
    return inputs, mostly_black & inked


def pixel_count(opened: Opened) -> int:
    """How many pixels decoding `opened` means (from the header: nothing is decoded)."""
    if isinstance(opened, np.ndarray):
        return opened.size
    width, height = opened.size
    return width * height


def decode(data: bytes, max_pixels: int) -> Image.Image:
    """Decode bytes into an upright, working-size 8-bit image in mode L or LA."""
    opened = open_image(data, max_pixels)
    return Image.fromarray(opened) if isinstance(opened, np.ndarray) else load(opened)


def open_image(data: bytes, max_pixels: int) -> Opened:
    """Read the header only and check the pixel limit: cheap, so callers can decide where
    the decode (`load`) runs. Raw 784-byte pixels come back as a ready uint8 [28, 28] array."""
    if not data:
        raise EmptyImageError("image is empty: the request carried no bytes")
    if is_raw(data):
        return _raw(data)  # no Pillow attempt: no supported format starts this way
    try:
        image = Image.open(io.BytesIO(data), formats=FORMATS)
    except UnidentifiedImageError:
        if len(data) == PIXELS:  # raw pixels that happen to start like an image file
            return _raw(data)
        raise UndecodableImageError(
            f"image is not a readable {', '.join(FORMATS[:-1])} or {FORMATS[-1]} file, "
            f"nor {PIXELS} raw pixels (got {len(data)} bytes)"
        ) from None
    except _PILLOW_BOMB as exc:
        # Pillow's own check, run inside `Image.open` before ours can see the size (see
        # `limit_pillow`): the same precise answer, from the header read again without it.
        raise ImageTooLargeError(_too_many_pixels(data, max_pixels, exc)) from None
    except MemoryError:
        raise
    except Exception as exc:  # a corrupt header: Pillow raises a zoo of types
        # Pillow's text names Python types and internals: it goes to the log, not the client.
        log.debug("undecodable image header: %r", exc)
        raise UndecodableImageError("image header is corrupt") from None

    width, height = image.size  # from the header: nothing is decoded yet
    if width * height > max_pixels:
        raise ImageTooLargeError(_pixels_message(width, height, max_pixels))
    return image


def _pixels_message(width: int, height: int, max_pixels: int) -> str:
    return f"image is {width}×{height} = {width * height} pixels; the limit is {max_pixels}"


def _too_many_pixels(data: bytes, max_pixels: int, refusal: Exception) -> str:
    """Our message for an image Pillow's bomb check refused while opening it.

    The format's own plugin reads the header again, without `Image.open`'s check, for the
    width and height; where the plugin checks by itself (WebP, a GIF frame beyond its
    canvas), the count comes from Pillow's message.
    """
    Image.preinit()  # registers the plugins of FORMATS (done already: Image.open ran)
    for name in FORMATS:
        factory, accept = Image.OPEN[name]
        if accept is not None and accept(data[:16]) is not True:
            continue
        try:
            width, height = factory(io.BytesIO(data), "").size
        except Exception:
            continue
        return _pixels_message(width, height, max_pixels)
    found = _PILLOW_PIXELS.search(str(refusal))
    count = f"{found[1]} pixels" if found else "too many pixels"
    return f"image is {count}; the limit is {max_pixels}"


def load(image: Image.Image) -> Image.Image:
    """Decode an image from `open_image` into an upright, working-size 8-bit L or LA image."""
    try:
        if image.format in ("JPEG", "MPO"):
            # Let libjpeg decode grey at 1/2..1/8 scale: a 4000x3000 photo costs ~1/64th.
            image.draft("L", (WORKING_SIDE, WORKING_SIDE))
        image.load()  # first frame only; truncated data raises here (and must)
        return _shrink(_canonical(ImageOps.exif_transpose(image)))
    except MemoryError:
        raise
    except _PILLOW_BOMB as exc:  # Pillow's check while decoding (a TIFF tile, say)
        found = _PILLOW_PIXELS.search(str(exc))
        count = f"{found[1]} pixels" if found else "more pixels than the limit"
        raise ImageTooLargeError(
            f"image needs {count} to decode; the limit is {Image.MAX_IMAGE_PIXELS}"
        ) from None
    except Exception as exc:
        log.debug("undecodable image data: %r", exc)
        raise UndecodableImageError("image data is truncated or corrupt") from None


def _raw(data: bytes) -> npt.NDArray[np.uint8]:
    """Raw 28x28 uint8 pixels, row-major (a read-only view of the request's bytes)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def _canonical(image: Image.Image) -> Image.Image:
    """Reduce Pillow's many modes to 8-bit L (grey) or LA (grey + alpha).

    8 bits are plenty: the output is 28x28 at MNIST's own 8-bit depth, and it lets the ink
    mapping run on a 256-bin histogram and a lookup table.
    """
    if image.mode in _SIXTEEN_BIT:
        return Image.fromarray(np.rint(np.asarray(image) / 257).astype(np.uint8))
    if image.mode in ("I", "F"):
        # No fixed full scale for 32-bit data: use the image's own range.
        # NaN/inf become 0/+-3.4e38 in float32, and the float64 math cannot overflow on those.
        values = np.nan_to_num(np.asarray(image).astype(np.float32)).astype(np.float64)
        span = float(values.max() - values.min())
        unit = (values - values.min()) / span if span > 0 else np.zeros_like(values)
        return Image.fromarray(np.rint(unit * 255).astype(np.uint8))
    if image.mode in ("LA", "PA", "RGBA", "RGBa", "La") or "transparency" in image.info:
        return image.convert("RGBA").convert("LA") if image.mode == "La" else image.convert("LA")
    if image.mode == "L":
        return image
    return image.convert("RGB").convert("L")  # via RGB: not every mode converts to L directly


def _shrink(image: Image.Image) -> Image.Image:
    """Box-average a big image down by an integer factor, before the float pipeline."""
    factor = max(image.size) // WORKING_SIDE
    return image.reduce(factor) if factor >= 2 else image


def is_mnist_format(image: Image.Image) -> bool:
    """Whether a decoded image is already MNIST input: 28x28, 8-bit grey, black background."""
    if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return False
    return _black_background(np.asarray(image))


def _black_background(pixels: npt.NDArray[np.uint8]) -> bool:
    """Whether the most common level is 0, as in MNIST (ties go to the darker level)."""
    if np.count_nonzero(pixels) * 2 < pixels.size:
        return True  # zeros are the majority, so the mode: the usual case, ~10x cheaper
    return int(np.bincount(pixels.ravel(), minlength=256).argmax()) == 0


def ink_map(image: Image.Image) -> FloatImage:
    """Ink intensity of a decoded L or LA image, float32 HxW: 0 is paper, 1 the strongest ink."""
    pixels: npt.NDArray[np.uint8] = np.asarray(image)
    if image.mode == "LA":
        grey, alpha = pixels[..., 0], pixels[..., 1]
        # A transparent background (canvas export): whatever the stroke colour, alpha is ink.
        transparent = _histogram(alpha).argmax() < TRANSPARENT_PAPER * 255
        pixels = alpha if transparent else grey
        if transparent:
            return _ink_lookup(_histogram(pixels))[pixels]
    paper = _paper_surface(pixels)
    if paper is not None:
        return _flattened_ink(pixels, paper)
    lookup: FloatImage = _ink_lookup(_histogram(pixels), _noise_level(pixels))[pixels]
    return _despeckle(lookup)


def _paper_surface(pixels: npt.NDArray[np.uint8]) -> FloatImage | None:
    """The paper's level under uneven light (a photo), or None where it is even enough.

    A quadratic surface is fitted to the image box-averaged to a coarse grid, robustly: each
    round drops the cells far from the surface (ink, whichever its polarity), so the fit
    follows the paper only.
    """
    height, width = pixels.shape
    if min(height, width) < FLATTEN_MIN_SIDE:
        return None
    factor = max(1, min(height, width) // FLATTEN_GRID)
    coarse = np.asarray(Image.fromarray(pixels).reduce(factor), dtype=np.float64)
    rows, cols = coarse.shape
    y, x = np.mgrid[0:rows, 0:cols]
    y, x = y.ravel() / rows - 0.5, x.ravel() / cols - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    values = coarse.ravel()
    paper = np.abs(values - np.median(values)) <= _mad(values) * FLATTEN_OUTLIER + 1
    for _ in range(FLATTEN_ROUNDS):
        coefficients = np.linalg.lstsq(basis[paper], values[paper], rcond=None)[0]
        residual = values - basis @ coefficients
        centre = np.median(residual[paper])
        kept = np.abs(residual - centre) <= _mad(residual[paper]) * FLATTEN_OUTLIER + 1
        if np.count_nonzero(kept) < basis.shape[1] or np.array_equal(kept, paper):
            break
        paper = kept
    fitted = basis @ coefficients
    if np.ptp(fitted[paper]) < FLATTEN_TOLERANCE * 255:
        return None
    # Evaluate the surface at full resolution (cell centres sit half a cell in).
    fy = (np.arange(height, dtype=np.float32) / factor - 0.5) / rows - 0.5
    fx = (np.arange(width, dtype=np.float32) / factor - 0.5) / cols - 0.5
    c = coefficients.astype(np.float32)
    surface = (
        c[0]
        + (c[1] + c[3] * fx)[np.newaxis, :] * fx[np.newaxis, :]
        + (c[2] + c[5] * fy)[:, np.newaxis] * fy[:, np.newaxis]
        + c[4] * fy[:, np.newaxis] * fx[np.newaxis, :]
    )
    result: FloatImage = surface.astype(np.float32)
    return result


def _mad(values: npt.NDArray[np.float64]) -> float:
    """Robust standard deviation: the median absolute deviation, scaled for a normal law."""
    return float(np.median(np.abs(values - np.median(values)))) * 1.4826


def _noise_level(pixels: npt.NDArray[np.uint8]) -> float:
    """The sensor noise's standard deviation, in grey levels, from neighbouring pixels.

    Differences of horizontal neighbours are mostly paper minus paper (ink edges are few), so
    their robust spread is the noise's times sqrt(2).
    """
    if min(pixels.shape) < FLATTEN_MIN_SIDE:
        return 0.0
    sample = pixels[:: max(1, pixels.shape[0] // FLATTEN_GRID)].astype(np.int16)
    differences = np.abs(np.diff(sample, axis=1)).ravel()
    return float(np.median(differences)) * 1.4826 / float(np.sqrt(2))


def _flattened_ink(pixels: npt.NDArray[np.uint8], paper: FloatImage) -> FloatImage:
    """Ink of an unevenly lit image: deviation from the fitted paper, on the ink's side."""
    deviation = pixels.astype(np.float32) - paper
    # The ink is on the side of the paper carrying more contrast (see `_ink_lookup`).
    if float(np.maximum(-deviation, 0).sum()) > float(np.maximum(deviation, 0).sum()):
        deviation = -deviation
    strongest = float(deviation.max())
    if strongest < MIN_INK_CONTRAST * 255:
        raise BlankImageError(
            f"image has no ink: every pixel is within {strongest / 255:.0%} of the paper"
            f" (at least {MIN_INK_CONTRAST:.0%} contrast is needed)"
        )
    floor = max(NOISE_FLOOR, NOISE_SIGMAS * _noise_level(pixels) / strongest)
    ink = (deviation / np.float32(strongest) - np.float32(floor)) / np.float32(1 - floor)
    return _despeckle(np.clip(ink, 0, 1).astype(np.float32))


def _despeckle(ink: FloatImage) -> FloatImage:
    """Drop ink pixels with no inked neighbour: sensor speckle, not strokes."""
    if ink.shape[0] < 3 or ink.shape[1] < 3:
        return ink
    inked = np.pad(ink > 0, 1)
    neighbours = np.zeros(ink.shape, dtype=bool)
    height, width = ink.shape
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            if dy != 1 or dx != 1:
                neighbours |= inked[dy : dy + height, dx : dx + width]
    return np.where(neighbours, ink, np.float32(0))


def _histogram(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
    return np.bincount(pixels.ravel(), minlength=256)


def _ink_lookup(histogram: npt.NDArray[np.intp], noise: float = 0.0) -> FloatImage:
    """Ink for each of the 256 levels: the paper maps to 0, the strongest ink to 1."""
    # The paper is the most common level: robust to any amount of ink, unlike the mean.
    paper = int(histogram.argmax())
    deviation = np.arange(256) - paper
    # The ink is on the side of the paper carrying more contrast (dark-on-light or
    # light-on-dark); the other side is noise or shading.
    if (histogram * np.maximum(-deviation, 0)).sum() > (histogram * np.maximum(deviation, 0)).sum():
        deviation = -deviation
    strongest = int(deviation[histogram > 0].max())
    if strongest < MIN_INK_CONTRAST * 255:
        raise BlankImageError(
            f"image has no ink: every pixel is within {strongest / 255:.0%} of the background"
            f" level (at least {MIN_INK_CONTRAST:.0%} contrast is needed)"
        )
    floor = max(NOISE_FLOOR, NOISE_SIGMAS * noise / strongest)
    ink = (deviation / strongest - floor) / (1 - floor)
    return np.clip(ink, 0, 1).astype(np.float32)


def centre_like_mnist(ink: FloatImage) -> FloatImage:
    """Crop to the ink, fit its longer side to 20 px with MNIST-like strokes, centre the mass
    in a 28x28 field."""
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if rows.size == 0:
        raise BlankImageError("image has no ink")
    crop = np.ascontiguousarray(ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1])
    patch = _saturate(_fit(crop, DIGIT_BOX))
    width = stroke_width(patch)
    if width < STROKE_THIN:
        # A thin pen: widen the strokes to MNIST's, in a box that leaves room for the growth.
        # Saturated before the widening, not after: saturating again would lift the partly
        # inked rim that `_thicken` blends in to full ink, and overshoot the width.
        grow = STROKE_TARGET - width
        patch = _thicken(_saturate(_fit(crop, DIGIT_BOX - 2 * _dilations(grow))), grow)

    total = float(patch.sum())
    centre_y = float(patch.sum(axis=1) @ np.arange(patch.shape[0])) / total
    centre_x = float(patch.sum(axis=0) @ np.arange(patch.shape[1])) / total
    # Shift by the rounded centre of mass, as MNIST did, clamped so no ink leaves the field.
    top = min(max(round(CENTRE - centre_y), 0), IMAGE_SIZE - patch.shape[0])
    left = min(max(round(CENTRE - centre_x), 0), IMAGE_SIZE - patch.shape[1])
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    field[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return field


def _fit(crop: FloatImage, box: int) -> FloatImage:
    """Anti-aliased resize of the crop so its longer side is `box` px, aspect kept."""
    height, width = crop.shape
    scale = box / max(height, width)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    return np.asarray(Image.fromarray(crop).resize(size, RESAMPLE), dtype=np.float32)


def _saturate(patch: FloatImage) -> FloatImage:
    """Scale ink so its upper percentile is full intensity, like MNIST's saturated strokes."""
    strongest = float(patch.max())
    if strongest <= 0:
        raise BlankImageError("image has no ink")
    level = float(np.percentile(patch[patch > strongest * NOISE_FLOOR], STROKE_SATURATION))
    saturated: FloatImage = np.clip(patch / np.float32(level), 0, 1).astype(np.float32)
    return saturated


def stroke_width(patch: FloatImage) -> float:
    """Mean stroke width in px: twice the ink's area over the perimeter of its core."""
    core = np.pad(patch > 0.5, 1)
    perimeter = np.count_nonzero(core[1:] != core[:-1]) + np.count_nonzero(
        core[:, 1:] != core[:, :-1]
    )
    return 2 * float(patch.sum()) / float(max(int(perimeter), 1))


def _thicken(patch: FloatImage, grow: float) -> FloatImage:
    """Widen strokes by `grow` px: 3x3 dilations (2 px each), the last one blended in part."""
    steps = _dilations(grow)
    padded = np.pad(patch, steps)
    for step in range(steps):
        dilated = _dilate(padded)
        part = min(1.0, grow / 2 - step)
        padded = padded + np.float32(part) * (dilated - padded)
    rows, cols = np.nonzero(padded.any(axis=1))[0], np.nonzero(padded.any(axis=0))[0]
    return padded[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]


def _dilations(grow: float) -> int:
    """How many 3x3 dilations widen strokes by `grow` px (each adds up to a pixel a side)."""
    return int(np.ceil(grow / 2))


def _dilate(image: FloatImage) -> FloatImage:
    """3x3 grey-level dilation (maximum over each pixel's neighbourhood)."""
    padded = np.pad(image, 1)
    height, width = image.shape
    out = image.copy()
    for dy in (0, 1, 2):
        for dx in (0, 1, 2):
            np.maximum(out, padded[dy : dy + height, dx : dx + width], out=out)
    return out
