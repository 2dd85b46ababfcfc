"""Property-based fuzzing: random and mutated bytes through every layer that parses a request.

Whatever the bytes, image decoding and preprocessing (`engine.preprocess`), the protobuf wire
codec (`transport.wire`) and the message codec's read path (`transport.codec.read_message`,
over grpclib's own HTTP/2 stream buffer) give a value or one of the domain errors of
`mnist_service.errors`: never another exception. Seeds are valid inputs (every image format,
raw pixels, protobuf messages, gRPC frames, gzip ones included) that hypothesis cuts, flips
and splices. Derandomised, no example database: CI runs the same examples every time.
"""

from __future__ import annotations

import asyncio
import gzip
import io
import struct
from typing import Any

import numpy as np
import pytest
from grpclib.exceptions import GRPCError
from grpclib.protocol import Buffer
from grpclib.protocol import Stream as H2Stream
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from mnist_service._proto.mnist import MnistImage, ModelInfoRequest, PredictBatchRequest
from mnist_service.constants import IMAGE_SIZE, PIXELS
from mnist_service.engine.preprocess import preprocess
from mnist_service.errors import InvalidImageError, MnistServiceError
from mnist_service.status import STATUS_FOR_ERROR
from mnist_service.transport.codec import SizeLimitedCodec, read_message
from mnist_service.transport.wire import WireFormatError, decode_message

from .test_message_limits import varint

FUZZ = settings(
    derandomize=True,
    database=None,
    deadline=None,
    max_examples=400,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
MAX_PIXELS = 512 * 512


def _seven(fmt: str, mode: str = "L") -> bytes:
    image = Image.new("L", (60, 40), 255)
    ImageDraw.Draw(image).line([(10, 5), (50, 5), (25, 35)], fill=0, width=4)
    buffer = io.BytesIO()
    image.convert(mode).save(buffer, format=fmt)
    return buffer.getvalue()


IMAGE_SEEDS = [
    _seven("PNG"),
    _seven("PNG", "RGBA"),
    _seven("JPEG"),
    _seven("JPEG", "CMYK"),
    _seven("GIF"),
    _seven("BMP", "1"),
    _seven("WEBP"),
    _seven("TIFF", "RGB"),
    np.random.default_rng(0).bytes(PIXELS),  # raw 28x28 pixels
]


def _field(number: int, payload: bytes) -> bytes:
    return bytes([number << 3 | 2]) + varint(len(payload)) + payload


MESSAGE_SEEDS: list[tuple[type[Any], bytes]] = [
    (MnistImage, _field(1, IMAGE_SEEDS[0])),
    (MnistImage, b"\x98\x06\x01" + _field(1, b"\x01\x02") + b"\x25\x00\x00\x00\x00"),
    (PredictBatchRequest, _field(1, _field(1, IMAGE_SEEDS[4])) * 3),
    (PredictBatchRequest, _field(1, b"") + _field(2, b"x")),
    (ModelInfoRequest, b""),
    (ModelInfoRequest, b"\x08\x01\x11" + bytes(8)),
]


@st.composite
def mutated(draw: st.DrawFn, seeds: list[bytes]) -> bytes:
    """A seed cut short, with bytes overwritten, inserted or deleted, or spliced to another."""
    data = bytearray(draw(st.sampled_from(seeds)))
    for _ in range(draw(st.integers(0, 6))):
        action = draw(st.sampled_from(["set", "insert", "delete", "cut", "splice"]))
        position = draw(st.integers(0, max(len(data) - 1, 0)))
        if action == "set" and data:
            data[position] = draw(st.integers(0, 255))
        elif action == "insert":
            data[position:position] = draw(st.binary(min_size=1, max_size=8))
        elif action == "delete":
            del data[position : position + draw(st.integers(1, 8))]
        elif action == "cut":
            del data[position:]
        elif action == "splice":
            other = draw(st.sampled_from(seeds))
            data[position:] = other[draw(st.integers(0, len(other))) :]
    return bytes(data)


def assert_explains(error: Exception) -> None:
    """A domain error's message is a sentence of ours, not Python's."""
    assert str(error)
    assert "Error" not in str(error)


def assert_from_the_error_map(error: GRPCError) -> None:
    """Raised by the one error map, from a domain error, with that error's status."""
    assert isinstance(error.__cause__, MnistServiceError), repr(error.__cause__)
    assert error.status in STATUS_FOR_ERROR.values()
    assert error.message == str(error.__cause__)


def _check_model_input(out: np.ndarray) -> None:
    assert out.shape == (1, IMAGE_SIZE, IMAGE_SIZE)
    assert out.dtype == np.float32
    assert np.isfinite(out).all()
    assert 0 <= out.min() <= out.max() <= 1


# --- decoding and preprocessing -------------------------------------------------------------


@FUZZ
@given(st.one_of(st.binary(max_size=3000), mutated(IMAGE_SEEDS)))
def test_any_image_bytes_give_a_model_input_or_an_invalid_image_error(data: bytes) -> None:
    try:
        out = preprocess(data, max_pixels=MAX_PIXELS)
    except InvalidImageError as exc:
        assert_explains(exc)
    else:
        _check_model_input(out)


# --- the wire codec -------------------------------------------------------------------------

MESSAGE_TYPES = [MnistImage, PredictBatchRequest, ModelInfoRequest]


@FUZZ
@given(
    st.one_of(
        st.tuples(st.sampled_from(MESSAGE_TYPES), st.binary(max_size=300)),
        st.sampled_from(MESSAGE_SEEDS).flatmap(
            lambda seed: st.tuples(st.just(seed[0]), mutated([seed[1]]))
        ),
    )
)
def test_any_message_bytes_decode_or_raise_a_wire_format_error(
    case: tuple[type[Any], bytes],
) -> None:
    message_type, data = case
    message: Any = None
    try:
        message = decode_message(data, message_type)
    except WireFormatError as exc:
        assert_explains(exc)
    else:
        assert type(message) is message_type
    if isinstance(message, MnistImage) and message.data:
        assert message.data in data  # the last field 1, never bytes from elsewhere
    if isinstance(message, PredictBatchRequest):
        assert all(type(image) is MnistImage for image in message.images)


# --- the message codec's read path ----------------------------------------------------------


class _Connection:
    """What `read_message` needs of a connection: a key for its per-connection budget."""


def _stream(data: bytes, encoding: str | None) -> H2Stream:
    """grpclib's HTTP/2 stream with `data` already received and the client's side ended."""
    stream = H2Stream(_Connection(), None, None)  # type: ignore[arg-type]
    stream.buffer = Buffer(lambda size: None)
    if data:
        stream.buffer.add(data, len(data))
    stream.buffer.eof()
    stream.headers = [] if encoding is None else [("grpc-encoding", encoding)]
    return stream


def _framed(body: bytes, *, compressed: bool = False) -> bytes:
    return struct.pack(">?I", compressed, len(body)) + body


FRAME_SEEDS = [
    _framed(MESSAGE_SEEDS[0][1]) * 2,
    _framed(gzip.compress(MESSAGE_SEEDS[0][1]), compressed=True),
    _framed(gzip.compress(bytes(100_000)), compressed=True),  # inflates past the limit
    _framed(MESSAGE_SEEDS[1][1]) + _framed(gzip.compress(b""), compressed=True),
]


async def _read_all(stream: H2Stream, codec: SizeLimitedCodec) -> list[Any]:
    messages = []
    while (message := await read_message(stream, codec, MnistImage)) is not None:
        messages.append(message)
    return messages


@FUZZ
@given(
    data=st.one_of(st.binary(max_size=200), mutated(FRAME_SEEDS)),
    encoding=st.sampled_from([None, "gzip", "identity", "deflate", "gzip;q=1", ""]),
)
def test_any_request_stream_gives_messages_or_a_domain_error(
    data: bytes, encoding: str | None
) -> None:
    codec = SizeLimitedCodec(20_000, max_message_seconds=1)
    try:
        messages = asyncio.run(_read_all(_stream(data, encoding), codec))
    except GRPCError as exc:
        assert_from_the_error_map(exc)
    else:
        assert all(type(message) is MnistImage for message in messages)


@pytest.mark.parametrize("encoding", ["gzip", None])
def test_the_fuzzed_read_path_reads_valid_frames(encoding: str | None) -> None:
    """The property above is not vacuous: its seeds read as messages."""
    codec = SizeLimitedCodec(20_000)
    seed = FRAME_SEEDS[1] if encoding == "gzip" else FRAME_SEEDS[0]

    messages = asyncio.run(_read_all(_stream(seed, encoding), codec))

    assert [message.data for message in messages] == [IMAGE_SEEDS[0]] * (2 - (encoding == "gzip"))
