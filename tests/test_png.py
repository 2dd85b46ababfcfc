"""Plain PNGs (`engine.png`): inflated by zlib-ng, unfiltered by Pillow, so Pillow's pixels
exactly (and a transparent canvas's alpha alone); Pillow's answer for every file not taken."""

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
from PIL import Image, PngImagePlugin

from bench import payloads
from mnist_service.engine import png
from mnist_service.engine.png import SIGNATURE
from mnist_service.engine.preprocess import open_image, prepare

MAX_PIXELS = 16_777_216
Bytes = npt.NDArray[np.uint8]
MODES = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
"""Pillow's mode -> PNG colour type, samples per pixel."""


def chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def ihdr(
    width: int = 28, height: int = 28, depth: int = 8, colour: int = 0, lace: int = 0
) -> bytes:
    return chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, lace))


def filtered(pixels: Bytes, filters: list[int], channels: int = 1) -> bytes:
    """The image data before deflate: each row with its filter byte (PNG's five filters, each
    predicting a byte from the same channel of the pixels left, above and above-left)."""
    rows = pixels.reshape(len(pixels), -1).astype(np.int64)
    out = bytearray()
    previous = np.zeros(rows.shape[1], np.int64)
    pad = np.zeros(channels, np.int64)
    for row, kind in zip(rows, filters, strict=True):
        left = np.concatenate([pad, row[:-channels]])
        up_left = np.concatenate([pad, previous[:-channels]])
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


def png_file(
    pixels: Bytes, filters: list[int], splits: int = 1, before: bytes = b"", mode: str = "L"
) -> bytes:
    """A PNG written by hand: `pixels` [height, width(, channels)] in `mode`, the given filters,
    the data in `splits` IDAT chunks, and `before` (whole chunks) between IHDR and the data."""
    colour, channels = MODES[mode]
    data = zlib.compress(filtered(pixels, filters, channels))
    step = -(-len(data) // splits)
    idats = b"".join(chunk(b"IDAT", data[i : i + step]) for i in range(0, len(data), step))
    height, width = pixels.shape[:2]
    return SIGNATURE + ihdr(width, height, colour=colour) + before + idats + chunk(b"IEND", b"")


def decoded(data: bytes, alpha: bool = False) -> Bytes | None:
    """The pixels `engine.png` decodes, or None where it leaves the file to Pillow."""
    file = png.read(data)
    if file is None:
        return None
    image = png.decode(file, alpha_only=(lambda _: True) if alpha else None)
    return None if image is None else np.asarray(image)


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
    opened = open_image(data, MAX_PIXELS)  # a 28x28 grey PNG: decoded at once
    assert isinstance(opened, np.ndarray)
    assert (opened == pillow_pixels(data)).all()
    assert (opened == pixels).all()
    assert not opened.flags.writeable


@st.composite
def images(draw: st.DrawFn) -> tuple[Bytes, str, list[int]]:
    """Random pixels of a random size and mode, and a random filter for each row."""
    mode = draw(st.sampled_from(list(MODES)))
    height, width = draw(st.integers(1, 24)), draw(st.integers(1, 24))
    channels = MODES[mode][1]
    seed = draw(st.integers(0, 2**32 - 1))
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, channels), np.uint8)
    if draw(st.booleans()):  # runs of equal pixels, as drawings have
        pixels[:, : width // 2] = pixels[0, 0]
    filters = draw(st.lists(st.integers(0, 4), min_size=height, max_size=height))
    return pixels.squeeze(-1) if channels == 1 else pixels, mode, filters


@settings(max_examples=200, deadline=None)
@given(image=images(), splits=st.integers(1, 4))
def test_every_mode_size_and_filter_decodes_to_pillows_pixels(
    image: tuple[Bytes, str, list[int]], splits: int
) -> None:
    pixels, mode, filters = image
    data = png_file(pixels, filters, splits, mode=mode)
    whole = decoded(data)
    assert whole is not None
    assert (whole == pillow_pixels(data)).all()
    assert (whole == pixels).all()
    if mode in ("LA", "RGBA"):  # the alpha alone, unfiltered on its own
        alpha = decoded(data, alpha=True)
        assert alpha is not None
        assert (alpha == pixels[..., -1]).all()
        with Image.open(io.BytesIO(data)) as opened:
            assert (alpha == np.asarray(opened.getchannel("A"))).all()


def test_the_alpha_is_decoded_alone_only_where_the_caller_says() -> None:
    pixels = np.zeros((30, 40, 4), np.uint8)
    pixels[10:20, 5:35] = (9, 99, 199, 255)
    data = png_file(pixels, [4] * 30, mode="RGBA")
    file = png.read(data)
    assert file is not None
    seen: list[Image.Image] = []

    def opaque(alpha: Image.Image) -> bool:
        seen.append(alpha)
        return False

    image = png.decode(file, alpha_only=opaque)
    assert image is not None
    assert image.mode == "RGBA"
    assert (np.asarray(image) == pixels).all()
    assert len(seen) == 1
    assert seen[0].mode == "L"
    assert (np.asarray(seen[0]) == pixels[..., 3]).all()


@settings(max_examples=300, deadline=None)
@given(
    size=st.tuples(st.integers(1, 12), st.integers(1, 12)),
    filters=st.lists(st.integers(0, 4), min_size=12, max_size=12),
    holes=st.lists(st.tuples(st.integers(0, 11), st.integers(0, 11), st.integers(0, 254))),
)
def test_an_opaque_alpha_is_told_from_its_filtered_rows(
    size: tuple[int, int], filters: list[int], holes: list[tuple[int, int, int]]
) -> None:
    """`png._opaque` says an alpha is 255 everywhere exactly when it is, whatever each row's
    filter (then its alpha is not decoded alone: it cannot be the ink)."""
    height, width = size
    alpha = np.full((height, width), 255, np.uint8)
    for row, column, level in holes:
        alpha[row % height, column % width] = level
    rows = np.frombuffer(filtered(alpha, filters[:height]), np.uint8).reshape(height, width + 1)
    assert png._opaque(rows) == bool((alpha == 255).all())


@pytest.mark.parametrize("options", [{}, {"optimize": True}, {"compress_level": 0}])
def test_pillows_own_files_decode_to_its_pixels(
    mnist_test_set: tuple[Bytes, Bytes], options: dict[str, Any]
) -> None:
    for digit in mnist_test_set[0][:40]:
        big = np.kron(digit, np.ones((5, 4), np.uint8))  # 140x112, runs as in a drawing
        for pixels, mode in (
            (digit, "L"),
            (255 - digit, "L"),
            (np.dstack([big, 255 - big]), "LA"),
            (np.dstack([big, big // 2, 255 - big]), "RGB"),
            (np.dstack([big // 3, big, big, big]), "RGBA"),
        ):
            buffer = io.BytesIO()
            Image.fromarray(pixels, mode).save(buffer, "PNG", **options)
            whole = decoded(buffer.getvalue())
            assert whole is not None
            assert (whole == pixels).all()


PASSIVE_CHUNKS = {
    "pHYs": chunk(b"pHYs", struct.pack(">IIB", 2835, 2835, 1)),
    "gAMA": chunk(b"gAMA", b"\0\0\xb1\x8f"),
    "sRGB": chunk(b"sRGB", b"\0"),
    "bKGD": chunk(b"bKGD", b"\0\xff"),  # GIMP writes it; Pillow skips it
    "tIME": chunk(b"tIME", struct.pack(">HBBBBB", 2026, 12, 7, 18, 0, 0)),
    "sBIT": chunk(b"sBIT", b"\x08"),
    "a private one": chunk(b"prVt", b"anything"),
    "matplotlib's text": chunk(
        b"tEXt", b"Software\0Matplotlib version3.10.0, https://matplotlib.org/"
    ),
    "a comment without its NUL": chunk(b"tEXt", b"Comment"),
    "ImageMagick's dates": chunk(b"tEXt", b"date:create\x002026-12-07T18:00:00+00:00")
    + chunk(b"tEXt", b"date:modify\x002026-12-07T18:00:00+00:00"),
}


@pytest.mark.parametrize("name", list(PASSIVE_CHUNKS))
def test_passive_chunks_before_and_after_the_data_are_allowed(
    name: str, without_fast_path: Any
) -> None:
    pixels = np.arange(784, dtype=np.uint32).reshape(28, 28).astype(np.uint8)
    data = png_file(pixels, [0] * 28, before=PASSIVE_CHUNKS[name])
    iend = data.index(b"IEND") - 4
    for layout in (data, data[:iend] + PASSIVE_CHUNKS[name] + data[iend:]):
        whole = decoded(layout)
        assert whole is not None
        assert (whole == pixels).all()
        assert outcome(layout) == without_fast_path(layout)


def test_every_chunk_pillow_reads_is_known_here() -> None:
    """The chunks Pillow's PNG plugin has a reader for are the ones `png` lets pass (their
    content kept in `info` only) or leaves to Pillow: a Pillow that reads one more must be
    looked at before its files take the fast path."""
    read = {
        name.removeprefix("chunk_").encode()
        for name in dir(PngImagePlugin.PngStream)
        if name.startswith("chunk_")
    }
    assert read == set(png._PASSIVE) | png._READ | {b"IHDR", b"IDAT", b"IEND"}


PIXELS = np.tile(np.arange(28, dtype=np.uint8) * 9, (28, 1))
PLAIN = png_file(PIXELS, [0, 1, 2, 3, 4] * 5 + [0, 1, 2])
IDAT_AT = PLAIN.index(b"IDAT") - 4
IEND_AT = PLAIN.index(b"IEND") - 4


def unread_files() -> dict[str, bytes]:
    """Files `png.read` must leave to Pillow: each one way off its narrow layout."""
    data = zlib.compress(filtered(PIXELS, [0] * 28))
    text = chunk(b"tEXt", b"Raw profile type exif\0hello")  # an orientation, for Pillow
    return {
        "16-bit": SIGNATURE + ihdr(depth=16) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "1-bit": SIGNATURE + ihdr(depth=1) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "palette": SIGNATURE + ihdr(colour=3) + chunk(b"PLTE", bytes(range(256)) * 3)
        + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "interlaced": SIGNATURE + ihdr(lace=1) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "no pixels": SIGNATURE + ihdr(width=0) + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "over the size decoded here": SIGNATURE + ihdr(width=2048, height=2048, colour=2)
        + chunk(b"IDAT", data) + chunk(b"IEND", b""),
        "transparency": PLAIN[:IDAT_AT] + chunk(b"tRNS", b"\0\0") + PLAIN[IDAT_AT:],
        "text before the data": PLAIN[:IDAT_AT] + text + PLAIN[IDAT_AT:],
        "text after the data": PLAIN[:IEND_AT] + text + PLAIN[IEND_AT:],
        "text Pillow would read": PLAIN[:IDAT_AT] + chunk(b"tEXt", b"transparency\0" + bytes(2))
        + PLAIN[IDAT_AT:],
        "too much text": PLAIN[:IDAT_AT] + chunk(b"tEXt", b"Comment\0" + bytes(1 << 20))
        + PLAIN[IDAT_AT:],
        "compressed text": PLAIN[:IDAT_AT] + chunk(b"zTXt", b"Comment\0\0" + zlib.compress(b"x"))
        + PLAIN[IDAT_AT:],
        "exif": PLAIN[:IDAT_AT] + chunk(b"eXIf", b"MM\0*") + PLAIN[IDAT_AT:],
        "a gamma too short to read": PLAIN[:IDAT_AT] + chunk(b"gAMA", b"\0\1")
        + PLAIN[IDAT_AT:],
        "a second IHDR": PLAIN[:IDAT_AT] + ihdr() + PLAIN[IDAT_AT:],
        "a colour profile": PLAIN[:IDAT_AT] + chunk(b"iCCP", b"p\0\0" + zlib.compress(b"icc"))
        + PLAIN[IDAT_AT:],
        "animation": PLAIN[:IDAT_AT] + chunk(b"acTL", struct.pack(">II", 1, 0))
        + PLAIN[IDAT_AT:],
        "an unknown critical chunk": PLAIN[:IDAT_AT] + chunk(b"ABCD", b"") + PLAIN[IDAT_AT:],
        "a chunk type not of letters": PLAIN[:IDAT_AT] + chunk(b"ab1d", b"") + PLAIN[IDAT_AT:],
        "image data in two runs": PLAIN[:IEND_AT] + chunk(b"tIME", bytes(7))
        + chunk(b"IDAT", b"") + PLAIN[IEND_AT:],
        "no IEND": PLAIN[:IEND_AT],
        "no image data": PLAIN[:IDAT_AT] + chunk(b"IEND", b""),
        "bad IHDR CRC": PLAIN[:29] + bytes([PLAIN[29] ^ 1]) + PLAIN[30:],
        "bad IDAT CRC": PLAIN[: IEND_AT - 1] + bytes([PLAIN[IEND_AT - 1] ^ 1]) + PLAIN[IEND_AT:],
        "not a PNG": b"GIF89a" + PLAIN[6:],
    }  # fmt: skip


def undecoded_files() -> dict[str, bytes]:
    """Files `png.read` takes whose data `png.decode` must leave to Pillow."""
    data = zlib.compress(filtered(PIXELS, [0] * 28))
    return {
        "corrupt deflate": SIGNATURE + ihdr() + chunk(b"IDAT", b"\x78\x9c\xff\xff")
        + chunk(b"IEND", b""),
        "too little data": SIGNATURE + ihdr() + chunk(b"IDAT", zlib.compress(bytes(29 * 27)))
        + chunk(b"IEND", b""),
        "filter type 5": SIGNATURE + ihdr() + chunk(b"IDAT", zlib.compress(b"\5" * 812))
        + chunk(b"IEND", b""),
        "data after the stream": SIGNATURE + ihdr() + chunk(b"IDAT", data + b"\0")
        + chunk(b"IEND", b""),
        "no adler32": SIGNATURE + ihdr() + chunk(b"IDAT", data[:-4]) + chunk(b"IEND", b""),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(unread_files()))
def test_anything_else_is_left_to_pillow(name: str) -> None:
    assert png.read(unread_files()[name]) is None


@pytest.mark.parametrize("name", list(undecoded_files()))
def test_data_that_does_not_decode_as_promised_is_left_to_pillow(name: str) -> None:
    file = png.read(undecoded_files()[name])
    assert file is not None
    assert png.decode(file) is None


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
            patch.setattr(png, "read", lambda data: None)
            return outcome(data, max_pixels)

    return pillow_only


def test_files_left_to_pillow_get_its_answer(without_fast_path: Any) -> None:
    for name, data in (unread_files() | undecoded_files()).items():
        assert outcome(data) == without_fast_path(data), name


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


def drawings(digit: Bytes) -> dict[str, bytes]:
    """A digit drawn as people send it in PNG: a transparent canvas in RGBA and in grey and
    alpha, an opaque one (a screenshot's alpha is all 255), on grey (also with matplotlib's
    text and resolution), in colour."""
    ink = np.asarray(Image.fromarray(digit).resize((200, 200), Image.Resampling.BILINEAR))
    paper = 255 - ink
    files = {
        "RGBA canvas": Image.fromarray(np.dstack([np.zeros_like(ink)] * 3 + [ink]), "RGBA"),
        "LA canvas": Image.fromarray(np.dstack([np.full_like(ink, 30), ink]), "LA"),
        "opaque RGBA": Image.fromarray(np.dstack([paper] * 3 + [np.full_like(ink, 255)]), "RGBA"),
        "grey": Image.fromarray(paper),
        "colour": Image.fromarray(np.dstack([paper, paper // 2 + 100, paper]), "RGB"),
    }
    out = {}
    for name, image in files.items():
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        out[name] = buffer.getvalue()
    text = PngImagePlugin.PngInfo()
    text.add_text("Software", "Matplotlib version3.10.0, https://matplotlib.org/")
    buffer = io.BytesIO()
    files["grey"].save(buffer, "PNG", pnginfo=text, dpi=(100, 100))  # as matplotlib saves
    out["grey, with text"] = buffer.getvalue()
    return out


def test_drawings_take_the_fast_path_with_the_same_outcome(
    mnist_test_set: tuple[Bytes, Bytes], without_fast_path: Any
) -> None:
    digits = mnist_test_set[0]
    for index in range(8):
        files = drawings(digits[index]) | {"bench canvas": payloads.render(
            "canvas-280", digits[index], index)}  # fmt: skip
        for name, data in files.items():
            assert isinstance(open_image(data, MAX_PIXELS), png.PngFile), name
            assert outcome(data) == without_fast_path(data), name


CANVAS = drawings(np.eye(28, dtype=np.uint8) * 255)["RGBA canvas"]


@pytest.mark.parametrize("original", [PLAIN, CANVAS], ids=["28x28", "canvas"])
@settings(
    max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(damage=st.data())
def test_damaged_files_get_the_answer_pillow_gives(
    without_fast_path: Any, original: bytes, damage: st.DataObject
) -> None:
    """Cut short, a byte flipped, bytes appended: with the fast path or without, the same
    model input or the same error."""
    data = bytearray(original[: damage.draw(st.integers(0, len(original)), label="cut")])
    data += damage.draw(st.binary(max_size=8), label="tail")
    flip = damage.draw(st.one_of(st.none(), st.integers(0, len(original) - 1)), label="flip")
    if flip is not None and flip < len(data):
        data[flip] ^= 0x40
    assert outcome(bytes(data)) == without_fast_path(bytes(data))


@pytest.mark.parametrize("data", [PLAIN, CANVAS], ids=["28x28", "canvas"])
def test_the_pixel_limit_still_applies(without_fast_path: Any, data: bytes) -> None:
    refused = outcome(data, max_pixels=700)
    assert refused == without_fast_path(data, 700)
    assert refused[0].__name__ == "ImageTooLargeError"
