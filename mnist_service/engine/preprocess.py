"""Turn a request's image bytes into the model input, the way MNIST itself was made.

The model was trained on MNIST, whose digits are white ink on black, scaled (with
anti-aliasing) so the longer side of the ink is 20 px, then placed in a 28x28 field with the
centre of mass at the centre. A user's drawing or photo classifies well only if it is brought
into that same form, so the pipeline is::

    decode       bytes -> upright 8-bit PIL image in mode L or LA.
                 Only PNG, JPEG, BMP, GIF, WebP and TIFF are opened (first frame only); the
                 pixel count is checked against ``max_pixels`` from the header, before any
                 pixel is decoded; big images are decoded small (JPEG draft) and shrunk
                 (integer reduce) while their shorter side stays at least WORKING_SIDE. A
                 transparent canvas becomes its alpha channel alone: the alpha is the ink.
                 Exactly 784 bytes that are no image are taken as raw 28x28 MNIST pixels. A
                 plain PNG is inflated by zlib-ng and unfiltered by Pillow (`png`): a 28x28
                 8-bit grey one at once, to its pixels, and a transparent canvas's alpha
                 alone.
    ink_map      -> float32 around the digit, 0 = paper, 1 = strongest ink. The paper is the
                 most common level of the image's border (paper even when the digit fills
                 the frame: a tight crop touches it at a few points); the ink is on whichever
                 side of it holds more contrast, so dark-on-light and light-on-dark both work.
                 Under uneven light (a photo of paper) a quadratic surface of the paper's
                 level, fitted to the border's paper and only where the border is mostly
                 paper on a smooth surface, is subtracted first; where a shadow's edge
                 crosses a photo, which no such surface follows, a running median over a
                 coarse grid of the page is (`_shading`), used only where the shadow reaches
                 the frame's edge and no stroke is taken for shade. A soft noise floor, raised
                 above the sensor noise measured along the border, keeps JPEG artefacts and
                 grain from growing the bounding box, and isolated specks are dropped. The
                 digit is found on a small copy and only its box is mapped, at ~FINE_SIDE px.
                 The lines of a form's box drawn around the digit (`frames`) are left out
                 where the digit is clear of them; where the crop runs along them, so the
                 border is the box and no paper, they are cut off first (`_peeled`). In a
                 small image, ruled lines that run past the digit at both ends are left out
                 but where strokes cross them.
    centre_like_mnist
                 -> float32 28x28: crop to the ink, anti-aliased resize of the longer side to
                 20 px, strokes brought to MNIST's (the ink's median made full ink, a
                 thin pen widened to MNIST's median stroke), shift by the rounded centre of
                 mass to (14, 14) without clipping ink.

An image that is already in MNIST format (28x28 8-bit grey on a black background, as are raw
784-byte requests) passes through untouched, so MNIST's own test images score exactly the
offline accuracy. Everything here is a pure function of its arguments, safe to call from
worker threads, except `limit_pillow`: the server calls it once at startup, before any decode,
to set Pillow's own bomb limit (``MAX_IMAGE_PIXELS``) from ``--max-image-pixels``.
"""

from __future__ import annotations

import functools
import io
import logging
import re
import warnings
from collections.abc import Sequence
from typing import Any, Final, NamedTuple, TypeVar

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

from . import frames, png
from .png import PngFile

__all__ = [
    "Opened",
    "Prepared",
    "Undecoded",
    "centre_like_mnist",
    "decode",
    "ink_map",
    "is_mnist_format",
    "limit_pillow",
    "load",
    "model_batch",
    "open_image",
    "pixel_count",
    "pixels_batch",
    "prepare",
    "prepare_decoded",
    "preprocess",
    "scale_pixels",
    "stroke_width",
]

log = logging.getLogger(__name__)

FloatImage = npt.NDArray[np.float32]
Undecoded = Image.Image | PngFile
"""An image file whose header is read and checked, its pixels not decoded yet (`load`): a
plain PNG (`png.read`), or any file Pillow opens."""
Opened = Undecoded | npt.NDArray[np.uint8]
"""What `open_image` gives: an image file to decode, or 28x28 pixels that need no more
decoding (raw bytes, or an MNIST-format PNG)."""

FORMATS: Final = ("PNG", "JPEG", "BMP", "GIF", "WEBP", "TIFF")
"""The only formats we open (phone JPEGs that Pillow reads as MPO come in through JPEG)."""

WORKING_SIDE: Final = 192
"""Big images are decoded small (JPEG's 1/2-1/8 scales) and shrunk by an integer factor while
their shorter side stays at least this: a digit a fifth of the frame tall keeps 38 px or more,
twice the 20 px it is drawn at."""

WORKING_ASPECT: Final = 4
"""...and a long strip is shrunk further, until its longer side is at most this many times
WORKING_SIDE."""

FIND_SIDE: Final = 64
"""The digit is found on a copy of the image shrunk to about this many px on its longer side
(`_digit_box`)."""

FINE_SIDE: Final = 80
"""The digit's ink is mapped at about this many px on the longer side of its box: four times
the 20 px it is then drawn at, so the anti-aliased resize has detail to average."""

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

FLATTEN_ROUNDS: Final = 2
"""Rounds of the robust surface fit: each drops the cells that do not look like paper. (Four
rounds move the surface by under 0.8 grey levels on the report's photos, for 80 us more.)"""

FLATTEN_OUTLIER: Final = 3.0
"""Cells further than this many robust deviations from the surface are ink, not paper."""

FLATTEN_RING: Final = 3
"""The lighting is fitted on the grid's cells this close to the border of the frame."""

FLATTEN_MIN_PAPER: Final = 0.75
"""At least this share of the border's cells must be paper for a lighting fit (photos: 94 %
or more; a digit cropped to its ink or a thumbnail's blurred strokes: about half)."""

FLATTEN_MAX_MISFIT: Final = 0.02
"""The border's paper cells must lie this close to the fitted surface (robust deviation, as a
fraction of full scale): box-averaged paper under smooth light does (photos: 0.2 %), a border
half made of strokes does not."""

SHADE_MIN_SIDE: Final = 192
"""A photo whose quadratic surface (`_lighting`) fails, or leaves out more than
`SHADE_UNEXPLAINED` of the page, is looked at for a shadow (`_shading`) where it is at least
this size on its shorter side; smaller images (thumbnails, crops) are taken as lit smoothly or
evenly."""

SHADE_UNEXPLAINED: Final = 0.15
"""A digit's strokes leave 1-5 % of the lighting grid's cells out of the quadratic surface on
the report's photos; a shadow across a sixth of the page or more leaves out more than this."""

SHADE_GRID: Final = 32
"""A shadow is looked for on the image box-averaged to about this many cells a side."""

SHADE_ARC: Final = 0.1
"""A shadow crosses the frame's border: a run of at least this share of the border's cells,
steady (`SHADE_STEADY`), a tenth or more darker than its lightest paper and no darker than a
shadow (`SHADE_DEPTH`), where the level climbs or falls steeply (`SHADE_JUMP`) at two places at
most, where the shadow's edges cross the border. Strokes that cross it do so at two places each."""

SHADE_STEADY: Final = 0.04
"""Along the shadow's run, neighbouring cells differ by at most this share of the lightest
paper (the light's slope, sensor noise)."""

SHADE_JUMP: Final = 0.05
"""A climb or fall of more than this share of the lightest paper from one border cell to the
next is steep: the edge of a shadow, or of a stroke."""

SHADE_WINDOW: Final = 9
"""The paper's level under a shadow is the running median of this many cells across, then
down: a stroke fills few cells of a window and drops out; a shadow, wider than half the
window, stays."""

SHADE_DEPTH: Final = 0.3
"""A shadow leaves paper at least this share of the light of the page's lightest paper; what
is darker over half a window is a stroke (a pen's ink: 10-25 %), and no shading is used."""

SHADE_FOLLOWED: Final = 0.04
"""Where a quadratic surface fitted to the medians' border cells misses nine tenths of them by
less than this share of the lightest paper, the light is smooth after all: that surface is
used. (`_lighting` may have found none where its border's paper looked like ink.)"""

FRAME_INK: Final = 0.15
"""Lines drawn around the digit (a form's box: `frames`) are looked for on the digit's ink map
among pixels of at least this ink: fainter edges of lines and strokes, and JPEG's ringing,
would join the digit to its box."""

EDGE_DARK: Final = 128
"""A border darker than this may be a dark frame drawn along the image's edges (`_peeled`)."""

EDGE_DEPTH: Final = 0.08
"""...at most this share of the image's shorter side thick;"""

EDGE_CONTRAST: Final = 0.3
"""...and then the inside, that deep in, is mostly lighter than it by this share of full scale
or more (the paper)."""

EDGE_PEELS: Final = 3
"""A frame of up to this many lines along the edges is cut off, a line at a time (a double
line: each cut stops past the first row of paper, where the second line may begin)."""

EDGE_SPREAD: Final = 24
"""A line's pixels lie within this many grey levels of the border's level (JPEG's ringing)."""

EDGE_UNIFORM: Final = 0.95
"""A side's outermost row is a frame's line where this share of it or more is at the border's
level; past the line, a row of which less than the rest is at that level is paper."""

STROKE_THIN: Final = 1.5
"""Strokes narrower than this (px at the 20 px scale, `stroke_width`) are thickened. MNIST's
training digits: 5th percentile 1.30, median 1.92, 90th 2.67; pens of 1-4 px on drawings of
200-300 px measure 0.8-1.1 here (after `_saturate`), a 9 px felt tip on a 200 px drawing 1.3.
Widening from 1.5 rather than 1.2 brings the felt tip to MNIST's width too: the ConvNet
shipped before misread 103 of the 10,000 test digits drawn so, 95 widened, and MNIST's own
digits inverted at 28 px lost nothing (49 misread, 46)."""

STROKE_TARGET: Final = 1.9
"""The width thin strokes are brought to: MNIST's median."""

PAPER_SPREAD: Final = 4
"""Sensor noise spreads the paper's level: it is found as the most common band of this many
levels either side (about 2 % of full scale)."""

TRANSPARENT_PAPER: Final = 0.5
"""If the most common alpha is below this, the background is transparent: alpha is the ink."""

RESAMPLE: Final = Image.Resampling.BILINEAR
"""Scaling filter for the digit, widened with the scale factor (anti-aliasing): Pillow's
bilinear, which `_resize_weights` computes as a matrix."""

CENTRE: Final = IMAGE_SIZE / 2
"""MNIST's centre of mass sits at (14, 14) in pixel-index coordinates (measured: 13.99, 14.01)."""

_MAGIC: Final = (b"\x89PNG", b"\xff\xd8", b"BM", b"GIF8", b"RIFF", b"II*\x00", b"MM\x00*")
"""How the files of FORMATS start; 784 bytes starting otherwise are raw pixels, unopened."""

_ORIENTATION_KEYS: Final = frozenset({"exif", "Raw profile type exif", "XML:com.adobe.xmp", "xmp"})
"""Where `Image.getexif` finds an orientation (a TIFF's own tags aside)."""

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
        return _prepare_pixels(opened)
    return prepare_decoded(load(opened))


def prepare_decoded(image: Image.Image) -> Prepared:
    """An image `load` decoded -> model input, and whether the preprocessing redrew it (the
    part of `prepare` after Pillow's decode)."""
    if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return Prepared(centre_like_mnist(ink_map(image))[np.newaxis], redrawn=True)
    return _prepare_pixels(_array(image))


def _prepare_pixels(pixels: npt.NDArray[np.uint8]) -> Prepared:
    """28x28 8-bit grey pixels -> model input: as they are in MNIST format, else redrawn."""
    if not _black_background(pixels):
        return Prepared(centre_like_mnist(_grey_ink(pixels))[np.newaxis], redrawn=True)
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
    return pixels_batch(np.frombuffer(b"".join(items), np.uint8))


def pixels_batch(pixels: npt.NDArray[np.uint8]) -> tuple[FloatImage, npt.NDArray[np.bool_]]:
    """Many 28x28 8-bit grey images at once (uint8, 784 a row in any shape: the pixels of
    MNIST-format PNGs, say) -> model input float32 [N, 1, 28, 28], and which rows are final,
    as in `raw_batch`."""
    rows = pixels.reshape(-1, PIXELS)
    mostly_black = np.count_nonzero(rows, axis=1) * 2 < PIXELS
    inked = rows.max(axis=1) >= MIN_INK_CONTRAST * PIXEL_MAX
    inputs = scale_pixels(rows).reshape(len(rows), 1, IMAGE_SIZE, IMAGE_SIZE)
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
    the decode (`load`) runs. Raw 784-byte pixels come back as a ready uint8 [28, 28] array,
    and so does a plain 28x28 8-bit grey PNG (decoded at once by `png`, for half of what
    Pillow's file machinery costs on its own); another plain PNG comes back as a
    `png.PngFile`, to be decoded by `load`."""
    if not data:
        raise EmptyImageError("image is empty: the request carried no bytes")
    if is_raw(data):
        return _raw(data)  # no Pillow attempt: no supported format starts this way
    file = png.read(data)
    if file is not None:
        width, height = file.size
        if width * height > max_pixels:
            raise ImageTooLargeError(_pixels_message(width, height, max_pixels))
        if file.mode == "L" and file.size == (IMAGE_SIZE, IMAGE_SIZE):
            pixels = png.decode(file)  # a few microseconds: no reason to wait
            if pixels is not None:
                array: npt.NDArray[np.uint8] = _array(pixels)
                return array
        return file
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


def load(image: Undecoded) -> Image.Image:
    """Decode an image from `open_image` into an upright, working-size 8-bit L or LA image."""
    try:
        if isinstance(image, PngFile):
            decoded = _load_png(image)
            if decoded is not None:
                return _shrink(decoded)
            # Data that does not inflate as its header says: Pillow's to read, or refuse.
            image = Image.open(io.BytesIO(image.data), formats=("PNG",))
        if image.format in ("JPEG", "MPO"):
            # Let libjpeg decode grey at 1/2..1/8 scale: a 4000x3000 photo costs ~1/64th.
            # (a scale that keeps the shorter side at least WORKING_SIDE).
            image.draft("L", (WORKING_SIDE, WORKING_SIDE))
        image.load()  # first frame only; truncated data raises here (and must)
        return _shrink(_canonical(_upright(image)))
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


def _load_png(file: PngFile) -> Image.Image | None:
    """A plain PNG decoded (`png`) into its canonical L image (`_canonical`): a transparent
    canvas's alpha channel alone, or the whole image converted; None where its data does not
    inflate as its header says."""
    image = png.decode(file, alpha_only=_alpha_is_ink)
    if image is None or image.mode == "L":
        return image  # L: a grey image, or the alpha channel of a transparent canvas
    return image.convert("L")  # as `_canonical` converts one whose alpha (if any) is no ink


def _alpha_is_ink(alpha: Image.Image) -> bool:
    """Whether an image's alpha channel is its ink: the background is transparent."""
    return _transparent(_border(_array(alpha)))


def _upright(image: Image.Image) -> Image.Image:
    """The decoded image turned as its EXIF (or XMP) orientation says, in place: where Pillow
    can find no orientation (no EXIF or XMP in the file, not a TIFF), the image as it is,
    without parsing anything or copying the pixels."""
    if image.format == "TIFF" or not _ORIENTATION_KEYS.isdisjoint(image.info):
        ImageOps.exif_transpose(image, in_place=True)
    return image


def _raw(data: bytes) -> npt.NDArray[np.uint8]:
    """Raw 28x28 uint8 pixels, row-major (a read-only view of the request's bytes)."""
    return np.frombuffer(data, dtype=np.uint8).reshape(IMAGE_SIZE, IMAGE_SIZE)


def _canonical(image: Image.Image) -> Image.Image:
    """Reduce Pillow's many modes to 8-bit L: grey, or the alpha of a transparent canvas.

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
    if image.mode in ("LA", "RGBA"):
        # A transparent background (a canvas export): whatever the strokes' colour, the alpha
        # is the ink, and the grey is not needed (nor its conversion, a third of the decode).
        alpha = image.getchannel("A")
        if _alpha_is_ink(alpha):
            return alpha
        return image.convert("L")
    if image.mode in ("PA", "RGBa", "La") or "transparency" in image.info:
        with_alpha = image.convert("RGBA") if image.mode == "La" else image
        return _canonical(with_alpha.convert("LA"))
    if image.mode == "L":
        return image
    return image.convert("RGB").convert("L")  # via RGB: not every mode converts to L directly


def _transparent(border: npt.NDArray[np.uint8]) -> bool:
    """Whether the border of an alpha channel says the background is transparent: its paper
    level (`_paper_level`) is under `TRANSPARENT_PAPER`, as it surely is when every border
    pixel is (the usual canvas export: a border all 0)."""
    threshold = TRANSPARENT_PAPER * 255
    if border.max() < threshold:
        return True
    return bool(border.min() < threshold) and _paper_level(border) < threshold


def _shrink(image: Image.Image) -> Image.Image:
    """Box-average a big image down by an integer factor, before the float pipeline: its
    shorter side stays at least `WORKING_SIDE`, its longer one at most `WORKING_SIDE` x
    `WORKING_ASPECT` where it can."""
    shorter, longer = sorted(image.size)
    factor = max(shorter // WORKING_SIDE, longer // (WORKING_SIDE * WORKING_ASPECT))
    return image.reduce(factor) if factor >= 2 else image


def is_mnist_format(image: Image.Image) -> bool:
    """Whether a decoded image is already MNIST input: 28x28, 8-bit grey, black background."""
    if image.mode != "L" or image.size != (IMAGE_SIZE, IMAGE_SIZE):
        return False
    return _black_background(_array(image))


def _black_background(pixels: npt.NDArray[np.uint8]) -> bool:
    """Whether the most common level is 0, as in MNIST (ties go to the darker level)."""
    if np.count_nonzero(pixels) * 2 < pixels.size:
        return True  # zeros are the majority, so the mode: the usual case, ~10x cheaper
    return int(np.bincount(pixels.ravel(), minlength=256).argmax()) == 0


def ink_map(image: Image.Image) -> FloatImage:
    """Ink intensity around the digit of a decoded L or LA image, float32: 0 is paper, 1 the
    strongest ink (an LA image is read as `_canonical` reads it: its alpha on a transparent
    background, else its grey).

    The paper (its level, its lighting, its noise) is measured on the whole image, mostly
    at its border. The digit is then found on a copy shrunk to about `FIND_SIDE` px, and the
    ink is mapped only in the digit's box, shrunk to about `FINE_SIDE` px: so the cost hardly
    depends on the image's size, and paper far from the digit cannot add ink.
    """
    grey = _canonical(image) if image.mode == "LA" else image
    return _grey_ink(_array(grey), grey)


def _grey_ink(
    pixels: npt.NDArray[np.uint8], picture: Image.Image | None = None, *, peels: int = EDGE_PEELS
) -> FloatImage:
    """`ink_map` of 8-bit grey pixels; `picture` is the same pixels as a Pillow image, where
    the caller has one (else one is made when needed). A dark frame's line along the edges is
    cut off (`_peeled`) up to `peels` times."""
    ring = _border(pixels)
    darkest, lightest = int(ring.min()), int(ring.max())
    flat = darkest == lightest  # a drawing's background: no noise, no lighting, one level
    level = darkest if flat else _paper_level(ring)
    if peels and level < EDGE_DARK and min(pixels.shape) >= frames.MIN_SIDE:
        peeled = _peeled(pixels, level)
        if peeled is not None:  # the border was a frame's line: the paper is inside it
            return _grey_ink(peeled, peels=peels - 1)
    if max(pixels.shape) < FLATTEN_MIN_SIDE:
        # A thumbnail: taken as evenly lit and noiseless, and mapped whole.
        return _unframed(_box_ink(pixels, Paper(level, None, 0.0), 0, 0, 1))
    if picture is None:
        picture = _image(pixels)  # the same pixels, for Pillow's reductions
    if flat:
        paper = Paper(level, None, 0.0)
    else:
        # Light that varies less than the tolerance along the whole border is not fitted.
        uneven = lightest - darkest >= FLATTEN_TOLERANCE * 255
        lighting: Lighting | Shading | None = None
        if uneven:
            lighting = _lighting(picture)
            if lighting is None or lighting.unexplained > SHADE_UNEXPLAINED:
                lighting = _shading(picture, ring) or lighting
        paper = Paper(level, lighting, _noise_level(pixels, ring))
    top, bottom, left, right = _digit_box(picture, paper)
    step = max(1, max(bottom - top, right - left) // FINE_SIDE)
    if step >= 2:
        box = _array(picture.reduce(step, (left, top, right, bottom)))
    else:
        box = pixels[top:bottom, left:right]
    ink = _box_ink(box, paper, top, left, step)
    # `_digit_box` has left a frame out where it looked at a smaller copy.
    return ink if max(pixels.shape) >= 2 * FIND_SIDE else _unframed(ink)


def _peeled(pixels: npt.NDArray[np.uint8], level: int) -> npt.NDArray[np.uint8] | None:
    """The image without the lines of a dark frame drawn along its edges (a form's box cropped
    at its lines, where the border is the box and no paper), or None where there is none.

    Only where the rows `EDGE_DEPTH` in, top and bottom, are mostly much lighter than the
    border (`EDGE_CONTRAST`); then each side whose outermost row is one line at the border's
    level (`EDGE_UNIFORM` of it, within `EDGE_SPREAD`) is cut past the first row that is mostly
    not (a light-on-dark digit that touches the edge leaves dark rows within: it is not cut)."""
    height, width = pixels.shape
    depth = max(2, int(EDGE_DEPTH * min(height, width)))
    # The rows that deep in, top and bottom (a frame's paper; a quick test, on two rows).
    inside = np.concatenate((pixels[depth], pixels[-1 - depth]))
    if _middle(inside) - level < EDGE_CONTRAST * 255:
        return None
    cuts = []
    for side in (pixels, pixels[::-1], pixels.T, pixels.T[::-1]):  # rows from each edge in
        # Each row but its ends, where the frame's other lines cross it.
        rows = side[: depth + 1, depth:-depth].astype(np.int16)
        share = (np.abs(rows - level) <= EDGE_SPREAD).mean(axis=1)
        clear = np.flatnonzero(share < 1 - EDGE_UNIFORM)
        # Past the line, and the row of its anti-aliased edge.
        cuts.append(int(clear[0]) + 1 if share[0] >= EDGE_UNIFORM and clear.size else 0)
    if not any(cuts):
        return None
    top, bottom, left, right = cuts
    return np.ascontiguousarray(pixels[top : height - bottom, left : width - right])


def _unframed(ink: FloatImage) -> FloatImage:
    """The ink map without the lines drawn around the digit, where there are such lines
    (`frames.inside`), or else without the ruled lines that run past it (`frames.ruled`), in
    place."""
    if min(ink.shape) < frames.MIN_SIDE:
        return ink
    inked = ink >= FRAME_INK
    rows, cols = np.flatnonzero(inked.any(axis=1)), np.flatnonzero(inked.any(axis=0))
    if rows.size == 0:
        return ink
    box = _bounds(rows, cols)
    part = frames.inside(inked, box)
    if part is not None:
        return np.multiply(ink, part, out=ink)
    ruled = frames.ruled(inked, box)
    if ruled is not None:
        ink[ruled] = 0
    return ink


def _bounds(rows: npt.NDArray[np.intp], cols: npt.NDArray[np.intp]) -> frames.Box:
    """The box (top, bottom, left, right) of the inked `rows` and `cols` (in order, not empty)."""
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


class Lighting(NamedTuple):
    """A quadratic surface of the paper's grey level over the image (uneven light)."""

    terms: npt.NDArray[np.float32]
    """The surface's coefficients as a 3x3 matrix T, T[i, j] that of yⁱxʲ (so the surface is
    [1, y, y²] T [1, x, x²]ᵀ), where cell (i, j) of the fitted grid is at y = i / rows - 0.5,
    x = j / columns - 0.5."""
    cell: int
    """The grid's cells are cell x cell pixels."""
    rows: int
    columns: int
    unexplained: float
    """The share of the grid's cells whose level the surface does not explain: ink, or light
    it cannot follow (`SHADE_UNEXPLAINED`)."""

    @classmethod
    def of(
        cls, coefficients: _Basis, cell: int, rows: int, columns: int, unexplained: float
    ) -> Lighting:
        """The surface of coefficients of 1, x, y, x², xy, y² (`_Cells.fit`)."""
        c0, c1, c2, c3, c4, c5 = coefficients.tolist()
        terms = np.array([[c0, c1, c3], [c2, c4, 0], [c5, 0, 0]], np.float32)
        return cls(terms, cell, rows, columns, unexplained)

    def at(self, top: int, left: int, shape: tuple[int, ...], step: int) -> FloatImage:
        """The surface over a `shape` of blocks of step x step pixels, the first at (top,
        left): each block's mean is compared with the surface at its centre."""
        first = (step - 1) / 2 - (self.cell - 1) / 2  # block centre less cell centre, in px
        # y = (top + first + i * step) / cell / rows - 0.5 at row i; x likewise at column j.
        fy = np.arange(shape[0], dtype=np.float32) * np.float32(step / self.cell / self.rows)
        fy += np.float32((top + first) / self.cell / self.rows - 0.5)
        fx = np.arange(shape[1], dtype=np.float32) * np.float32(step / self.cell / self.columns)
        fx += np.float32((left + first) / self.cell / self.columns - 0.5)
        surface: FloatImage = np.asarray((_powers(fy).T @ self.terms) @ _powers(fx), np.float32)
        return surface


def _powers(values: FloatImage) -> FloatImage:
    """[1, v, v²] for each of `values`: float32 [3, N]."""
    powers = np.ones((3, values.size), np.float32)
    powers[1] = values
    np.multiply(values, values, out=powers[2])
    return powers


class Shading(NamedTuple):
    """The paper's grey level over the image as a coarse grid (light with an edge: a shadow),
    linear between the cells' centres and level beyond the outer ones."""

    grid: FloatImage
    """float32 [rows, columns], the level of each cell."""
    cell: int
    """The grid's cells are cell x cell pixels."""

    def at(self, top: int, left: int, shape: tuple[int, ...], step: int) -> FloatImage:
        """The level over a `shape` of blocks of step x step pixels, the first at (top, left):
        each block's mean is compared with the level at its centre."""
        first = (step - 1) / 2 - (self.cell - 1) / 2  # block centre less cell centre, in px
        rows, columns = self.grid.shape
        down = _between(shape[0], (top + first) / self.cell, step / self.cell, rows)
        across = _between(shape[1], (left + first) / self.cell, step / self.cell, columns)
        surface: FloatImage = np.asarray((down @ self.grid) @ across.T, np.float32)
        return surface


def _between(count: int, start: float, spacing: float, cells: int) -> FloatImage:
    """Linear interpolation weights [count, cells] at `count` positions from `start`,
    `spacing` apart, in cell units (cell j's centre at j), clamped to the outer cells."""
    positions = np.clip(np.arange(count) * spacing + start, 0, cells - 1)
    below = np.minimum(positions.astype(np.intp), max(cells - 2, 0))
    above = np.minimum(below + 1, cells - 1)
    weights = np.zeros((count, cells), np.float32)
    points = np.arange(count)
    weights[points, above] = positions - below
    weights[points, below] += 1 - (positions - below)
    return weights


class Paper(NamedTuple):
    """What the image's paper is like, measured once for the whole image."""

    level: int
    """Its grey level (`_paper_level`), where the light is even."""
    lighting: Lighting | Shading | None
    """Its level under uneven light (a photo: a quadratic surface), or under a shadow (a grid),
    or None."""
    noise: float
    """The sensor noise's standard deviation, in grey levels (`_noise_level`)."""


def _box_ink(
    box: npt.NDArray[np.uint8], paper: Paper, top: int, left: int, step: int
) -> FloatImage:
    """The ink of the digit's box: float32, 0 is paper, 1 the strongest ink. Each of the box's
    pixels is step x step of the image's (the digit's box reduced to about `FINE_SIDE` px on
    its longer side), the first at (top, left)."""
    deviation = _deviation(box, paper, top, left, step)
    side = _ink_side(deviation, paper)
    strongest = float(deviation.max()) if side > 0 else -float(deviation.min())
    if strongest < MIN_INK_CONTRAST * 255:
        raise BlankImageError(
            f"image has no ink: every pixel is within {strongest / 255:.0%} of the paper"
            f" (at least {MIN_INK_CONTRAST:.0%} contrast is needed)"
        )
    # Averaging step x step pixels divides the noise by step.
    floor = max(NOISE_FLOOR, NOISE_SIGMAS * paper.noise / step / strongest)
    scale = np.float32(side / strongest / (1 - floor))
    ink = deviation * scale - np.float32(floor / (1 - floor))
    np.maximum(ink, 0, out=ink)
    return _despeckle(np.minimum(ink, 1, out=ink))


def _deviation(
    pixels: npt.NDArray[np.uint8], paper: Paper, top: int, left: int, step: int
) -> FloatImage:
    """Pixels less the paper under them, float32 (signed: the ink may be either side)."""
    if paper.lighting is None:
        flat: FloatImage = pixels.astype(np.float32) - np.float32(paper.level)
        return flat
    surface = paper.lighting.at(top, left, pixels.shape, step)
    return np.subtract(pixels, surface, out=surface)


def _ink_side(deviation: FloatImage, paper: Paper) -> int:
    """+1 if the ink is brighter than the paper, -1 if darker.

    The ink is on the side holding more contrast beyond `MIN_INK_CONTRAST`: on a page a
    hundred times the digit's area, the paper's own small deviations (noise, light the fit
    missed) would outweigh a thin digit if they all counted. On evenly lit paper within that
    contrast of black (MNIST's own) or white, the ink can only be on the other side.
    """
    threshold = np.float32(MIN_INK_CONTRAST * 255)
    if paper.lighting is None:
        if paper.level < threshold:  # nothing can be that much darker than the paper
            return 1
        if paper.level + threshold > 255:  # nor that much brighter
            return -1 if bool((deviation < -threshold).any()) else 1
    # The contrast above the paper less that below, beyond the threshold either way.
    beyond = float(deviation.sum(where=np.abs(deviation) > threshold))
    return 1 if beyond >= 0 else -1


def _digit_box(picture: Image.Image, paper: Paper) -> tuple[int, int, int, int]:
    """Where the digit is: (top, bottom, left, right), found on a copy about `FIND_SIDE` px
    on its longer side, grown by one of its pixels on each side, and within the lines drawn
    around it where there are such lines (a form's box: `frames.inside`); the whole image when
    it is that small already, or when the copy shows no clear ink (a faint, thin pen)."""
    width, height = picture.size
    step = max(height, width) // FIND_SIDE
    if step < 2:
        return 0, height, 0, width
    coarse = _array(picture.reduce(step))
    deviation = _deviation(coarse, paper, 0, 0, step)
    deviation *= _ink_side(deviation, paper)
    strongest = float(deviation.max())
    threshold = max(NOISE_FLOOR * strongest, NOISE_SIGMAS * paper.noise / step)
    inked = _neighboured(deviation > threshold)
    rows, cols = np.nonzero(inked.any(axis=1))[0], np.nonzero(inked.any(axis=0))[0]
    if strongest < MIN_INK_CONTRAST * 255 or rows.size == 0:
        return 0, height, 0, width
    part = frames.inside(inked, _bounds(rows, cols))
    if part is not None:
        inked &= part
        rows, cols = np.nonzero(inked.any(axis=1))[0], np.nonzero(inked.any(axis=0))[0]
    return (
        max((int(rows[0]) - 1) * step, 0),
        min((int(rows[-1]) + 2) * step, height),
        max((int(cols[0]) - 1) * step, 0),
        min((int(cols[-1]) + 2) * step, width),
    )


def _border(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.uint8]:
    """The pixels of the image's outer ring, one pixel deep, in order around it (clockwise
    from the top left corner); all of the pixels of an image 2 px or less across."""
    if min(pixels.shape) <= 2:
        return pixels.ravel()
    return np.concatenate([pixels[0], pixels[1:, -1], pixels[-1, -2::-1], pixels[-2:0:-1, 0]])


def _paper_level(border: npt.NDArray[np.uint8]) -> int:
    """The paper's grey level: the most common level of the image's border (`_border`), give
    or take `PAPER_SPREAD` levels.

    A digit cropped to its ink touches every edge of the frame, yet only at a few points,
    while inside the frame the ink can be the most common level (a tightly cropped 1): the
    border is paper wherever the image has any. A blurred stroke crossing it leaves the
    paper's level the most common one (its median would not be); the mean of the most
    common band of levels, not the most common level alone, stays put under sensor noise.
    """
    histogram = _histogram(border)
    centre = int(np.correlate(histogram, _BAND, "same").argmax())
    low, high = max(centre - PAPER_SPREAD, 0), min(centre + PAPER_SPREAD + 1, 256)
    band: list[int] = histogram[low:high].tolist()  # 9 counts: Python sums them cheaper
    weighted = sum(count * level for count, level in zip(band, range(low, high), strict=True))
    return round(weighted / sum(band))


_BAND: Final = np.ones(PAPER_SPREAD * 2 + 1, np.intp)
_BAND.flags.writeable = False


def _lighting(picture: Image.Image) -> Lighting | None:
    """The paper's level under uneven light (a photo), or None where it is even enough.

    A quadratic surface is fitted to the image box-averaged to a coarse grid, robustly, first
    on the border of the frame alone (the paper a photo shows around the digit): each round
    drops the cells far from the surface (ink that reaches the border, whichever its
    polarity). The cells inside the frame that this surface then calls paper join the border
    for the final fit, so the light is followed near the digit too. Ink is never fitted: a
    digit that fills the frame leaves the border to decide, and where too little of the
    border is paper, or the paper there does not lie on a smooth surface, the level is taken
    as flat.
    """
    if min(picture.size) < FLATTEN_MIN_SIDE:
        return None
    factor = max(1, min(picture.size) // FLATTEN_GRID)
    coarse = _array(picture.reduce(factor)).astype(np.float64)
    rows, cols = coarse.shape
    grid = _grid(rows, cols)
    values = coarse.ravel()
    border = values[grid.ring]  # the rounds fit the border's cells alone; the inside joins last
    distance = np.abs(border - _middle(border))
    paper = distance <= _middle(distance) * _MAD_SCALE * FLATTEN_OUTLIER + 1
    if not paper.any() or _span(border[paper]) < FLATTEN_TOLERANCE * 255:
        return None  # the border's paper is evenly lit (or there is none)
    for _ in range(FLATTEN_ROUNDS):
        if np.count_nonzero(paper) < FLATTEN_MIN_PAPER * border.size:
            return None  # the border is largely ink: nothing to fit the light to
        coefficients = grid.on_ring.fit(border, paper)
        residual = border - grid.on_ring.cells @ coefficients
        centre, misfit = _centre_spread(residual[paper])
        kept = np.abs(residual - centre) <= misfit * FLATTEN_OUTLIER + 1
        if (kept == paper).all():
            break
        paper = kept
    else:  # the last round dropped cells: their spread is the one left
        misfit = _centre_spread(residual[paper])[1]
    if (
        np.count_nonzero(paper) < FLATTEN_MIN_PAPER * border.size
        or misfit > FLATTEN_MAX_MISFIT * 255
    ):
        return None
    # The inside's paper: cells the border's surface explains as well as the border itself.
    everywhere = np.abs(values - grid.all.cells @ coefficients - centre) <= (
        misfit * FLATTEN_OUTLIER + 1
    )
    everywhere[grid.ring] |= paper
    coefficients = grid.all.fit(values, everywhere)
    if _span((grid.all.cells @ coefficients)[everywhere]) < FLATTEN_TOLERANCE * 255:
        return None
    unexplained = 1 - np.count_nonzero(everywhere) / everywhere.size
    return Lighting.of(coefficients, factor, rows, cols, unexplained)


def _shading(picture: Image.Image, border: npt.NDArray[np.uint8]) -> Shading | Lighting | None:
    """The level of light paper under a shadow across a photo (a hand, a phone), where the
    quadratic surface of `_lighting` found none or left much of the page out; None where no
    shadow crosses the frame's border (`_shadow_crosses`), where the paper is dark (the lightest
    tenth of the image's `border` is: a board, whose ink is light, and whose shadows are on the
    paper's side), or where a stroke would be taken for shade.

    The image is box-averaged to about `SHADE_GRID` cells a side, and each cell takes the
    median of the `SHADE_WINDOW` cells around it across, then of those down: a stroke fills
    few of a window's cells and drops out, a shadow fills most and stays, and on a smooth slope
    of light the median is the cell's own level. Where a quadratic surface follows those
    medians along the border after all, that surface is the answer (`SHADE_FOLLOWED`). A shadow
    comes from beyond the frame, so it is as deep at the frame's edge as inside: a dip only
    inside, or one darker than a shadow (`SHADE_DEPTH`), is a stroke's ink the medians kept, and
    no shading is used. Small images are never shaded (`SHADE_MIN_SIDE`).
    """
    if min(picture.size) < SHADE_MIN_SIDE or _upper_tenth(border) < 128:
        return None
    cell = min(picture.size) // SHADE_GRID
    grid = _array(picture.reduce(cell)).astype(np.float32)
    if not _shadow_crosses(_border(grid)):
        return None
    for axis in (1, 0):
        grid = _running_median(grid, axis)
    darkest, lightest = float(grid.min()), float(grid.max())
    if lightest - darkest < FLATTEN_TOLERANCE * 255 or darkest < SHADE_DEPTH * lightest:
        return None
    # Light that a quadratic surface follows along the border is no shadow's: that surface.
    rows, columns = grid.shape
    basis = _grid(rows, columns)
    ring = grid.ravel()[basis.ring].astype(np.float64)
    coefficients = basis.on_ring.fit(ring, np.ones(ring.size, bool))
    misfit = np.abs(ring - basis.on_ring.cells @ coefficients)
    tenth = misfit.size - 1 - misfit.size // 10
    if float(np.partition(misfit, tenth)[tenth]) < SHADE_FOLLOWED * lightest:
        return Lighting.of(coefficients, cell, rows, columns, 0.0)
    # A shadow comes from beyond the frame: it is as deep at the frame's edge as anywhere. A
    # dip only inside is a stroke's ink the medians kept, and then no shading is used.
    below = grid - (basis.all.cells @ coefficients).reshape(rows, columns).astype(np.float32)
    if float(_border(below).min()) > 0.5 * float(below.min()):
        return None
    return Shading(grid, cell)


def _shadow_crosses(ring: npt.NDArray[Any]) -> bool:
    """Whether the cells around the border (`_border`, in order) show a shadow crossing it: a
    run of `SHADE_ARC` of them or more, steady, darker than the lightest paper by a tenth or
    more and no darker than `SHADE_DEPTH` of it, and steep climbs or falls (`SHADE_JUMP`) at
    two places at most."""
    lightest = _upper_tenth(ring)
    rises = np.diff(ring, append=ring[:1])  # to the next cell, around the ring
    steps = np.abs(rises)
    # Where the level climbs or falls steeply over one cell or more, around the ring: a
    # shadow crosses the border twice, strokes that cross it twice each.
    steep = np.sign(rises) * (steps > SHADE_JUMP * lightest)
    if np.count_nonzero((steep != 0) & (steep != np.roll(steep, 1))) > 2:
        return False
    steady = (steps <= SHADE_STEADY * lightest) & (np.roll(steps, 1) <= SHADE_STEADY * lightest)
    shaded = steady & (ring <= 0.9 * lightest) & (ring >= SHADE_DEPTH * lightest)
    if shaded.all():
        return False  # the whole border alike: no edge of a shadow
    # The longest run of shaded cells, around the ring: started just after an unshaded one.
    start = int(np.argmin(shaded))
    around = np.concatenate([np.roll(shaded, -start), [False]]).astype(np.int8)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], around])))
    longest = int((edges[1::2] - edges[::2]).max()) if edges.size else 0
    return longest >= SHADE_ARC * ring.size


def _upper_tenth(values: npt.NDArray[Any]) -> float:
    """The level a tenth of `values` reach or pass."""
    tenth = values.size - 1 - values.size // 10
    return float(np.partition(values, tenth)[tenth])


def _running_median(values: FloatImage, axis: int) -> FloatImage:
    """The median of the `SHADE_WINDOW` cells around each along `axis`, the outer cells
    repeated past the edges."""
    half = SHADE_WINDOW // 2
    width = [(0, 0), (0, 0)]
    width[axis] = (half, half)
    windows = np.lib.stride_tricks.sliding_window_view(
        np.pad(values, width, mode="edge"), SHADE_WINDOW, axis=axis
    )
    median: FloatImage = np.partition(windows, half, axis=-1)[..., half]
    return median


_Basis = npt.NDArray[np.float64]

_MAD_SCALE: Final = 1.4826
"""The median absolute deviation of a normal law, times this, is its standard deviation."""


class _Cells(NamedTuple):
    """The quadratic basis over some cells of the lighting grid, ready for least squares."""

    cells: _Basis
    """A row of (1, x, y, x², xy, y²) per cell."""
    across: _Basis
    """The same, transposed (6 x cells), contiguous."""
    products: _Basis
    """Each cell's outer product of its row with itself, flattened (36 x cells)."""

    @classmethod
    def of(cls, cells: _Basis) -> _Cells:
        products = (cells[:, :, np.newaxis] * cells[:, np.newaxis, :]).reshape(len(cells), -1)
        parts = cls(cells, np.ascontiguousarray(cells.T), np.ascontiguousarray(products.T))
        for array in parts:
            array.flags.writeable = False
        return parts

    def fit(self, values: _Basis, chosen: npt.NDArray[np.bool_]) -> _Basis:
        """The coefficients that fit the `chosen` cells' `values` best: the normal equations
        (6 unknowns), summed over the chosen cells by weights of 0 and 1 rather than by
        copying them out (a third of the cost on the grids here)."""
        weights = chosen.astype(np.float64)
        normal = (self.products @ weights).reshape(6, 6)
        return np.asarray(np.linalg.solve(normal, self.across @ (values * weights)), np.float64)


class _Grid(NamedTuple):
    """The lighting grid's basis: over every cell, and over the border ring's cells."""

    all: _Cells
    ring: npt.NDArray[np.bool_]
    """Which cells (in row order) are on the ring."""
    on_ring: _Cells


@functools.lru_cache(maxsize=64)
def _grid(rows: int, cols: int) -> _Grid:
    """The quadratic basis over a rows x cols grid (a row per cell), its border ring, and
    the basis of the ring's cells."""
    y, x = np.mgrid[0:rows, 0:cols]
    ring = np.minimum(np.minimum(y, rows - 1 - y), np.minimum(x, cols - 1 - x)) < FLATTEN_RING
    y, x = y.ravel() / rows - 0.5, x.ravel() / cols - 0.5
    basis = np.stack([np.ones_like(x), x, y, x * x, x * y, y * y], axis=1)
    on_ring = ring.ravel()
    on_ring.flags.writeable = False
    return _Grid(_Cells.of(basis), on_ring, _Cells.of(basis[on_ring]))


def _centre_spread(values: npt.NDArray[np.float64]) -> tuple[float, float]:
    """The median (`_middle`), and the robust standard deviation: the median absolute
    deviation from it, scaled for a normal law."""
    centre = _middle(values)
    return centre, _middle(np.abs(values - centre)) * _MAD_SCALE


def _span(values: npt.NDArray[np.floating[Any]]) -> float:
    """The largest value less the smallest (`np.ptp`, a third cheaper on these few cells)."""
    return float(values.max() - values.min())


def _middle(values: npt.NDArray[Any]) -> float:
    """The median, the upper one of an even count (a partition: a fifth of `np.median`'s
    cost on the few hundred cells it is taken of, many times an image)."""
    half = values.size // 2
    return float(np.partition(values, half)[half])


def _noise_level(pixels: npt.NDArray[np.uint8], border: npt.NDArray[np.uint8]) -> float:
    """The sensor noise's standard deviation, in grey levels, from neighbouring pixels.

    Differences of neighbours along the image's border (`_border`) are mostly paper minus
    paper (the digit reaches the border at a few points at most, and a blurred stroke inside
    the frame is no noise), so their robust spread is the noise's times sqrt(2).
    """
    if min(pixels.shape) < FLATTEN_MIN_SIDE:
        return 0.0
    differences = np.abs(np.diff(border.astype(np.int16)))
    return _middle(differences) * _MAD_SCALE / float(np.sqrt(2))


def _despeckle(ink: FloatImage) -> FloatImage:
    """Drop ink pixels with no inked neighbour: sensor speckle, not strokes (in place)."""
    # Paper (0) stays paper whatever its neighbours: only the count decides.
    return np.multiply(ink, _around(ink > 0) >= 2, out=ink)


def _neighboured(inked: npt.NDArray[np.bool_]) -> npt.NDArray[np.bool_]:
    """The inked pixels that have an inked neighbour (of 8); all of them in an image under 3
    px across."""
    kept: npt.NDArray[np.bool_] = inked & (_around(inked) >= 2)
    return kept


def _around(inked: npt.NDArray[np.bool_]) -> npt.NDArray[np.uint8]:
    """How many pixels of each one's 3x3 neighbourhood (itself too) are inked."""
    if inked.shape[0] < 3 or inked.shape[1] < 3:
        return inked.view(np.uint8) * np.uint8(2)  # an image this small is all neighbours
    padded = _padded(inked.view(np.uint8), 1)
    across = padded[:, :-2] + padded[:, 1:-1] + padded[:, 2:]
    around: npt.NDArray[np.uint8] = across[:-2] + across[1:-1] + across[2:]
    return around


def _histogram(pixels: npt.NDArray[np.uint8]) -> npt.NDArray[np.intp]:
    return np.bincount(pixels.ravel(), minlength=256)


def centre_like_mnist(ink: FloatImage) -> FloatImage:
    """Crop to the ink, fit its longer side to 20 px with MNIST-like strokes, centre the mass
    in a 28x28 field."""
    rows, cols = np.nonzero(ink.any(axis=1))[0], np.nonzero(ink.any(axis=0))[0]
    if rows.size == 0:
        raise BlankImageError("image has no ink")
    crop = ink[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]
    patch = _saturate(_fit(crop, DIGIT_BOX))
    width = stroke_width(patch)
    if width < STROKE_THIN:
        # A thin pen: widen the strokes to MNIST's, in a box that leaves room for the growth.
        # Saturated before the widening, not after: saturating again would lift the partly
        # inked rim that `_thicken` blends in to full ink, and overshoot the width.
        grow = STROKE_TARGET - width
        patch = _thicken(_saturate(_fit(crop, DIGIT_BOX - 2 * _dilations(grow))), grow)

    total = float(patch.sum())
    centre_y = float(patch.sum(axis=1) @ _POSITIONS[: patch.shape[0]]) / total
    centre_x = float(patch.sum(axis=0) @ _POSITIONS[: patch.shape[1]]) / total
    # Shift by the rounded centre of mass, as MNIST did, clamped so no ink leaves the field.
    top = min(max(round(CENTRE - centre_y), 0), IMAGE_SIZE - patch.shape[0])
    left = min(max(round(CENTRE - centre_x), 0), IMAGE_SIZE - patch.shape[1])
    field = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    field[top : top + patch.shape[0], left : left + patch.shape[1]] = patch
    return field


_POSITIONS: Final = np.arange(IMAGE_SIZE, dtype=np.float64)
"""Pixel indices along a side of the field (for the centre of mass)."""
_POSITIONS.flags.writeable = False


def _fit(crop: FloatImage, box: int) -> FloatImage:
    """Anti-aliased resize of the crop so its longer side is `box` px, aspect kept: Pillow's
    `RESAMPLE`, as two matrix products (a tenth of the cost of a round trip through Pillow
    on the small crops here, and equal to its result within a float32 rounding)."""
    height, width = crop.shape
    scale = box / max(height, width)
    rows, cols = max(1, round(height * scale)), max(1, round(width * scale))
    resized = crop
    if cols != width:  # Pillow's order: across first
        resized = resized @ _resize_weights(width, cols).T
    if rows != height:
        resized = _resize_weights(height, rows) @ resized
    return resized


@functools.lru_cache(maxsize=1024)
def _resize_weights(size: int, out: int) -> FloatImage:
    """Pillow's bilinear resampling of `size` px to `out` px as a matrix [out, size]: a
    triangle filter around each output pixel's centre, widened by the scale when shrinking,
    cut to Pillow's window and normalised (Pillow's ``precompute_coeffs``)."""
    scale = size / out
    support = max(scale, 1.0)
    centres = (np.arange(out) + 0.5) * scale
    first = np.maximum((centres - support + 0.5).astype(np.int64), 0)  # C's (int) truncation
    last = np.minimum((centres + support + 0.5).astype(np.int64), size)
    x = np.arange(size)
    taps = 1 - np.abs((x[np.newaxis] - centres[:, np.newaxis] + 0.5) * (1 / support))
    window = (x[np.newaxis] >= first[:, np.newaxis]) & (x[np.newaxis] < last[:, np.newaxis])
    weights: npt.NDArray[np.float64] = np.where(window, np.maximum(taps, 0), 0)
    totals = weights.sum(axis=1, keepdims=True)
    np.divide(weights, totals, out=weights, where=totals != 0)
    single = weights.astype(np.float32)  # computed as Pillow does, applied in float32
    single.flags.writeable = False
    return single


def _saturate(patch: FloatImage) -> FloatImage:
    """Scale ink so its median is full intensity, like MNIST's saturated strokes (the median
    ink pixel of a test digit is 0.97), while a thin pen drawn large averages down to a faint
    ghost."""
    strongest = float(patch.max())
    if strongest <= 0:
        raise BlankImageError("image has no ink")
    level = _median(patch[patch > strongest * NOISE_FLOOR])
    saturated: FloatImage = patch / np.float32(level)
    return np.minimum(saturated, 1, out=saturated)  # the resize's ink is never negative


def stroke_width(patch: FloatImage) -> float:
    """Mean stroke width in px: twice the ink's area over the perimeter of its core."""
    core = patch > 0.5
    # Each core pixel has 4 sides; a side shared with a core neighbour is no perimeter.
    shared = np.count_nonzero(core[1:] & core[:-1]) + np.count_nonzero(core[:, 1:] & core[:, :-1])
    perimeter = 4 * np.count_nonzero(core) - 2 * shared
    return 2 * float(patch.sum()) / float(max(int(perimeter), 1))


def _thicken(patch: FloatImage, grow: float) -> FloatImage:
    """Widen strokes by `grow` px: 3x3 dilations (2 px each), the last one blended in part."""
    steps = _dilations(grow)
    padded = _padded(patch, steps)
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
    """3x3 grey-level dilation (maximum over each pixel's neighbourhood, the frame beyond the
    image taken as 0): across each row, then down each column (4 maxima, not 9)."""
    padded = _padded(image, 1)
    across = np.maximum(padded[:, :-2], padded[:, 1:-1])
    np.maximum(across, padded[:, 2:], out=across)
    out: FloatImage = np.maximum(across[:-2], across[1:-1])
    return np.maximum(out, across[2:], out=out)


def _median(values: FloatImage) -> float:
    """The median of a non-empty array, as `np.median` gives it, by sorting (on the few
    hundred values it is taken of, cheaper than `np.median` or a partition)."""
    ordered = np.sort(values, axis=None)
    half = ordered.size // 2
    if ordered.size % 2:
        return float(ordered[half])
    return (float(ordered[half - 1]) + float(ordered[half])) / 2


_Array = TypeVar("_Array", bound=np.ndarray[Any, Any])


def _padded(image: _Array, width: int) -> _Array:
    """`image` in a frame of zeros `width` deep (`np.pad`'s result, at a fifth of its cost)."""
    height, across = image.shape
    out = np.zeros((height + 2 * width, across + 2 * width), image.dtype)
    out[width : width + height, width : width + across] = image
    return out  # type: ignore[return-value]


def _image(array: npt.NDArray[np.uint8] | FloatImage) -> Image.Image:
    """A C-contiguous 8-bit or float32 HxW array as a Pillow image of mode L or F, sharing its
    memory (`Image.fromarray` costs twice as much on the small images here)."""
    mode = "F" if array.dtype == np.float32 else "L"
    height, width = array.shape
    return Image.frombuffer(mode, (width, height), np.ascontiguousarray(array), "raw", mode, 0, 1)


def _array(image: Image.Image) -> Any:
    """A Pillow image of mode L or F as a read-only uint8 or float32 HxW array (a copy of its
    pixels: `np.asarray` costs twice as much on the small images here)."""
    dtype = np.float32 if image.mode == "F" else np.uint8
    return np.frombuffer(image.tobytes(), dtype).reshape(image.height, image.width)
