"""What the load sends: the digits 0-9 drawn in MNIST form, or image files sent as they are."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image, ImageDraw, ImageFont

from ..constants import IMAGE_SIZE
from ..errors import ConfigError

MAX_IMAGE_FILES = 10_000

_DIGIT_FONT_SIZE = 80
_DIGIT_BOX = 20  # MNIST digits fit a 20x20 box, centred by centre of mass in 28x28


@dataclass(frozen=True, slots=True)
class Payload:
    """One image the load sends: its request bytes, a name, and the digit it shows if known."""

    data: bytes
    name: str
    expected: int | None = None


def generated_digits(*, raw: bool = False) -> tuple[Payload, ...]:
    """The digits 0-9 drawn with Pillow's default font in MNIST form, as PNG files or raw bytes."""
    font = ImageFont.load_default(size=_DIGIT_FONT_SIZE)
    payloads = []
    for digit in range(10):
        pixels = _draw_digit(str(digit), font)
        if raw:
            data = pixels.tobytes()
        else:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            data = buffer.getvalue()
        payloads.append(Payload(data, f"digit-{digit}", expected=digit))
    return tuple(payloads)


def _draw_digit(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> npt.NDArray[np.uint8]:
    """White ink on black, scaled to fit 20x20 and centred by centre of mass in 28x28."""
    canvas = Image.new("L", (2 * _DIGIT_FONT_SIZE, 2 * _DIGIT_FONT_SIZE), 0)
    ImageDraw.Draw(canvas).text((_DIGIT_FONT_SIZE // 2, _DIGIT_FONT_SIZE // 4), text, 255, font)
    glyph = canvas.crop(canvas.getbbox())
    scale = _DIGIT_BOX / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    ink = np.asarray(glyph, dtype=np.float64)
    rows, cols = np.indices(ink.shape)
    centre_row = float((rows * ink).sum() / ink.sum())
    centre_col = float((cols * ink).sum() / ink.sum())
    digit = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    digit.paste(glyph, (round(IMAGE_SIZE / 2 - centre_col), round(IMAGE_SIZE / 2 - centre_row)))
    return np.asarray(digit, dtype=np.uint8)


def load_images(paths: Iterable[Path]) -> tuple[Payload, ...]:
    """Files sent as they are; a directory contributes its files (not recursively), sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"no such file or directory: {path}")
        if len(files) > MAX_IMAGE_FILES:
            raise ConfigError(f"more than {MAX_IMAGE_FILES} image files; pass fewer")
    if not files:
        raise ConfigError("no image files found")
    return tuple(Payload(path.read_bytes(), str(path)) for path in files)
