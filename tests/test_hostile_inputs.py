"""The bad-input corpus: named hostile payloads sent through a real server by real clients.

grpcio sends every payload it can express (any bytes as a request message, with a generic
stub); a raw HTTP/2 client (`h2`) sends the rest: the compressed flag with and without
`grpc-encoding`, gzip bombs, announced-only lengths, messages cut short. Each case pins the
exact status (or, for a valid but odd image, the right digit), a message that helps and
carries no traceback or Python type name, and a valid request right after that succeeds.
The server runs at log level debug, where it logs the most (the request log, each refusal's
reason): nothing it logs may carry a payload's bytes. Every call takes the one call runner
(`transport.runner`), whatever its kind or log level.
"""

from __future__ import annotations

import gzip
import io
import re
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import grpc
import numpy as np
import pytest
from grpclib.const import Status
from PIL import Image

from mnist_service._proto.mnist import MnistPrediction, PredictBatchResponse, StreamPrediction

from .conftest import MnistSplit, ServerProcess, png_bytes
from .test_message_limits import GIB, frame, image_message, raw_call, status_of, varint

MARKER = b"HOSTILE-7f3a9c"
"""Planted in payloads: the server's log must never contain it."""

LIMIT = 4 * 1024 * 1024  # the default --max-message-bytes
PIXEL_LIMIT = 4096 * 4096  # the default --max-image-pixels

PYTHON_TEXT = re.compile(
    r"Traceback|File \"|\b[A-Z]\w*(Error|Exception|Warning)\b|NoneType|bytes-like"
    r"|'(int|bytes|str|list|dict|float)'|object at 0x|Internal Server Error"
)
"""What a status message must never hold: Python's words (tracebacks, type names) or
grpclib's UNKNOWN text."""

PREDICT = "/mnist.Mnist/Predict"
BATCH = "/mnist.Mnist/PredictBatch"
STREAM = "/mnist.Mnist/PredictStream"
HEALTH = "/grpc.health.v1.Health/Check"


# --- payloads -------------------------------------------------------------------------------


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


@dataclass(frozen=True)
class Digits:
    """MNIST test digits drawn as a user would: dark ink on white, 112 px."""

    seven: Image.Image  # mnist_test_set[0], labelled 7
    two: Image.Image  # mnist_test_set[1], labelled 2


def user_digit(pixels: np.ndarray) -> Image.Image:
    return Image.fromarray(255 - pixels).resize((112, 112), Image.Resampling.BICUBIC)


def png_declaring(width: int, height: int, idat: bytes = b"") -> bytes:
    """A 1-bit PNG whose header says `width`x`height`; `idat` its (compressed) data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    idat = idat or zlib.compress(bytes(1000), 9)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")
    )


def png_bomb() -> bytes:
    """A real 1-bit 20000x20000 PNG of zeros: 50 MB of pixels in about 50 kB."""
    row = bytes(1 + 20000 // 8)  # filter byte + packed bits
    compressor = zlib.compressobj(9)
    data = b"".join(compressor.compress(row) for _ in range(20000)) + compressor.flush()
    return png_declaring(20000, 20000, data)


def jpeg_declaring(digits: Digits, width: int, height: int) -> bytes:
    data = bytearray(encode(digits.seven, "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_declaring(digits: Digits, width: int, height: int) -> bytes:
    data = bytearray(encode(digits.seven, "GIF"))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


def gif_growing_canvas(digits: Digits) -> bytes:
    """A 112x112 GIF whose first frame's descriptor claims 65535x65535: Pillow grows the
    canvas to fit while opening it."""
    data = bytearray(encode(digits.seven, "GIF"))
    descriptor = data.index(b"\x2c\x00\x00\x00\x00\x70\x00\x70\x00")
    data[descriptor + 5 : descriptor + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def webp_declaring(digits: Digits, width: int, height: int) -> bytes:
    data = bytearray(encode(digits.seven, "WEBP", lossless=True))
    assert data[12:16] == b"VP8L"
    bits = (width - 1) | (height - 1) << 14
    data[21:25] = struct.pack("<I", bits | (data[24] & 0xF0) << 24)
    return bytes(data)


def zero_by_zero_png() -> bytes:
    return png_declaring(0, 0)


def many_frames(digits: Digits, fmt: str, count: int) -> bytes:
    """The seven, then `count - 1` frames of a two: only the first frame may count."""
    return encode(
        digits.seven, fmt, save_all=True, append_images=[digits.two] * (count - 1), duration=10
    )


def sixteen_bit_png(digits: Digits) -> bytes:
    wide = np.asarray(digits.seven).astype(np.uint16) * 257
    return encode(Image.fromarray(wide), "PNG")


def palette_with_transparency(digits: Digits) -> bytes:
    """A canvas export: a transparent palette entry for the paper, black ink."""
    ink = np.asarray(digits.seven) < 128
    image = Image.fromarray(ink.astype(np.uint8), mode="L").convert("P")
    image.putpalette([255, 255, 255, 0, 0, 0])
    return encode(image, "PNG", transparency=0)


def half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def chunks(data: bytes, size: int = 16384) -> list[bytes]:
    """`data` in DATA frames of HTTP/2's default largest size."""
    return [data[start : start + size] for start in range(0, len(data), size)]


def gzip_bomb() -> bytes:
    """50 MiB of zeros (12 times the limit), gzipped to 50 kB: one HTTP/2 window."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 16 + zlib.MAX_WBITS)
    chunk = bytes(1 << 20)
    return b"".join(compressor.compress(chunk) for _ in range(50)) + compressor.flush()


# --- the corpus -----------------------------------------------------------------------------

PREDICTION = None
"""The expected outcome of a valid (if odd) image: the right digit."""

Expected = tuple[Status, str] | None


@dataclass(frozen=True)
class ImageCase:
    """`data` sent as MnistImage.data to Predict; the status and part of its message, or
    None for a prediction of `label`."""

    make: Callable[[Digits], bytes]
    expected: Expected
    label: int = 7


INVALID = Status.INVALID_ARGUMENT
UNREADABLE = "is not a readable PNG, JPEG, BMP, GIF, WEBP or TIFF file"
CORRUPT = "image data is truncated or corrupt"

IMAGE_CASES: dict[str, ImageCase] = {
    "empty": ImageCase(lambda d: b"", (INVALID, "image is empty")),
    "one-byte": ImageCase(lambda d: b"\x89", (INVALID, f"{UNREADABLE}, nor 784 raw pixels")),
    "random-bytes": ImageCase(
        lambda d: MARKER + np.random.default_rng(7).bytes(3000), (INVALID, "(got 3014 bytes)")
    ),
    "text": ImageCase(lambda d: MARKER + b" hello <script>\r\n", (INVALID, UNREADABLE)),
    "783-raw-bytes": ImageCase(lambda d: bytes(783), (INVALID, "got 783 bytes")),
    "785-raw-bytes": ImageCase(lambda d: bytes(range(256)) * 3 + bytes(17), (INVALID, "785")),
    "784-random-raw-bytes": ImageCase(
        lambda d: np.random.default_rng(1).bytes(784), PREDICTION, label=-1
    ),
    "truncated-png": ImageCase(lambda d: half(encode(d.seven, "PNG")), (INVALID, CORRUPT)),
    "truncated-jpeg": ImageCase(lambda d: half(encode(d.seven, "JPEG")), (INVALID, CORRUPT)),
    "truncated-gif": ImageCase(lambda d: half(encode(d.seven, "GIF")), (INVALID, CORRUPT)),
    "truncated-webp": ImageCase(
        lambda d: half(encode(d.seven, "WEBP")), (INVALID, "image header is corrupt")
    ),
    "truncated-tiff": ImageCase(
        lambda d: half(encode(d.seven, "TIFF", compression="tiff_lzw")), (INVALID, UNREADABLE)
    ),
    "png-signature-only": ImageCase(lambda d: b"\x89PNG\r\n\x1a\n", (INVALID, UNREADABLE)),
    "png-with-jpeg-magic": ImageCase(
        lambda d: b"\xff\xd8\xff\xe0" + encode(d.seven, "PNG")[4:],
        (INVALID, "image header is corrupt"),
    ),
    "jpeg-with-gif-magic": ImageCase(
        lambda d: b"GIF89a" + encode(d.seven, "JPEG")[6:], (INVALID, "image")
    ),
    "eps-not-allowed": ImageCase(
        lambda d: b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", (INVALID, UNREADABLE)
    ),
    "png-declaring-100000x100000": ImageCase(
        lambda d: png_declaring(100_000, 100_000),
        (INVALID, f"image is 100000×100000 = 10000000000 pixels; the limit is {PIXEL_LIMIT}"),
    ),
    "png-declaring-4097x4097": ImageCase(
        lambda d: png_declaring(4097, 4097),
        (INVALID, f"image is 4097×4097 = 16785409 pixels; the limit is {PIXEL_LIMIT}"),
    ),
    "jpeg-declaring-65000x65000": ImageCase(
        lambda d: jpeg_declaring(d, 65000, 65000), (INVALID, "image is 65000×65000 = ")
    ),
    "gif-declaring-65535x65535": ImageCase(
        lambda d: gif_declaring(d, 65535, 65535), (INVALID, "image is 65535×65535 = ")
    ),
    "gif-frame-growing-the-canvas": ImageCase(
        gif_growing_canvas, (INVALID, f"pixels; the limit is {PIXEL_LIMIT}")
    ),
    "webp-declaring-16384x16384": ImageCase(
        lambda d: webp_declaring(d, 16384, 16384),
        (INVALID, f"image is 268435456 pixels; the limit is {PIXEL_LIMIT}"),
    ),
    "png-decompression-bomb": ImageCase(
        lambda d: png_bomb(), (INVALID, "image is 20000×20000 = 400000000 pixels")
    ),
    "0x0-png": ImageCase(lambda d: zero_by_zero_png(), (INVALID, "image")),
    "1x1-png": ImageCase(lambda d: encode(Image.new("L", (1, 1), 0), "PNG"), (INVALID, "no ink")),
    "blank-white-png": ImageCase(
        lambda d: encode(Image.new("L", (300, 200), 255), "PNG"), (INVALID, "no ink")
    ),
    "blank-transparent-png": ImageCase(
        lambda d: encode(Image.new("RGBA", (300, 200)), "PNG"), (INVALID, "no ink")
    ),
    "blank-raw-bytes": ImageCase(lambda d: bytes(784), (INVALID, "no ink")),
    "gif-1000-frames": ImageCase(lambda d: many_frames(d, "GIF", 1000), PREDICTION),
    "webp-50-frames": ImageCase(lambda d: many_frames(d, "WEBP", 50), PREDICTION),
    "tiff-20-pages": ImageCase(lambda d: many_frames(d, "TIFF", 20), PREDICTION),
    "png-animated-20-frames": ImageCase(lambda d: many_frames(d, "PNG", 20), PREDICTION),
    "cmyk-jpeg": ImageCase(lambda d: encode(d.seven.convert("CMYK"), "JPEG"), PREDICTION),
    "cmyk-tiff": ImageCase(lambda d: encode(d.seven.convert("CMYK"), "TIFF"), PREDICTION),
    "16-bit-png": ImageCase(sixteen_bit_png, PREDICTION),
    "palette-with-transparency-png": ImageCase(palette_with_transparency, PREDICTION),
    "1-bit-bmp": ImageCase(lambda d: encode(d.seven.convert("1"), "BMP"), PREDICTION),
}


@dataclass(frozen=True)
class MessageCase:
    """A whole request message, any bytes, sent by grpcio to `method`."""

    method: str
    make: Callable[[Digits], bytes]
    expected: Expected


MESSAGE_CASES: dict[str, MessageCase] = {
    "protobuf-truncated-length": MessageCase(
        PREDICT, lambda d: b"\x0a\x64" + MARKER, (INVALID, "field 1 at offset 0 needs 100 bytes")
    ),
    "protobuf-wire-type-7": MessageCase(
        PREDICT, lambda d: b"\x0f" + MARKER, (INVALID, "wire type 7 of field 1")
    ),
    "protobuf-field-1-as-varint": MessageCase(
        PREDICT, lambda d: b"\x08\x96\x01", (INVALID, "image is empty")
    ),
    "protobuf-field-1-as-fixed32": MessageCase(
        PREDICT, lambda d: b"\x0d\x01\x02\x03\x04", (INVALID, "image is empty")
    ),
    "protobuf-group": MessageCase(PREDICT, lambda d: b"\x0b\x0c", (INVALID, "groups")),
    "protobuf-field-number-0": MessageCase(
        PREDICT, lambda d: b"\x02\x00", (INVALID, "field number 0")
    ),
    "protobuf-11-byte-varint": MessageCase(
        PREDICT, lambda d: b"\x10" + b"\xff" * 10 + b"\x01", (INVALID, "longer than 10 bytes")
    ),
    "protobuf-unknown-fields-around-the-image": MessageCase(
        PREDICT,
        lambda d: b"\x98\x06\x01" + image_message(encode(d.seven, "PNG")) + b"\xa2\x06\x03abc",
        PREDICTION,
    ),
    "batch-item-truncated": MessageCase(
        BATCH, lambda d: b"\x0a\x03\x0a\x10a", (INVALID, "images[0]: field 1")
    ),
    "batch-over-1024-images": MessageCase(
        BATCH,
        lambda d: b"\x0a\x00" * 1025,
        (INVALID, "PredictBatch holds 1025 images; the limit is 1024"),
    ),
    "health-wire-type-7": MessageCase(
        HEALTH, lambda d: b"\x0f" + MARKER, (INVALID, "malformed HealthCheckRequest message")
    ),
    "oversize-message-sent-whole": MessageCase(
        PREDICT,
        lambda d: image_message(MARKER + bytes(LIMIT)),
        (Status.RESOURCE_EXHAUSTED, f"the limit is {LIMIT} bytes"),
    ),
}


@dataclass(frozen=True)
class RawCase:
    """DATA frames (and extra request headers) sent by a raw HTTP/2 client to Predict."""

    make: Callable[[Digits], list[bytes]]
    expected: Expected
    headers: tuple[tuple[str, str], ...] = ()
    end: bool = True


def gzipped(digits: Digits) -> bytes:
    return gzip.compress(image_message(encode(digits.seven, "PNG")))


GZIP = (("grpc-encoding", "gzip"),)

RAW_CASES: dict[str, RawCase] = {
    "oversize-announced-only": RawCase(
        lambda d: [struct.pack(">?I", False, GIB)],
        (Status.RESOURCE_EXHAUSTED, f"request message is {GIB} bytes; the limit is {LIMIT}"),
        end=False,
    ),
    "no-request-message": RawCase(
        lambda d: [b""], (INVALID, "the call carried no request message")
    ),
    "prefix-cut-short": RawCase(
        lambda d: [b"\x00\x00\x00"], (INVALID, "the request ended inside a gRPC message prefix")
    ),
    "message-cut-short": RawCase(
        lambda d: [frame(image_message(MARKER + encode(d.seven, "PNG")))[:40]],
        (INVALID, "the request ended inside a"),
    ),
    "compressed-flag-without-grpc-encoding": RawCase(
        lambda d: [frame(gzipped(d), compressed=True)],
        (Status.INTERNAL, "marked compressed, but the call's grpc-encoding is missing"),
    ),
    "compressed-flag-with-identity-encoding": RawCase(
        lambda d: [frame(gzipped(d), compressed=True)],
        (Status.INTERNAL, "grpc-encoding is identity; this server accepts gzip and identity"),
        headers=(("grpc-encoding", "identity"),),
    ),
    "compressed-flag-with-deflate-encoding": RawCase(
        lambda d: [frame(zlib.compress(image_message(encode(d.seven, "PNG"))), compressed=True)],
        (Status.UNIMPLEMENTED, "'deflate' are not supported; this server accepts gzip"),
        headers=(("grpc-encoding", "deflate"),),
    ),
    "compressed-flag-with-a-hostile-encoding-name": RawCase(
        lambda d: [frame(gzipped(d), compressed=True)],
        (Status.UNIMPLEMENTED, "compressed with this encoding are not supported"),
        headers=(("grpc-encoding", MARKER.decode() + " <b>'\"x"),),
    ),
    "gzip-bomb": RawCase(
        lambda d: chunks(frame(gzip_bomb(), compressed=True)),
        (Status.RESOURCE_EXHAUSTED, f"inflates to more than {LIMIT} bytes"),
        headers=GZIP,
    ),
    "gzip-corrupt": RawCase(
        lambda d: [frame(gzipped(d)[:12] + MARKER * 4, compressed=True)],
        (Status.INTERNAL, "the gzip request message is corrupt"),
        headers=GZIP,
    ),
    "gzip-cut-short": RawCase(
        lambda d: [frame(gzipped(d)[:-20], compressed=True)],
        (Status.INTERNAL, "the gzip request message is cut short"),
        headers=GZIP,
    ),
    "gzip-empty-body": RawCase(
        lambda d: [frame(b"", compressed=True)],
        (Status.INTERNAL, "the gzip request message is cut short"),
        headers=GZIP,
    ),
    "gzip-two-members": RawCase(
        lambda d: [
            frame(
                gzip.compress(b"\x98\x06\x01")  # an unknown field, then the image
                + gzipped(d),
                compressed=True,
            )
        ],
        (Status.OK, ""),
        headers=GZIP,
    ),
    "two-messages-in-a-unary-call": RawCase(
        lambda d: [frame(image_message(encode(d.seven, "PNG")))] * 2,
        (Status.OK, ""),
    ),
}


# --- the server and the checks --------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--log-level", "debug")
    yield process
    assert process.stop() == 0
    for entry in process.logs:
        text = repr(entry)
        assert MARKER.decode() not in text, f"a payload reached the log: {text}"
        assert "exception" not in entry, f"a hostile input logged a traceback: {text}"


@pytest.fixture(scope="module")
def channel(server: ServerProcess) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(server.address) as channel:
        yield channel


@pytest.fixture(scope="module")
def digits(mnist_test_set: MnistSplit) -> Digits:
    images, labels = mnist_test_set
    assert (labels[0], labels[1]) == (7, 2)
    return Digits(seven=user_digit(images[0]), two=user_digit(images[1]))


def call(channel: grpc.Channel, method: str, body: bytes) -> bytes:
    """One unary call with `body` as the request message, as bytes; its reply's bytes."""
    reply: bytes = channel.unary_unary(method)(body, timeout=30)
    return reply


def answer(channel: grpc.Channel, method: str, body: bytes) -> bytes | tuple[Status, str]:
    """The reply's bytes, or the status and message of the error."""
    try:
        return call(channel, method, body)
    except grpc.RpcError as exc:
        return Status[exc.code().name], exc.details() or ""


def assert_helpful(status: Status, message: str, expected: tuple[Status, str]) -> None:
    assert status is expected[0], message
    assert expected[1] in message
    assert not PYTHON_TEXT.search(message), message


def assert_still_serving(channel: grpc.Channel, mnist_test_set: MnistSplit) -> None:
    images, labels = mnist_test_set
    reply = call(channel, PREDICT, image_message(png_bytes(images[3])))
    assert MnistPrediction.parse(reply).label == labels[3]


@pytest.mark.parametrize("case", IMAGE_CASES.values(), ids=IMAGE_CASES.keys())
def test_a_hostile_image_gets_a_precise_answer(
    channel: grpc.Channel, digits: Digits, mnist_test_set: MnistSplit, case: ImageCase
) -> None:
    outcome = answer(channel, PREDICT, image_message(case.make(digits)))

    if isinstance(outcome, bytes):
        prediction = MnistPrediction.parse(outcome)
        assert case.expected is None, f"predicted {prediction.label}, expected {case.expected}"
        if case.label >= 0:
            assert prediction.label == case.label
        assert sum(prediction.probabilities) == pytest.approx(1, abs=1e-4)
    else:
        assert case.expected is not None, outcome
        assert_helpful(*outcome, case.expected)
    assert_still_serving(channel, mnist_test_set)


@pytest.mark.parametrize("case", MESSAGE_CASES.values(), ids=MESSAGE_CASES.keys())
def test_a_hostile_message_gets_a_precise_answer(
    channel: grpc.Channel, digits: Digits, mnist_test_set: MnistSplit, case: MessageCase
) -> None:
    outcome = answer(channel, case.method, case.make(digits))

    if isinstance(outcome, bytes):
        assert case.expected is None, f"an answer, expected {case.expected}"
        assert MnistPrediction.parse(outcome).label == 7
    else:
        assert case.expected is not None, outcome
        assert_helpful(*outcome, case.expected)
    assert_still_serving(channel, mnist_test_set)


@pytest.mark.parametrize("case", RAW_CASES.values(), ids=RAW_CASES.keys())
def test_a_hostile_stream_of_frames_gets_a_precise_answer(
    server: ServerProcess,
    channel: grpc.Channel,
    digits: Digits,
    mnist_test_set: MnistSplit,
    case: RawCase,
) -> None:
    received = raw_call(
        server.port or 0, PREDICT, case.make(digits), end=case.end, extra_headers=case.headers
    )

    status, message = status_of(received)
    assert case.expected is not None
    if case.expected[0] is Status.OK:
        assert (status, message) == case.expected
    else:
        assert_helpful(status, message, case.expected)
    assert received.get("grpc-accept-encoding") == "gzip"
    assert_still_serving(channel, mnist_test_set)


# --- whole workloads ------------------------------------------------------------------------


@pytest.mark.parametrize("rpc", ["Predict", "PredictBatch", "PredictStream"])
def test_grpcio_clients_sending_gzip_get_predictions(
    server: ServerProcess, digits: Digits, rpc: str
) -> None:
    image = image_message(encode(digits.seven, "PNG"))
    with grpc.insecure_channel(server.address, compression=grpc.Compression.Gzip) as channel:
        if rpc == "Predict":
            labels = [MnistPrediction.parse(call(channel, PREDICT, image)).label]
        elif rpc == "PredictBatch":
            reply = call(channel, BATCH, (b"\x0a" + varint(len(image)) + image) * 3)
            results = PredictBatchResponse.parse(reply).results
            labels = [item.prediction.label for item in results]  # type: ignore[union-attr]
        else:
            replies = channel.stream_stream(STREAM)(iter([image] * 3), timeout=30)
            labels = [StreamPrediction.parse(reply).prediction.label for reply in replies]  # type: ignore[union-attr]
    assert labels == [7] * (1 if rpc == "Predict" else 3)


def test_a_10000_image_stream_with_every_tenth_item_bad_answers_each_in_order(
    channel: grpc.Channel, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    bad = [b"", MARKER, bytes(785), half(png_bytes(images[0])), png_declaring(100_000, 100_000)]

    def requests() -> Iterator[bytes]:
        for index in range(10_000):
            if index % 10 == 9:
                yield image_message(bad[index // 10 % len(bad)])
            else:
                yield image_message(png_bytes(images[index]))

    replies = [
        StreamPrediction.parse(reply)
        for reply in channel.stream_stream(STREAM)(requests(), timeout=300)
    ]

    assert [reply.index for reply in replies] == list(range(10_000))
    errors = [reply for reply in replies if reply.error is not None]
    assert [reply.index for reply in errors] == list(range(9, 10_000, 10))
    for reply in errors:
        assert reply.error is not None
        assert reply.error.code == Status.INVALID_ARGUMENT.value
        assert reply.error.message
        assert not PYTHON_TEXT.search(reply.error.message), reply.error.message
    good = [reply for reply in replies if reply.error is None]
    assert all(reply.prediction is not None for reply in good)
    correct = sum(
        reply.prediction is not None and reply.prediction.label == labels[reply.index]
        for reply in good
    )
    assert correct / len(good) > 0.98
    assert_still_serving(channel, mnist_test_set)
