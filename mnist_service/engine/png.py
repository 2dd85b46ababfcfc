"""Plain PNGs decoded with zlib-ng's inflate and Pillow's own unfiltering.

Decoding a PNG is two steps: inflating the image data (zlib), then undoing each row's
filter. Pillow does both, with the zlib its wheels carry, and on a drawing the inflate is most
of the time: a 280x280 RGBA canvas export (a pen's strokes on a blank canvas: 2 KB of data,
306 KB once inflated) takes ~450 us to inflate and ~200 us for the rest. zlib-ng inflates the
same data in ~30 us. So a file laid out plainly is inflated here, and the rows go back to the
decoder Pillow's PNG plugin uses (its "zip" decoder, through the public `Image.frombytes`)
wrapped as stored deflate blocks, which it only copies: the pixels are Pillow's own, bit for
bit. (Where most rows use the Paeth filter, as on a photo or a smooth gradient, Pillow's
unfiltering is the larger part, ~640 us for the same size, and stays.)

A transparent canvas (its ink in the alpha channel, `preprocess._canonical`) needs its alpha
alone. With 8 bits a sample, every PNG filter predicts a byte from the same channel of the
pixels to the left, above and above-left, so the alpha bytes of the rows, with their filter
bytes, are an 8-bit grey image filtered the same way: the alpha is unfiltered on its own, a
quarter of the work (~110 us for that canvas, instead of ~670 us for Pillow's decode and
`getchannel`). An alpha that is 255 everywhere (a screenshot, a page filled white before the
drawing) is told from its filtered bytes (`_opaque`), and not unfiltered for nothing.

Only the plainest file is taken (`read`): the signature; IHDR first, 8 bits a sample, grey,
grey and alpha, RGB or RGBA, not interlaced; the IDAT chunks in one run; IEND last; and
besides them only chunks that cannot change the pixels or their orientation: the ones Pillow
reads into `info` alone (pHYs, gAMA, sRGB, cHRM, each as long as Pillow needs; text under the
keywords PNG and ImageMagick define, such as Software, which matplotlib writes), and ancillary
ones it skips (bKGD, tIME, sBIT and the like, which GIMP and Paint write); every CRC right; at
most `MAX_FILTERED` bytes of rows. Anything else (a palette, 16 bits, transparency, a colour
profile, other text, which may hold XMP or EXIF orientation, animation, a bad CRC) gives None,
and the caller opens the file with Pillow, which reads or refuses it as it always has. So does
image data that does not inflate to exactly the rows the header promises, as one whole zlib
stream (`decode` gives None): Pillow's decoder, given a stream that ends early, would keep the
rows it lacks black, where opening the file refuses it.
"""

from __future__ import annotations

import functools
import struct
from collections.abc import Callable
from typing import Final, NamedTuple, cast

import numpy as np
import numpy.typing as npt
from PIL import Image
from zlib_ng import zlib_ng

__all__ = ["MAX_FILTERED", "SIGNATURE", "PngFile", "decode", "read"]

SIGNATURE: Final = b"\x89PNG\r\n\x1a\n"

MAX_FILTERED: Final = 1 << 23
"""The most bytes of rows (filter bytes and pixels) decoded here: 8 MiB, a 1448x1448 RGBA
image. Inflating here costs the rows twice over in memory for a moment (the rows, and their
copy as stored blocks); a bigger file goes to Pillow, which inflates row by row."""

_MODES: Final = {0: "L", 2: "RGB", 4: "LA", 6: "RGBA"}
"""PNG colour types at 8 bits a sample -> Pillow's mode (and raw mode) for them."""

_CHANNELS: Final = {"L": 1, "RGB": 3, "LA": 2, "RGBA": 4}

_PASSIVE: Final = {b"pHYs": 9, b"gAMA": 4, b"sRGB": 1, b"cHRM": 32}
"""Chunks Pillow reads into `info` alone, and how long each must be (it refuses the file where
one is shorter than it reads): they leave the decoded pixels and their orientation as they
are."""

_TEXT_KEYWORDS: Final = frozenset(
    {
        *(b"Title", b"Author", b"Description", b"Copyright", b"Creation Time", b"Software"),
        *(b"Disclaimer", b"Warning", b"Source", b"Comment"),  # PNG's own keywords
        *(b"date:create", b"date:modify", b"date:timestamp"),  # ImageMagick's
    }
)
"""The keywords of tEXt chunks that pass: Pillow keeps their text in `info`, where nothing
reads it. Under another keyword it might be read (`exif`, or `transparency`, say)."""

_MAX_TEXT: Final = 1 << 20
"""At most this many bytes of tEXt chunks in all pass (far below Pillow's own limit)."""

_READ: Final = frozenset(
    {b"PLTE", b"tRNS", b"iCCP", b"tEXt", b"zTXt", b"iTXt", b"eXIf", b"acTL", b"fcTL", b"fdAT"}
)
"""The other chunks Pillow's PNG plugin reads (besides IHDR, IDAT and IEND): a palette,
transparency, a colour profile, text (which may hold XMP or EXIF orientation), EXIF,
animation. A file with one is Pillow's to open (tEXt under `_TEXT_KEYWORDS` aside). Any
other ancillary chunk it skips."""

_IHDR: Final = struct.Struct(">IIBBBBB")
_LENGTH_TYPE: Final = struct.Struct(">I4s")
_CRC: Final = struct.Struct(">I")
_STORED: Final = struct.Struct("<BHH")
_STORED_MAX: Final = 0xFFFF
_INFLATE_ERROR: Final = cast(type[Exception], zlib_ng.error)  # its stub calls it an instance
_ZLIB_HEAD: Final = b"\x78\x01"
"""A zlib stream's header: deflate, 32 KiB window, no preset dictionary (its check bits)."""


class PngFile(NamedTuple):
    """A PNG laid out as `read` takes it, not decoded yet."""

    mode: str
    """Pillow's mode for it: L, LA, RGB or RGBA."""
    size: tuple[int, int]
    """Width and height, in pixels."""
    image_data: bytes
    """The IDAT chunks' bodies, joined: one zlib stream."""
    data: bytes
    """The whole file (for Pillow, where `decode` leaves it)."""


def read(data: bytes) -> PngFile | None:
    """What a plain PNG holds (the module says which), its chunks' CRCs checked, nothing
    decoded; None for any other file."""
    at = len(SIGNATURE)
    if not data.startswith(SIGNATURE) or len(data) < at + 25:
        return None
    width, height, depth, colour, method, filtering, lace = _IHDR.unpack_from(data, at + 8)
    mode = _MODES.get(colour)
    if (
        data[at : at + 8] != b"\0\0\0\rIHDR"
        or mode is None
        or (depth, method, filtering, lace) != (8, 0, 0, 0)
        or not 0 < width < 1 << 31  # the spec's bounds (Pillow reads no more)
        or not 0 < height < 1 << 31
        or height * (1 + width * _CHANNELS[mode]) > MAX_FILTERED
        or zlib_ng.crc32(data[at + 4 : at + 21]) != _CRC.unpack_from(data, at + 21)[0]
    ):
        return None
    image_data = _image_data(data, at + 25)
    if image_data is None:
        return None
    return PngFile(mode, (width, height), image_data, data)


def decode(
    file: PngFile, alpha_only: Callable[[Image.Image], bool] | None = None
) -> Image.Image | None:
    """The file's pixels, as Pillow decodes them, in its mode; for a file with alpha, its alpha
    channel alone (mode L) where `alpha_only` says of it that it is all the caller needs (it is
    not asked of an alpha that is 255 everywhere, which carries nothing: `_opaque`). None where
    the data does not inflate to the rows the header promises."""
    rows = _inflate(file)
    if rows is None:
        return None
    try:
        if alpha_only is not None and file.mode in ("LA", "RGBA"):
            filtered = _alpha_rows(rows, file)
            if not _opaque(filtered):
                alpha = _unfilter(filtered.data, "L", file.size)
                if alpha_only(alpha):
                    return alpha
        return _unfilter(rows, file.mode, file.size)
    except (ValueError, OSError):  # a filter type PNG does not have: Pillow's to say
        return None


def _image_data(data: bytes, at: int) -> bytes | None:
    """The image data (the IDAT chunks' bodies, joined) of the chunks from `at` (after IHDR),
    laid out as the module says, every CRC checked; None otherwise. (Pillow checks the CRCs
    up to the image data only: a file this refuses may still be Pillow's to read.)"""
    end = len(data)
    image_data: list[bytes] = []
    after = False  # whether the run of IDAT chunks is over
    text = 0  # bytes of tEXt chunks
    while at + 12 <= end:
        length, kind = _LENGTH_TYPE.unpack_from(data, at)
        stop = at + 8 + length
        if stop + 4 > end:
            return None
        body = data[at + 8 : stop]
        if zlib_ng.crc32(body, zlib_ng.crc32(kind)) != _CRC.unpack_from(data, stop)[0]:
            return None
        at = stop + 4
        if kind == b"IDAT":
            if after:
                return None  # a second run of image data
            image_data.append(body)
        elif kind == b"IEND":
            return b"".join(image_data) if image_data else None
        elif kind == b"tEXt" and body.split(b"\0", 1)[0] in _TEXT_KEYWORDS:
            text += length
            if text > _MAX_TEXT:
                return None
            after = bool(image_data)
        elif _passive(kind, length):
            after = bool(image_data)
        else:
            return None
    return None  # no IEND


def _passive(kind: bytes, length: int) -> bool:
    """Whether a chunk (other than text) leaves the decoded pixels and their orientation as
    they are: one that Pillow reads into `info` alone, as long as it needs, or an ancillary
    one (its type's first letter in lower case) that it skips."""
    least = _PASSIVE.get(kind)
    if least is not None:
        return length >= least
    return kind.isalpha() and kind[:1].islower() and kind not in _READ


def _inflate(file: PngFile) -> bytes | None:
    """The filtered rows, if the image data inflates to exactly them, in one whole zlib
    stream; None otherwise."""
    width, height = file.size
    size = height * (1 + width * _CHANNELS[file.mode])
    inflater = zlib_ng.decompressobj()
    try:
        rows = inflater.decompress(file.image_data, size + 1)
    except _INFLATE_ERROR:
        return None
    complete = inflater.eof and not inflater.unconsumed_tail and not inflater.unused_data
    return rows if len(rows) == size and complete else None


def _alpha_rows(rows: bytes, file: PngFile) -> npt.NDArray[np.uint8]:
    """The alpha channel's filtered rows: each row's filter byte, then its pixels' alpha."""
    width, height = file.size
    channels = _CHANNELS[file.mode]
    samples = np.frombuffer(rows, np.uint8).reshape(height, 1 + width * channels)
    alpha = np.empty((height, 1 + width), np.uint8)
    alpha[:, 0] = samples[:, 0]
    alpha[:, 1:] = samples[:, channels::channels]  # each pixel's last sample
    return alpha


def _opaque(filtered: npt.NDArray[np.uint8]) -> bool:
    """Whether filtered rows of one channel (each row's filter byte, then its samples) unfilter
    to 255 everywhere: an opaque screenshot's or page's alpha, told without unfiltering it.
    Below a row of 255s (or above the first row, zeros), each filter type leaves the row's
    255s as one pattern of bytes (`_opaque_rows`)."""
    types = filtered[:, 0]
    if int(types.max()) > 4:
        return False  # no PNG filter: Pillow's to refuse
    below, first = _opaque_rows(filtered.shape[1] - 1)
    if not np.array_equal(filtered[0, 1:], first[types[0]]):
        return False
    return bool(np.array_equal(filtered[1:, 1:], below[types[1:]]))


@functools.lru_cache(maxsize=16)
def _opaque_rows(width: int) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """A row of `width` 255s, filtered by each of PNG's five filters (None, Sub, Up, Average,
    Paeth), below a row of 255s and as the first row: [5, width] each."""
    below = np.zeros((5, width), np.uint8)  # Up, and Paeth (its prediction is 255 throughout)
    below[0] = 255  # None
    below[1, 0] = 255  # Sub: the first sample has no left neighbour
    below[3, 0] = 128  # Average: the first sample predicted as (0 + 255) // 2
    first = np.zeros((5, width), np.uint8)  # Sub and Paeth: the left neighbour, from the second
    first[:, 0] = 255
    first[2] = 255  # Up: nothing above
    first[0] = 255
    first[3, 1:] = 128  # Average: (255 + 0) // 2 predicted
    for table in (below, first):
        table.flags.writeable = False
    return below, first


def _unfilter(rows: bytes | memoryview, mode: str, size: tuple[int, int]) -> Image.Image:
    """Filtered rows -> the image, through Pillow's PNG decoder (the rows as stored blocks)."""
    return Image.frombytes(mode, size, _stored(rows), "zip", mode)


def _stored(rows: bytes | memoryview) -> bytes:
    """`rows` as a zlib stream of stored (uncompressed) deflate blocks."""
    view = memoryview(rows).cast("B")
    parts: list[bytes | memoryview] = [_ZLIB_HEAD]
    for start in range(0, len(view), _STORED_MAX):
        block = view[start : start + _STORED_MAX]
        last = start + _STORED_MAX >= len(view)
        parts += (_STORED.pack(last, len(block), len(block) ^ _STORED_MAX), block)
    parts.append(_CRC.pack(zlib_ng.adler32(view)))
    return b"".join(parts)
