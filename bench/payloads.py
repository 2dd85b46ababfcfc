"""What the bench sends: real MNIST test digits as request data of several kinds.

    raw          784 raw bytes                     MNIST format: no preprocessing to do
    mnist-png    28x28 grey PNG, white on black    MNIST format, as a file
    noisy-28     28x28 grey PNG, faint noise       not MNIST format (no pixel is 0)
    inverted-28  28x28 grey PNG, black on white    not MNIST format
    canvas-280   280x280 RGBA PNG of a canvas      black strokes, ink only in the alpha channel,
                                                   encoded as Chromium's canvas export is
    photo-1024   1024x768 RGB JPEG "phone photo"   digit ~300 px on paper, uneven light, noise

The first two are what MNIST clients send; the others are what users send (drawings, crops,
photos). Every file is made from a real test digit, deterministically: the random parts are
seeded by (kind, image index). `verify` checks that a file has the properties its kind
promises (the bench runs it on every file it makes), since a kind that quietly became MNIST
format would measure the wrong thing.
"""

from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
import numpy.typing as npt
from PIL import Image

from export.robustness import encode, lighting, noise, paint, pen, to_image
from mnist_service.engine import png
from mnist_service.engine.preprocess import is_mnist_format

Digit = np.ndarray[Any, np.dtype[np.uint8]]
"""One MNIST test digit: uint8 [28, 28], white ink on black."""

SEED: Final = 20_240_917
NOISE_LEVELS: Final = (1, 12)
"""noisy-28: grey levels added to the black background, uniform and inclusive; 1, not 0, so
no pixel stays black and the server cannot take the file for MNIST format."""
CANVAS_SIDE: Final = 280
CANVAS_PEN: Final = 18
"""px: a drawing app's line width on a 280 px canvas (MNIST demos use 15-20)."""
PHOTO_SIZE: Final = (1024, 768)
PHOTO_DIGIT: Final = 420
"""px side of the drawing: MNIST's digit fills 20 of its 28 px, so the digit is 300 px tall."""
PHOTO_PEN: Final = 12
PHOTO_PAPER: Final = (238, 234, 224)
PHOTO_INK: Final = (35, 35, 42)
PHOTO_DARKEST: Final = 0.6  # the light falls to 60% across the page
PHOTO_NOISE: Final = 6.0  # grey levels, per channel
PHOTO_QUALITY: Final = 85
PHOTO_WANDER: Final = 80  # px the digit may sit off the page's centre


def _raw(digit: Digit, rng: np.random.Generator) -> bytes:
    return digit.tobytes()


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")  # Pillow's default compression, as most encoders use
    return buffer.getvalue()


def _mnist_png(digit: Digit, rng: np.random.Generator) -> bytes:
    return _png(Image.fromarray(digit))


def _noisy(digit: Digit, rng: np.random.Generator) -> bytes:
    low, high = NOISE_LEVELS
    speckle = rng.integers(low, high + 1, digit.shape, dtype=np.uint8)
    return _png(Image.fromarray(np.where(digit == 0, speckle, digit)))


def _inverted(digit: Digit, rng: np.random.Generator) -> bytes:
    return _png(Image.fromarray(255 - digit))


def _canvas(digit: Digit, rng: np.random.Generator) -> bytes:
    ink = pen(digit, CANVAS_SIDE, CANVAS_PEN)
    rgba = np.zeros((*ink.shape, 4), np.float32)
    rgba[..., 3] = ink * 255  # black strokes on a transparent canvas: only alpha carries them
    return _browser_png(np.asarray(to_image(rgba, "RGBA")))


def _browser_png(rgba: npt.NDArray[np.uint8]) -> bytes:
    """An RGBA image as a browser's canvas export (`toDataURL("image/png")`) writes it:
    Chromium's filter every row Up and deflate fast (level 1 comes within 5 % of its size),
    where Pillow picks a filter per row and deflates harder. The difference matters: Pillow's
    zlib inflates Pillow's own file of a canvas about three times slower."""
    height, width, _ = rgba.shape
    rows = rgba.reshape(height, width * 4)
    filtered = np.empty((height, 1 + width * 4), np.uint8)
    filtered[:, 0] = 2  # Up: each byte less the one above it
    filtered[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=filtered[1:, 1:])  # wraps, as PNG's filters do
    header = struct.pack(">IIBBBBB", width, height, 8, 6, 0, 0, 0)
    return b"".join(
        [
            png.SIGNATURE,
            _chunk(b"IHDR", header),
            _chunk(b"IDAT", zlib.compress(filtered.tobytes(), 1)),
            _chunk(b"IEND", b""),
        ]
    )


def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _photo(digit: Digit, rng: np.random.Generator) -> bytes:
    width, height = PHOTO_SIZE
    top, left = (
        (side - PHOTO_DIGIT) // 2 + int(rng.integers(-PHOTO_WANDER, PHOTO_WANDER + 1))
        for side in (height, width)
    )
    drawn = paint(pen(digit, PHOTO_DIGIT, PHOTO_PEN), PHOTO_SIZE, (top, left), PHOTO_PAPER,
                  PHOTO_INK)  # fmt: skip
    photo = noise(drawn * lighting(PHOTO_SIZE, rng, PHOTO_DARKEST), rng, PHOTO_NOISE)
    return encode(to_image(photo), "JPEG", quality=PHOTO_QUALITY)


@dataclass(frozen=True)
class Kind:
    """One kind of request data and the file it must be (None: raw bytes, no file)."""

    name: str
    description: str
    render: Callable[[Digit, np.random.Generator], bytes]
    file: tuple[str, str, tuple[int, int]] | None
    """(Pillow format, mode, size) of the file."""
    mnist_format: bool
    """Whether the server sees MNIST input (`is_mnist_format`), which skips preprocessing."""


_28_GREY: Final = ("PNG", "L", (28, 28))
KINDS: Final = {
    kind.name: kind
    for kind in (
        Kind("raw", "784 raw bytes", _raw, file=None, mnist_format=True),
        Kind("mnist-png", "28x28 grey PNG, MNIST as it is", _mnist_png, _28_GREY, True),
        Kind("noisy-28", "28x28 grey PNG, background noise of 1-12 grey levels", _noisy,
             _28_GREY, mnist_format=False),
        Kind("inverted-28", "28x28 grey PNG, black digit on white", _inverted, _28_GREY,
             mnist_format=False),
        Kind("canvas-280", "280x280 RGBA PNG as a browser exports it: 18 px black strokes,"
             " transparent background",
             _canvas, ("PNG", "RGBA", (CANVAS_SIDE, CANVAS_SIDE)), mnist_format=False),
        Kind("photo-1024", "1024x768 JPEG q85: digit 300 px on paper, uneven light, noise",
             _photo, ("JPEG", "RGB", PHOTO_SIZE), mnist_format=False),
    )
}  # fmt: skip
MNIST_KINDS: Final = tuple(name for name, kind in KINDS.items() if kind.mnist_format)
USER_KINDS: Final = tuple(name for name, kind in KINDS.items() if not kind.mnist_format)


def render(kind: str, digit: Digit, index: int) -> bytes:
    """Test digit number `index` as request data of `kind`; the same bytes on every call."""
    position = list(KINDS).index(kind)
    return KINDS[kind].render(digit, np.random.default_rng([SEED, position, index]))


def mixed(kinds: Sequence[str], digits: Iterable[Digit]) -> list[bytes]:
    """One item per digit, cycling through `kinds` (digit i as kind i mod len(kinds))."""
    return [render(kinds[i % len(kinds)], digit, i) for i, digit in enumerate(digits)]


def problems(kind: str, data: bytes) -> list[str]:
    """How `data` falls short of what `kind` promises; empty when it is as intended."""
    spec = KINDS[kind]
    if spec.file is None:
        return [] if len(data) == 28 * 28 else [f"{kind}: {len(data)} bytes, not 784"]
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except Exception as exc:  # Pillow raises many types; any of them means "not a file"
        return [f"{kind}: Pillow cannot decode it ({exc})"]
    found: list[str] = []
    made = (image.format, image.mode, image.size)
    if made != spec.file:
        found.append(f"{kind}: format, mode, size {made}, expected {spec.file}")
    if is_mnist_format(image) != spec.mnist_format:
        found.append(f"{kind}: is_mnist_format says {not spec.mnist_format}")
    if image.mode == "RGBA":
        pixels = np.asarray(image)
        if pixels[..., :3].any() or not pixels[..., 3].any():
            found.append(f"{kind}: the ink is not only in the alpha channel")
    return found


def verify(kind: str, data: bytes) -> bytes:
    """`data`, after checking it is what `kind` promises (ValueError otherwise)."""
    found = problems(kind, data)
    if found:
        raise ValueError("; ".join(found))
    return data
