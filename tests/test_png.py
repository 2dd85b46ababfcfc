"""The MNIST-format PNG path (`engine.png`): Pillow's pixels exactly, and Pillow's answer for
every file it does not take."""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from mnist_service.engine import preprocess
from mnist_service.engine.png import SIGNATURE, mnist_png_pixels
from mnist_service.engine.preprocess import open_image, prepare

MAX_PIXELS = 16_777_216
Bytes = npt.NDArray[np.uint8]


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(
    width: int = 28, height: int = 28, depth: int = 8, colour: int = 0, lace: int = 0
) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, lace))


def filtered(pixels: Bytes, filters: list[int]) -> bytes:
    """The image data before deflate: each row with its filter byte (PNG's five filters)."""
    out = bytearray()
    previous = np.zeros(pixels.shape[1], np.int64)
    for row, kind in zip(pixels.astype(np.int64), filters, strict=True):
        left = np.concatenate([[0], row[:-1]])
        up_left = np.concatenate([[0], previous[:-1]])
        if kind == 0:
            predicted = np.zeros_like(row)
        elif kind == 1:
            predicted = left
        elif kind == 2:
            predicted = previous
        elif kind == 3:
            predicted = (left + previous) // 2
        else:  # Paeth
            estimate = left + previous - up_left
            a, b, c = (
                np.abs(estimate - left),
                np.abs(estimate - previous),
                np.abs(estimate - up_left),
            )
            predicted = np.where((a <= b) & (a <= c), left, np.where(b <= c, previous, up_left))
        out.append(kind)
        out += ((row - predicted) % 256).astype(np.uint8).tobytes()
        previous = row
    return bytes(out)


def png_file(pixels: Bytes, filters: list[int], splits: int = 1, before: bytes = b"") -> bytes:
    """A 28x28 grey PNG written by hand: the given filters, the data in `splits` IDAT chunks,
    and `before` (whole chunks) between IHDR and the data."""
    data = zlib.compress(filtered(pixels, filters))
    step = -(-len(data) // splits)
    idats = b"".join(chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step))
    return SIGNATURE + ihdr() + before + idats + chunk(b"IEND", b"")


def pillow_pixels(data: bytes) -> Bytes:
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image)


digits_28 = st.lists(st.integers(0, 255), min_size=784, max_size=784).map(
    lambda values: np.array(values, np.uint8).reshape(28, 28)
)
row_filters = st.lists(st.integers(0, 4), min_size=28, max_size=28)


@settings(max_examples=150, deadline=None)
@given(pixels=digits_28, filters=row_filters, splits=st.integers(1, 5))
def test_every_filter_and_split_decodes_to_pillows_pixels(
    pixels: Bytes, filters: list[int], splits: int
) -> None:
    data = png_file(pixels, filters, splits)
    decoded = mnist_png_pixels(data)
    assert decoded is not None
    assert (decoded == pillow_pixels(data)).all()
    assert (decoded == pixels).all()
    assert not decoded.flags.writeable


@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0}])
def test_pillows_own_files_decode_to_its_pixels(
    mnist_test_set: tuple[Bytes, Bytes], options: dict[str, Any]
) -> None:
    for digit in mnist_test_set[0][:40]:
        for pixels in (digit, 255 - digit):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, "PNG", **options)
            decoded = mnist_png_pixels(buffer.getvalue())
            assert decoded is not None
            assert (decoded == pixels).all()


def test_passive_chunks_before_the_data_are_allowed() -> None:
    pixels = np.arange(784, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    extras = chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)) + chunk(b"gAMA", b"\0\0\xb1\x8f")
    decoded = mnist_png_pixels(png_file(pixels, [0] * 28, before=extras))
    assert decoded is not None
    assert (decoded == pixels).all()


PIXELS = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))
PLAIN = png_file(PIXELS, [0, 1, 2, 3, 4] * 5 + [0, 1, 2])
IDAT_AT = PLAIN.index(b"IDAT") - 4
IEND_AT = PLAIN.index(b"IEND") - 4


def refused_files() -> dict[str, bytes]:
    """Files the fast path must leave to Pillow: each one way off its narrow layout."""
    data = zlib.compress(filtered(PIXELS, [0] * 28))
    text = chunk(b"tEXt", b"Comment\0hello")
    return {
        "27 px wide": SIGNATURE + ihdr(width=27) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "16-bit": SIGNATURE + ihdr(depth=16) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "grey and alpha": SIGNATURE + ihdr(colour=4) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "interlaced": SIGNATURE + ihdr(lace=1) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "transparency": PLAIN[:IDAT_AT] + chunk(b"tRNS", b"\0\0") + PLAIN[IDAT_AT:],
        "text before the data": PLAIN[:IDAT_AT] + text + PLAIN[IDAT_AT:],
        "text after the data": PLAIN[:IEND_AT] + text + PLAIN[IEND_AT:],
        "exif": PLAIN[:IDAT_AT] + chunk(b"eXIf", b"MM\0*") + PLAIN[IDAT_AT:],
        "a second IHDR": PLAIN[:IDAT_AT] + ihdr() + PLAIN[IDAT_AT:],
        "no IEND": PLAIN[:IEND_AT],
        "no image data": PLAIN[:IDAT_AT] + chunk(b"IEND", b""),
        "bad IHDR CRC": PLAIN[:29] + bytes([PLAIN[29] ^ 1]) + PLAIN[30:],
        "bad IDAT CRC": PLAIN[: IEND_AT - 1] + bytes([PLAIN[IEND_AT - 1] ^ 1]) + PLAIN[IEND_AT:],
        "corrupt deflate": SIGNATURE + ihdr() + chunk(b"IDAT", b"\x78\x9c\xff\xff")
        + chunk(b"IEND", b""),
        "too little data": SIGNATURE + ihdr() + chunk(b"IDAT", zlib.compress(bytes(29 * 27)))
        + chunk(b"IEND", b""),
        "not a PNG": b"GIF89a" + PLAIN[6:],
        "filter type 5": SIGNATURE + ihdr() + chunk(b"IDAT", zlib.compress(b"\5" * 812))
        + chunk(b"IEND", b""),
        "data after the stream": SIGNATURE + ihdr() + chunk(b"IDAT", data + b"\0")
        + chunk(b"IEND", b""),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(refused_files()))
def test_anything_else_is_left_to_pillow(name: str) -> None:
    assert mnist_png_pixels(refused_files()[name]) is None


def outcome(data: bytes, max_pixels: int = MAX_PIXELS) -> Any:
    """What the server's preprocessing makes of a file: its model input and whether it was
    redrawn, or its error's type and message."""
    try:
        prepared = prepare(open_image(data, max_pixels))
    except Exception as exc:
        return type(exc), str(exc)
    return prepared.image.tobytes(), prepared.redrawn


@pytest.fixture
def without_fast_path(monkeypatch: pytest.MonkeyPatch) -> Any:
    def pillow_only(data: bytes, max_pixels: int = MAX_PIXELS) -> Any:
        with monkeypatch.context() as patch:
            patch.setattr(preprocess, "mnist_png_pixels", lambda data: None)
            return outcome(data, max_pixels)

    return pillow_only


def test_refused_files_get_pillows_answer(without_fast_path: Any) -> None:
    for name, data in refused_files().items():
        assert outcome(data) == without_fast_path(data), name


@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    cut=st.integers(0, len(PLAIN)),
    flip=st.one_of(st.none(), st.integers(0, len(PLAIN) - 1)),
    tail=st.binary(max_size=8),
)
def test_damaged_files_get_the_answer_pillow_gives(
    without_fast_path: Any, cut: int, flip: int | None, tail: bytes
) -> None:
    """Cut short, a byte flipped, bytes appended: with the fast path or without, the same
    model input or the same error."""
    data = bytearray(PLAIN[:cut] + tail)
    if flip is not None and flip < len(data):
        data[flip] ^= 0x40
    assert outcome(bytes(data)) == without_fast_path(bytes(data))


def test_mnist_pngs_take_the_fast_path_with_the_same_outcome(
    mnist_test_set: tuple[Bytes, Bytes], without_fast_path: Any
) -> None:
    for digit in mnist_test_set[0][:20]:
        for pixels in (digit, 255 - digit, np.clip(digit.astype(int) + 9, 0, 255)):
            buffer = io.BytesIO()
            Image.fromarray(pixels.astype(np.uint8)).save(buffer, "PNG")
            data = buffer.getvalue()
            assert isinstance(open_image(data, MAX_PIXELS), np.ndarray)
            assert outcome(data) == without_fast_path(data)


def test_the_pixel_limit_still_applies(without_fast_path: Any) -> None:
    refused = outcome(PLAIN, max_pixels=700)
    assert refused == without_fast_path(PLAIN, 700)
    assert refused[0].__name__ == "ImageTooLargeError"
