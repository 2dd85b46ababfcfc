"""The robustness report: MNIST's test digits drawn the ways people make digits, classified.

Each `Variant` renders a real MNIST test digit as an image file someone could send: drawn with
a pen from a hairline to a fat marker, dark on light or light on dark, on a transparent canvas,
photographed on unevenly lit paper, saved as a poor JPEG, rotated by EXIF... The bytes then go
through the exact serving preprocessing (`mnist_service.engine.preprocess.prepare`) and the
model, over the same shifted views as the server (`mnist_service.engine.views`), or through a
running server, and the report gives the accuracy of each variant next to plain MNIST.
Rendering is seeded per (variant, image), so a subset is the full run's prefix. Each row keeps
whether each classifier read each image right, so a model can be compared with a baseline
(`export.baseline`) on the same drawings, pair by pair (`compare`).

Pens are drawn along the digit's centre line: the MNIST digit is upscaled 4x, smoothed and
thinned to one pixel (Zhang-Suen), keeping the loops the writer left visible or inked in solid
and the strokes the writer pressed only lightly, and the line is drawn again at the drawing's
size with a round pen of the wanted width, by the same functions training draws its pen digits
with (`training.strokes.centre_lines` and `draw`); markers use MNIST's own strokes, upscaled.
"""

from __future__ import annotations

import asyncio
import functools
import io
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFilter

from mnist_service.constants import IMAGE_SIZE
from mnist_service.engine.preprocess import Prepared, open_image, prepare, scale_pixels
from mnist_service.engine.views import cascaded, expand, unshifted
from mnist_service.errors import InvalidImageError
from training.strokes import centre_lines, draw

log = logging.getLogger(__name__)

Digit = npt.NDArray[np.uint8]
"""One MNIST test digit: uint8 [28, 28], white ink on black."""
Ink = npt.NDArray[np.float32]
"""Ink coverage of a drawing, float32 HxW in [0, 1]."""
Rng = np.random.Generator
Render = Callable[[Digit, Rng], bytes]

MAX_PIXELS: Final = 16_777_216
"""The server's default pixel limit; every rendering stays below it."""

FAILED: Final = -1
"""The prediction recorded when an image is refused (no ink found, say): always wrong."""

WHITE: Final = (255, 255, 255)


# --- drawing ----------------------------------------------------------------------------------


def centre_line(digit: Digit) -> npt.NDArray[np.bool_]:
    """The digit's strokes thinned to a one-pixel centre line (Zhang-Suen), at 4x28 px: the
    same line training redraws its pen digits from (`training.strokes`)."""
    return _centre_line(digit.tobytes()).copy()


@functools.lru_cache(maxsize=1024)  # the pen variants of one digit share its centre line
def _centre_line(pixels: bytes) -> npt.NDArray[np.bool_]:
    digit = np.frombuffer(pixels, np.uint8).reshape(1, IMAGE_SIZE, IMAGE_SIZE)
    line: npt.NDArray[np.bool_] = centre_lines(digit)[0]
    return line


def pen(digit: Digit, side: int, width: int, *, smooth: bool = True) -> Ink:
    """The digit redrawn at side x side along its centre line with a round pen `width` px wide."""
    return draw(centre_line(digit), side, width, smooth=smooth)


def marker(digit: Digit, side: int, *, fatter: int = 0) -> Ink:
    """The digit with its own strokes (an MNIST stroke is a marker's), thickened at 28x28."""
    image = Image.fromarray(digit)
    for _ in range(fatter):
        image = image.filter(ImageFilter.MaxFilter(3))
    big = image.resize((side, side), Image.Resampling.BICUBIC)
    return scale_pixels(np.asarray(big))


def paint(
    ink: Ink,
    canvas: tuple[int, int],
    at: tuple[int, int],
    paper: tuple[int, int, int] | npt.NDArray[np.float32],
    colour: tuple[int, int, int],
) -> npt.NDArray[np.float32]:
    """Lay ink of a colour on paper (a colour, or an RGB float image of the canvas's size)."""
    width, height = canvas
    if isinstance(paper, tuple):
        base = np.empty((height, width, 3), np.float32)
        base[...] = paper
    else:
        base = paper.copy()
    top, left = at
    window = base[top : top + ink.shape[0], left : left + ink.shape[1]]
    cover = ink[..., np.newaxis]
    window[...] = window * (1 - cover) + np.asarray(colour, np.float32) * cover
    return base


def lighting(canvas: tuple[int, int], rng: Rng, darkest: float) -> npt.NDArray[np.float32]:
    """A photo's uneven light: a linear gradient in a random direction and a vignette, 0-1."""
    width, height = canvas
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    y, x = y / height - 0.5, x / width - 0.5
    angle = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(angle) * x + np.sin(angle) * y) + 0.5  # 0..1 across the page, roughly
    vignette = (x**2 + y**2) * 0.8
    light: npt.NDArray[np.float32] = 1 - (1 - darkest) * np.clip(ramp * 0.7 + vignette, 0, 1)
    return light.astype(np.float32)[..., np.newaxis]


def noise(image: npt.NDArray[np.float32], rng: Rng, sigma: float) -> npt.NDArray[np.float32]:
    """Sensor noise: Gaussian, per channel."""
    return image + rng.normal(0, sigma, image.shape).astype(np.float32)


def to_image(pixels: npt.NDArray[np.float32], mode: str = "RGB") -> Image.Image:
    """Float pixels (0-255) as an 8-bit image, converted to `mode`."""
    image = Image.fromarray(np.clip(np.rint(pixels), 0, 255).astype(np.uint8))
    return image if image.mode == mode else image.convert(mode)


def encode(image: Image.Image, fmt: str, **params: Any) -> bytes:
    """The image file's bytes (PNGs with fast compression: the pixels are the same)."""
    if fmt == "PNG":
        params.setdefault("compress_level", 1)
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def _place(rng: Rng, canvas: tuple[int, int], side: int) -> tuple[int, int]:
    """A random (top, left) that keeps a side x side drawing inside the canvas."""
    width, height = canvas
    return int(rng.integers(0, height - side + 1)), int(rng.integers(0, width - side + 1))


def _on_paper(
    ink: Ink, rng: Rng, canvas: tuple[int, int], colour: tuple[int, int, int] = (0, 0, 0)
) -> npt.NDArray[np.float32]:
    return paint(ink, canvas, _place(rng, canvas, ink.shape[0]), WHITE, colour)


# --- the variants -----------------------------------------------------------------------------


def _mnist(digit: Digit, rng: Rng) -> bytes:
    return digit.tobytes()


def _inverted_small(digit: Digit, rng: Rng) -> bytes:
    return encode(Image.fromarray(255 - digit), "PNG")


def _hairline(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 280, 1, smooth=False)
    return encode(to_image(_on_paper(ink, rng, (400, 360)), "L"), "PNG")


def _fine_pen(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 240, 2)
    return encode(to_image(_on_paper(ink, rng, (360, 300))), "PNG")


def _ballpoint(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 300, 4)
    return encode(to_image(_on_paper(ink, rng, (420, 380), (20, 40, 150))), "PNG")


def _felt_tip(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 200, 9)
    return encode(to_image(_on_paper(ink, rng, (320, 260))), "PNG")


def _marker(digit: Digit, rng: Rng) -> bytes:
    ink = marker(digit, 252)
    return encode(to_image(_on_paper(ink, rng, (300, 300))), "PNG")


def _fat_marker(digit: Digit, rng: Rng) -> bytes:
    ink = marker(digit, 252, fatter=1)
    return encode(to_image(_on_paper(ink, rng, (300, 300))), "PNG")


def _chalkboard(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 240, 6)
    canvas = (360, 300)
    board = paint(ink, canvas, _place(rng, canvas, 240), (40, 62, 48), (235, 235, 225))
    return encode(to_image(noise(board, rng, 5.0)), "JPEG", quality=85)


def _canvas_black(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 256, 5)
    rgba = np.zeros((*ink.shape, 4), np.float32)
    rgba[..., 3] = ink * 255  # black strokes on a transparent canvas: only alpha carries them
    return encode(to_image(rgba, "RGBA"), "PNG")


def _canvas_white(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 192, 3)
    rgba = np.full((*ink.shape, 4), 255, np.float32)
    rgba[..., 3] = ink * 255
    return encode(to_image(rgba, "RGBA"), "PNG")


def _poor_jpeg(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 200, 3)
    return encode(to_image(_on_paper(ink, rng, (280, 240))), "JPEG", quality=15)


def _pencil_photo(digit: Digit, rng: Rng) -> bytes:
    canvas = (640, 480)
    ink = pen(digit, 300, 4)
    drawn = paint(ink, canvas, _place(rng, canvas, 300), (236, 232, 222), (90, 90, 95))
    photo = noise(drawn * lighting(canvas, rng, 0.55), rng, 6.0)
    return encode(to_image(photo), "JPEG", quality=80)


def _blue_ink_photo(digit: Digit, rng: Rng) -> bytes:
    canvas = (640, 480)
    ink = pen(digit, 260, 3)
    drawn = paint(ink, canvas, _place(rng, canvas, 260), (245, 238, 215), (30, 50, 160))
    photo = noise(drawn * lighting(canvas, rng, 0.6), rng, 8.0)
    return encode(to_image(photo), "JPEG", quality=85)


def _red_marker(digit: Digit, rng: Rng) -> bytes:
    ink = marker(digit, 224)
    return encode(to_image(_on_paper(ink, rng, (280, 280), (200, 20, 30))), "PNG")


def _faint_pencil(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 240, 2)
    drawn = paint(ink, (320, 320), _place(rng, (320, 320), 240), (235, 235, 235), (175, 175, 175))
    return encode(to_image(drawn, "L"), "PNG")


def _off_centre(digit: Digit, rng: Rng) -> bytes:
    canvas = (1600, 1200)
    ink = pen(digit, 220, 4)
    page = np.full(canvas[::-1], 255, np.uint8)  # grey only: a float RGB page is 23 MB
    top, left = _place(rng, canvas, ink.shape[0])
    page[top : top + ink.shape[0], left : left + ink.shape[1]] = np.rint(255 * (1 - ink))
    return encode(Image.fromarray(page), "PNG")


_STORED: Final = {
    3: Image.Transpose.ROTATE_180,
    6: Image.Transpose.ROTATE_90,
    8: Image.Transpose.ROTATE_270,
}
"""How a camera with each EXIF orientation stores an upright scene."""


def _exif_rotated(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 240, 5)
    upright = to_image(_on_paper(ink, rng, (360, 300)))
    # A phone stores the pixels as the sensor saw them and says how to turn them upright.
    orientation = int(rng.choice([3, 6, 8]))
    stored = upright.transpose(_STORED[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(stored, "JPEG", quality=90, exif=exif)


def _thumbnail(digit: Digit, rng: Rng) -> bytes:
    ink = pen(digit, 160, 8)
    drawn = to_image(_on_paper(ink, rng, (200, 200)), "L")
    return encode(drawn.resize((48, 48), Image.Resampling.BILINEAR), "PNG")


def cropped(digit: Digit, margin: int = 0) -> Digit:
    """The digit cut out at its ink's bounding box (the ink touches every edge), plus a
    `margin` of background at 28 px scale."""
    rows, cols = np.nonzero(digit.any(axis=1))[0], np.nonzero(digit.any(axis=0))[0]
    padded = np.pad(digit, margin)
    crop: Digit = padded[rows[0] : rows[-1] + 1 + 2 * margin, cols[0] : cols[-1] + 1 + 2 * margin]
    return crop


_SCALES: Final = (1, 2, 3, 4, 6, 8)
"""How much larger than MNIST's own pixels a tight crop is sent."""

_UPSCALE: Final = (Image.Resampling.BILINEAR, Image.Resampling.BICUBIC)


def _tight(digit: Digit, rng: Rng, *, dark_on_light: bool, fmt: str) -> bytes:
    """Cropped to the ink, at a random scale, in one polarity and one file format."""
    crop = cropped(digit)
    image = Image.fromarray(255 - crop if dark_on_light else crop)
    scale = int(rng.choice(_SCALES))
    image = image.resize((image.width * scale, image.height * scale), Image.Resampling.BICUBIC)
    return encode(image, fmt, **({"quality": 90} if fmt == "JPEG" else {}))


def _thumb(digit: Digit, rng: Rng, *, side: int) -> bytes:
    """Shrunk (aspect kept) so the longer side is `side` px, cropped to the ink or with a
    margin of 1-3 px, then shown at 64-128 px, bilinear or bicubic: a thumbnail blown up."""
    crop = cropped(digit, int(rng.choice((0, 0, 1, 2, 3))))
    height, width = crop.shape
    shrink = side / max(height, width)
    small = Image.fromarray(255 - crop).resize(
        (max(1, round(width * shrink)), max(1, round(height * shrink))),
        Image.Resampling.LANCZOS,
    )
    shown = int(rng.integers(64, 129)) / side
    big = small.resize(
        (max(1, round(small.width * shown)), max(1, round(small.height * shown))),
        _UPSCALE[int(rng.integers(2))],
    )
    return encode(big, "PNG")


def _phone_photo(digit: Digit, rng: Rng) -> bytes:
    """A phone camera's picture: 1024x768 to 1600x1200, a pen digit a fifth to a third of the
    frame tall, uneven light, a slightly soft lens, noise, JPEG."""
    canvas = ((1024, 768), (1280, 960), (1600, 1200))[int(rng.integers(3))]
    side = int(canvas[1] * rng.uniform(0.2, 0.35))
    ink = pen(digit, side, max(2, round(side / 60)))
    drawn = paint(ink, canvas, _place(rng, canvas, side), (238, 234, 226), (35, 35, 45))
    soft = np.asarray(
        to_image(drawn * lighting(canvas, rng, 0.6)).filter(ImageFilter.GaussianBlur(1.2)),
        np.float32,
    )
    return encode(to_image(noise(soft, rng, 5.0)), "JPEG", quality=85)


def shadow(canvas: tuple[int, int], rng: Rng) -> npt.NDArray[np.float32]:
    """A shadow across part of a photo (a hand, a phone): light times 0.45-0.7 beyond an edge
    in a random direction, soft over 1-6 % of the page's diagonal, covering 15-50 % of it."""
    width, height = canvas
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    along = np.cos(angle) * (x - width / 2) + np.sin(angle) * (y - height / 2)
    edge = float(np.quantile(along, 1 - rng.uniform(0.15, 0.5)))  # the shaded share beyond it
    softness = float(np.hypot(width, height) * rng.uniform(0.01, 0.06))
    depth = rng.uniform(0.3, 0.55)
    shade: npt.NDArray[np.float32] = (
        1 - depth / (1 + np.exp(np.clip(-(along - edge) / softness, -50, 50)))
    ).astype(np.float32)
    return shade[..., np.newaxis]


def _shadowed_photo(digit: Digit, rng: Rng) -> bytes:
    """A pen digit photographed on paper with a shadow across part of the page (which may
    cross the digit): 640x480 to 1024x768, uneven light, noise, JPEG."""
    canvas = ((640, 480), (800, 600), (1024, 768))[int(rng.integers(3))]
    side = int(canvas[1] * rng.uniform(0.3, 0.6))
    ink = pen(digit, side, max(2, round(side / 60)))
    drawn = paint(ink, canvas, _place(rng, canvas, side), (240, 236, 228), (30, 30, 40))
    photo = drawn * lighting(canvas, rng, 0.75) * shadow(canvas, rng)
    return encode(to_image(noise(photo, rng, 4.0)), "JPEG", quality=85)


_FIELD_SIDES: Final = (
    ("top", "bottom", "left", "right"),
    ("bottom", "left", "right"),
    ("top", "bottom"),
    ("left", "right"),
    ("bottom", "left"),
)
"""Which lines of a form's field a crop shows: a box, a box open at the top, a line above
and one below, one on each side, a corner of a table."""

_FIELD_LINES: Final = ((0, 0, 0), (70, 70, 70), (40, 60, 150), (120, 120, 120))
_FIELD_PENS: Final = ((10, 10, 10), (20, 30, 110), (30, 30, 30))


def _form_field(digit: Digit, rng: Rng, *, at_edge: bool = False) -> bytes:
    """A digit written in a form's field, cropped with the field's lines: a box half of the
    time, else two or three of its sides (`_FIELD_SIDES`), lines 1-5 px wide in black, grey or
    blue, running across the crop, 1-8 % of it in from its edges; the crop 80-200 px tall and
    up to 1.4 times as wide, the digit 55-80 % of the field clear of its lines, then turned
    by up to 2 degrees, noise, PNG or JPEG. `at_edge`: cropped along the lines, so they are the
    image's edges, and not turned (a form on a screen, or a PDF's)."""
    height = int(rng.integers(80, 201))
    width = int(height * rng.uniform(0.9, 1.4))
    line = max(1, round(height * rng.uniform(0.008, 0.025)))
    top, bottom, left, right = (
        0 if at_edge else round(height * rng.uniform(0.0, 0.08)) + 1 for _ in range(4)
    )
    bottom, right = height - 1 - bottom, width - 1 - right
    paper = (int(rng.integers(235, 256)),) * 3
    field = Image.new("RGB", (width, height), paper)
    draw_lines = ImageDraw.Draw(field)
    colour = _FIELD_LINES[int(rng.integers(len(_FIELD_LINES)))]
    sides = _FIELD_SIDES[0] if rng.random() < 0.5 else _FIELD_SIDES[int(rng.integers(1, 5))]
    lines = {
        "top": (0, top, width - 1, top + line - 1),
        "bottom": (0, bottom - line + 1, width - 1, bottom),
        "left": (left, 0, left + line - 1, height - 1),
        "right": (right - line + 1, 0, right, height - 1),
    }
    for name in sides:
        draw_lines.rectangle(lines[name], fill=colour)
    clear_height, clear_width = bottom - top - 2 * line, right - left - 2 * line
    side = int(min(clear_height, clear_width) * rng.uniform(0.55, 0.8))
    ink = pen(digit, side, max(2, round(side / rng.uniform(18, 40))))
    spare_height, spare_width = clear_height - side, clear_width - side
    at = (
        top + line + int(rng.integers(spare_height // 4, spare_height - spare_height // 4 + 1)),
        left + line + int(rng.integers(spare_width // 4, spare_width - spare_width // 4 + 1)),
    )
    ink_colour = _FIELD_PENS[int(rng.integers(len(_FIELD_PENS)))]
    drawn = paint(ink, (width, height), at, np.asarray(field, np.float32), ink_colour)
    photo = to_image(noise(drawn, rng, float(rng.uniform(0, 4))))
    angle = float(rng.uniform(-2, 2))
    turned = photo if at_edge else photo.rotate(angle, Image.Resampling.BICUBIC, fillcolor=paper)
    if rng.random() < 0.5:
        return encode(turned, "JPEG", quality=int(rng.integers(80, 95)))
    return encode(turned, "PNG")


def _on_ruled_paper(digit: Digit, rng: Rng) -> bytes:
    """A pen digit written on ruled paper and cropped around it with the rules: a crop 64-127 px
    wide, rules 1-3 px wide at grey 90-180 every 20-45 % of the crop, running across it; the
    digit 55-75 % of the crop, its lowest ink on a rule half of the time (else anywhere),
    noise, PNG or JPEG."""
    width = int(rng.integers(64, 128))
    height = int(width * rng.uniform(0.9, 1.3))
    side = int(min(width, height) * rng.uniform(0.55, 0.75))
    spacing = int(height * rng.uniform(0.2, 0.45))
    line = int(rng.integers(1, 4))
    paper = np.full((height, width, 3), float(rng.integers(235, 256)), np.float32)
    first = int(rng.integers(0, spacing))
    rules = list(range(first, height, spacing))
    ink = pen(digit, side, max(2, round(side / rng.uniform(18, 30))))
    rows = np.flatnonzero(ink.max(axis=1) >= 0.5)
    top = int(rng.integers(0, height - side + 1))
    # Written on a rule: the foot (the lowest half-inked row) on it, the drawing in the crop.
    on_rule = [y - int(rows[-1]) for y in rules if 0 <= y - int(rows[-1]) <= height - side]
    if on_rule and rng.random() < 0.5:
        top = on_rule[int(rng.integers(len(on_rule)))]
    shade = float(rng.integers(90, 181))
    for y in rules:
        paper[y : y + line] = shade
    left = int(rng.integers(0, width - side + 1))
    drawn = paint(ink, (width, height), (top, left), paper, (15, 15, 60))
    photo = to_image(noise(drawn, rng, float(rng.uniform(0, 3))))
    if rng.random() < 0.5:
        return encode(photo, "JPEG", quality=int(rng.integers(80, 95)))
    return encode(photo, "PNG")


@dataclass(frozen=True)
class Variant:
    """One way of drawing the test digits."""

    name: str
    description: str
    render: Render


VARIANTS: Final[tuple[Variant, ...]] = (
    Variant("mnist", "plain MNIST: the raw 784 bytes", _mnist),
    Variant("inverted-28px", "28x28 PNG, black ink on white", _inverted_small),
    Variant("hairline-pen", "1 px aliased pen, digit 280 px on a 400x360 grey PNG", _hairline),
    Variant("fine-pen", "2 px anti-aliased pen, digit 240 px, RGB PNG", _fine_pen),
    Variant("ballpoint", "4 px blue ballpoint, digit 300 px, RGB PNG", _ballpoint),
    Variant("felt-tip", "9 px felt tip, digit 200 px", _felt_tip),
    Variant("marker", "MNIST's own strokes at 9x: a broad marker", _marker),
    Variant("fat-marker", "MNIST's strokes thickened by 2 px, then at 9x", _fat_marker),
    Variant("chalkboard", "light on dark: chalk on a green board, noise, JPEG", _chalkboard),
    Variant("canvas-black", "black strokes on a transparent canvas (RGBA PNG)", _canvas_black),
    Variant("canvas-white", "white strokes on a transparent canvas (RGBA PNG)", _canvas_white),
    Variant("jpeg-q15", "3 px pen on white, JPEG quality 15", _poor_jpeg),
    Variant(
        "pencil-photo", "grey pencil, photo: lighting gradient, vignette, noise", _pencil_photo
    ),
    Variant(
        "blue-ink-photo", "blue ink on cream paper, uneven light, noise, JPEG", _blue_ink_photo
    ),
    Variant("red-marker", "red marker on white, RGB PNG", _red_marker),
    Variant("faint-pencil", "low contrast: light grey 2 px pencil on grey paper", _faint_pencil),
    Variant("off-centre", "digit 220 px anywhere on a 1600x1200 page", _off_centre),
    Variant(
        "exif-rotated", "phone JPEG stored sideways or upside down, EXIF orientation", _exif_rotated
    ),
    Variant("thumbnail-48px", "8 px pen drawn at 200 px, shrunk to a 48x48 PNG", _thumbnail),
    Variant(
        "tight-crop",
        "MNIST's digit cropped to its ink, dark on light, x1-x8, PNG",
        functools.partial(_tight, dark_on_light=True, fmt="PNG"),
    ),
    Variant(
        "tight-crop-jpeg",
        "the same, JPEG quality 90",
        functools.partial(_tight, dark_on_light=True, fmt="JPEG"),
    ),
    Variant(
        "tight-crop-light",
        "cropped to its ink, light on dark, x1-x8, PNG",
        functools.partial(_tight, dark_on_light=False, fmt="PNG"),
    ),
    Variant(
        "tight-crop-light-jpeg",
        "the same, JPEG quality 90",
        functools.partial(_tight, dark_on_light=False, fmt="JPEG"),
    ),
    Variant(
        "thumb-16px",
        "cropped (0-3 px margin), shrunk to 16 px, shown at 64-128 px",
        functools.partial(_thumb, side=16),
    ),
    Variant("thumb-12px", "the same at 12 px", functools.partial(_thumb, side=12)),
    Variant("thumb-10px", "the same at 10 px", functools.partial(_thumb, side=10)),
    Variant("thumb-8px", "the same at 8 px", functools.partial(_thumb, side=8)),
    Variant(
        "phone-photo",
        "pen on paper, 1024x768 to 1600x1200 JPEG: light, soft lens, noise",
        _phone_photo,
    ),
    Variant(
        "shadowed-photo",
        "pen on paper, 640x480 to 1024x768 JPEG, a soft-edged shadow across a sixth to half of it",
        _shadowed_photo,
    ),
    Variant(
        "form-field",
        "pen in a form's box (or 2-3 of its lines), 80-200 px crop, turned up to 2 degrees",
        _form_field,
    ),
    Variant(
        "form-field-edge",
        "the same cropped along the lines, not turned: the box is the image's border",
        functools.partial(_form_field, at_edge=True),
    ),
    Variant(
        "ruled-paper",
        "pen on ruled paper, cropped with its rules (64-127 px), on a rule half of the time",
        _on_ruled_paper,
    ),
)


def render(variant: Variant, index: int, digit: Digit, seed: int) -> bytes:
    """The file for one test digit in one variant; seeded by (seed, variant, image index)."""
    position = next(i for i, v in enumerate(VARIANTS) if v.name == variant.name)
    return variant.render(digit, np.random.default_rng([seed, position, index]))


# --- classifying and reporting ----------------------------------------------------------------


Predict = Callable[[list[bytes]], npt.NDArray[np.int64]]
"""Labels [K, N] that K classifiers give a list of N image files (`FAILED` where refused)."""

SERVER_BATCH: Final = 50
"""Images per `PredictBatch` call when the report goes through a server."""


def predict_locally(*sessions: Any, views: Sequence[bool] = (True,)) -> Predict:
    """Classify files with the serving preprocessing (run once) and each onnxruntime session:
    a classifier per session and per entry of `views`: as the server reads them, over the
    shifted views where the image's own reading is unsure (True), or the preprocessed image
    alone (False)."""
    from export.evaluate import onnx_probabilities

    blank = Prepared(np.zeros((1, IMAGE_SIZE, IMAGE_SIZE), np.float32), redrawn=False)

    def run(files: list[bytes]) -> npt.NDArray[np.int64]:
        prepared: list[Prepared] = []
        refused = np.zeros(len(files), bool)
        for index, data in enumerate(files):
            try:
                prepared.append(prepare(open_image(data, MAX_PIXELS)))
            except InvalidImageError:
                prepared.append(blank)
                refused[index] = True
        batch, counts = expand(prepared)
        labels = []
        for session in sessions:
            probabilities = onnx_probabilities(session, batch)
            for shifted in views:
                read = cascaded if shifted else unshifted
                chosen = read(probabilities, counts)
                labels.append(chosen.argmax(axis=1).astype(np.int64))
        out = np.stack(labels)
        out[:, refused] = FAILED
        return out

    return run


async def predict_remotely(address: str, files: Sequence[bytes]) -> npt.NDArray[np.int64]:
    """Classify files through a running server, in `PredictBatch` calls of `SERVER_BATCH`."""
    from mnist_service.client import MnistClient, Prediction

    labels: list[int] = []
    async with MnistClient(address) as client:
        for start in range(0, len(files), SERVER_BATCH):
            results = await client.predict_batch(files[start : start + SERVER_BATCH])
            labels += [r.label if isinstance(r, Prediction) else FAILED for r in results]
    return np.asarray(labels, np.int64)


def predict_through(address: str) -> Predict:
    """`predict_remotely` as a plain function (each call runs its own event loop)."""

    def run(files: list[bytes]) -> npt.NDArray[np.int64]:
        return asyncio.run(predict_remotely(address, files))[np.newaxis]

    return run


@dataclass(frozen=True, eq=False)
class Row:
    """Which of a variant's images each classifier (a model, or a server) got right."""

    variant: Variant
    outcomes: npt.NDArray[np.bool_]
    """[K, N]: whether classifier k read image n right (a refused image is wrong)."""

    @property
    def total(self) -> int:
        """How many images."""
        return int(self.outcomes.shape[1])

    @property
    def correct(self) -> tuple[int, ...]:
        """How many images right, per classifier."""
        return tuple(int(c) for c in self.outcomes.sum(axis=1))

    @property
    def accuracy(self) -> tuple[float, ...]:
        """Fraction right, per classifier."""
        return tuple(c / self.total for c in self.correct)


def run_report(
    classifiers: Sequence[Predict],
    images: npt.NDArray[np.uint8],
    labels: npt.NDArray[np.uint8],
    variants: Sequence[Variant] = VARIANTS,
    *,
    seed: int = 0,
    first: int = 0,
    chunk: int = 250,
) -> list[Row]:
    """Render every image in every variant and score each classifier on the files.

    `first` is the test-set index of ``images[0]`` (the drawings are seeded by it). Chunks of
    images go through every variant in turn, so a digit's centre line is traced once for all
    the pens.
    """
    assert len(images) > 0, "no images"
    outcomes: list[list[npt.NDArray[np.bool_]]] = [[] for _ in variants]
    for start in range(0, len(images), chunk):
        stop = min(start + chunk, len(images))
        for row, variant in enumerate(variants):
            files = [render(variant, first + i, images[i], seed) for i in range(start, stop)]
            predicted = np.concatenate([classify(files) for classify in classifiers])
            outcomes[row].append(predicted == labels[start:stop])
        log.info("robustness: images %d-%d done", first, first + stop - 1)
    return [
        Row(variant, np.concatenate(chunks, axis=1))
        for variant, chunks in zip(variants, outcomes, strict=True)
    ]


def merge(parts: Sequence[Sequence[Row]]) -> list[Row]:
    """Join the rows of reports on consecutive parts of the test set, in order."""
    return [
        Row(rows[0].variant, np.concatenate([r.outcomes for r in rows], axis=1))
        for rows in zip(*parts, strict=True)
    ]


def format_table(columns: Sequence[str], rows: Sequence[Row]) -> str:
    """The report as a Markdown table: a line per variant, a column per classifier."""
    lines = [
        "| variant | " + " | ".join(columns) + " | how the digit is drawn |",
        "|---|" + "---:|" * len(columns) + "---|",
    ]
    for row in rows:
        cells = " | ".join(f"{100 * a:.2f} %" for a in row.accuracy)
        lines.append(f"| `{row.variant.name}` | {cells} | {row.variant.description} |")
    return "\n".join(lines)


REGRESSION_SE: Final = 2.0
"""A row regressed when it fell by more than this many standard errors (and by an image)."""


@dataclass(frozen=True)
class Change:
    """How one classifier's accuracy on a row differs from a baseline's, on the same images."""

    difference: float
    """Accuracy minus the baseline's (a fraction; negative: worse)."""
    standard_error: float
    """Of the difference, from the paired outcomes; 0 when no image changed, NaN when one
    image alone changed (a single pair has no variance to measure)."""
    images: int
    """Images right minus the baseline's."""

    @property
    def regressed(self) -> bool:
        """Whether it fell by at least an image and by more than `REGRESSION_SE` errors."""
        return self.images <= -1 and -self.difference > REGRESSION_SE * self.standard_error


def compare(new: npt.NDArray[np.bool_], base: npt.NDArray[np.bool_]) -> Change:
    """The paired change from `base` to `new`, whether each classifier read each image right.

    With d = new - base per image (-1, 0 or 1), the difference is mean(d) and its standard
    error sqrt(var(d) / n), var the sample variance: only the images the two read differently
    count, so two close classifiers are told apart on far fewer images than two independent
    samples would need.
    """
    if new.shape != base.shape or new.ndim != 1 or new.size == 0:
        raise ValueError(
            f"expected two equal, non-empty 1-D outcomes, got {new.shape}, {base.shape}"
        )
    d = new.astype(np.int64) - base.astype(np.int64)
    if not d.any():
        error = 0.0
    elif d.size < 2:
        error = float("nan")
    else:
        error = float(np.sqrt(d.var(ddof=1) / d.size))
    return Change(float(d.mean()), error, int(d.sum()))


def format_comparison(columns: tuple[str, str], rows: Sequence[Row]) -> str:
    """A report of two classifiers (the model, then its baseline) as a Markdown table: both
    accuracies, the change in percentage points, its standard error, and whether it regressed."""
    lines = [
        f"| variant | {columns[0]} | {columns[1]} | change | standard error | regressed |"
        " how the digit is drawn |",
        "|---|---:|---:|---:|---:|:---:|---|",
    ]
    for row in rows:
        change = compare(row.outcomes[0], row.outcomes[1])
        new, base = row.accuracy
        cells = [
            f"{100 * new:.2f} %",
            f"{100 * base:.2f} %",
            f"{100 * change.difference:+.2f} pp",
            "n/a" if np.isnan(change.standard_error) else f"{100 * change.standard_error:.2f} pp",
            "**yes**" if change.regressed else "no",
        ]
        lines.append(f"| `{row.variant.name}` | {' | '.join(cells)} | {row.variant.description} |")
    return "\n".join(lines)
