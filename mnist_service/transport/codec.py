"""The protobuf codec the server uses: size-checked, strict decoding and fast encoding.

The hot message types go through `transport.wire` (betterproto2 is slow on the hot path and
lax about malformed input); every other type through betterproto2, as grpclib's `ProtoCodec`
does it (`SerializeToString` / `FromString`).

`read_message` reads one request message off an HTTP/2 stream the way grpclib's
`grpclib.stream.recv_message` does, except that it checks the 5-byte gRPC prefix first: a
message announced over the size limit is refused before a byte of its body is read, so the
body stays in the client (HTTP/2 flow control holds it back once the stream's window, set in
the server's `Configuration`, is full). grpclib would buffer whatever was announced.

A message with the compressed flag is inflated when the call's `grpc-encoding` is gzip, at
most one byte past the size limit: what it inflates to counts against the limit, so a gzip
bomb costs the limit and no more. Other encodings are UNIMPLEMENTED; the flag without an
encoding, or a body that does not inflate, INTERNAL (as grpc-go, grpc-java and grpc core
answer). The uncompressed path pays one flag check for all this.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import zlib
from typing import Any, NoReturn
from weakref import WeakKeyDictionary

from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import Connection
from grpclib.protocol import Stream as H2Stream

from ..config import Limits
from ..errors import (
    CompressionError,
    MalformedMessageError,
    MessageTooLargeError,
    MnistServiceError,
    SlowMessageError,
    UnsupportedEncodingError,
)
from ..status import as_grpc_errors
from .wire import WireFormatError, decode_message, encode_message

log = logging.getLogger(__name__)

_PREFIX = struct.Struct(">?I")

ACCEPT_ENCODING = ("grpc-accept-encoding", "gzip")
"""The response header that tells clients which request encodings the server inflates."""


class SizeLimitedCodec(ProtoCodec):
    """The protobuf codec, refusing request messages over `Limits.max_message_bytes`; it also
    carries the limits `read_message` applies (see `config.Limits`)."""

    def __init__(
        self,
        max_message_bytes: int,
        *,
        max_connection_bytes: int | None = None,
        max_message_seconds: float | None = None,
    ) -> None:
        # Unset limits take `Limits`' own defaults, so the rules live in one place.
        defaults = Limits(max_message_bytes=max_message_bytes)
        self._max_message_bytes = max_message_bytes
        self.max_connection_bytes = max_connection_bytes or defaults.connection_bytes
        self.max_message_seconds = max_message_seconds or defaults.max_message_seconds

    @property
    def max_message_bytes(self) -> int:
        """The largest request message accepted."""
        return self._max_message_bytes

    def encode(self, message: Any, message_type: Any) -> bytes:
        """Serialise one message (the same bytes as betterproto2's)."""
        # An exact type match passes ProtoCodec's isinstance check; anything else takes its path.
        if type(message) is message_type:
            encoded = encode_message(message)
            if encoded is not None:
                return encoded
        return super().encode(message, message_type)

    def decode(self, data: bytes, message_type: Any) -> Any:
        """Parse one message after checking its size."""
        with as_grpc_errors():
            if len(data) > self._max_message_bytes:
                raise MessageTooLargeError(
                    f"request message is {len(data)} bytes; "
                    f"the limit is {self._max_message_bytes} bytes"
                )
            try:
                message = decode_message(data, message_type)
            except WireFormatError as exc:
                raise MalformedMessageError(
                    f"malformed {message_type.__name__} message: {exc}"
                ) from exc
        if message is None:
            return self._decode_other(data, message_type)
        return message

    def _decode_other(self, data: bytes, message_type: Any) -> Any:
        """A message of a type `wire` does not know (health, reflection), parsed by its own
        library; whatever that raises on bad bytes is INVALID_ARGUMENT, not its text."""
        try:
            return super().decode(data, message_type)
        except Exception as exc:
            log.debug("undecodable %s message: %r", message_type.__name__, exc)
            _refuse(MalformedMessageError(f"malformed {message_type.__name__} message"))


async def read_message(stream: H2Stream, codec: SizeLimitedCodec, message_type: Any) -> Any | None:
    """The next request message on `stream`, or None at the end of the client's stream.

    Before its body is read, a message must fit `max_message_bytes`. A body over 64 KiB must
    also fit its connection's budget: the big messages of one connection being received at
    once may not exceed `max_connection_bytes`, so a client opening many streams cannot
    multiply the limit; and it must arrive within `max_message_seconds`, so a slow sender
    cannot hold its share of memory for long.
    """
    prefix = await _read(stream, _PREFIX.size, "a gRPC message prefix")
    if not prefix:
        return None
    compressed, length = _PREFIX.unpack(prefix)
    if compressed:
        _check_encoding(stream)
    if length > codec.max_message_bytes:
        _refuse(
            MessageTooLargeError(
                f"request message is {length} bytes; the limit is {codec.max_message_bytes} bytes"
            )
        )
    if length <= _UNTRACKED_BYTES:  # a frame or four: arrives at once from any sane client
        body = await _read(stream, length, f"a {length}-byte message")
        if compressed:
            body = _inflate(body, codec.max_message_bytes)
        return codec.decode(body, message_type)
    connection = stream.connection
    arriving = _arriving.get(connection, 0)
    if arriving + length > codec.max_connection_bytes:
        _refuse(
            MessageTooLargeError(
                f"request message is {length} bytes, and this connection already has {arriving}"
                f" bytes of messages arriving; the limit is {codec.max_connection_bytes} bytes"
            )
        )
    _arriving[connection] = arriving + length
    try:
        async with asyncio.timeout(codec.max_message_seconds):
            body = await _read(stream, length, f"a {length}-byte message")
    except TimeoutError:
        _refuse(
            SlowMessageError(
                f"the {length}-byte request message did not arrive within"
                f" {codec.max_message_seconds:g} s"
            )
        )
    finally:
        _arriving[connection] -= length
    if compressed:
        body = _inflate(body, codec.max_message_bytes)
    return codec.decode(body, message_type)


SUPPORTED_ENCODINGS = "gzip and identity"
_ENCODING_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")


def _check_encoding(stream: H2Stream) -> None:
    """Refuse a compressed message unless its call's `grpc-encoding` is gzip.

    The request headers are on `stream.headers` (set by `transport.server.Handler.accept`).
    """
    encoding = next((v for k, v in stream.headers or () if k == "grpc-encoding"), None)
    if encoding == "gzip":
        return
    if encoding is None or encoding == "identity":
        _refuse(
            CompressionError(
                "the request message is marked compressed, but the call's grpc-encoding is"
                f" {'missing' if encoding is None else 'identity'}; this server accepts"
                f" {SUPPORTED_ENCODINGS}"
            )
        )
    # The name comes from the client: echoed only when it looks like an encoding's name.
    name = repr(encoding) if _ENCODING_NAME.fullmatch(encoding) else "this encoding"
    _refuse(
        UnsupportedEncodingError(
            f"request messages compressed with {name} are not supported;"
            f" this server accepts {SUPPORTED_ENCODINGS}"
        )
    )


def _inflate(body: bytes, limit: int) -> bytes:
    """The gzip `body` inflated, never to more than `limit` + 1 bytes (gzip.decompress has no
    bound). Concatenated gzip members are one message, as RFC 1952 and Go's reader have it."""
    parts: list[bytes] = []
    size = 0
    rest = body
    while True:
        inflater = zlib.decompressobj(wbits=16 + zlib.MAX_WBITS)  # the gzip container
        try:
            part = inflater.decompress(rest, limit + 1 - size)  # max_length >= 1: 0 is unbounded
        except zlib.error as exc:
            log.debug("corrupt gzip request message: %r", exc)
            _refuse(CompressionError("the gzip request message is corrupt"))
        size += len(part)
        if size > limit:
            _refuse(
                MessageTooLargeError(
                    f"the gzip request message inflates to more than {limit} bytes;"
                    f" the limit is {limit} bytes"
                )
            )
        parts.append(part)
        if not inflater.eof:  # under the limit, so the input ran out
            _refuse(CompressionError("the gzip request message is cut short"))
        rest = inflater.unused_data
        if not rest:
            return b"".join(parts) if len(parts) > 1 else parts[0]


def refuse_missing_message() -> NoReturn:
    """Answer a unary-request call whose client ended its stream without a message."""
    _refuse(MalformedMessageError("the call carried no request message"))


def _refuse(error: MnistServiceError) -> NoReturn:
    """Raise `error` as the gRPC error the one error map gives it."""
    try:
        with as_grpc_errors():
            raise error
    finally:
        # `error` -> its traceback -> this frame -> `error` is a cycle that only the cyclic
        # collector frees, and it keeps the frames of the raising code alive, with their
        # buffers (an inflated gzip bomb: 4 MiB each) until a collection runs.
        del error


_UNTRACKED_BYTES = 64 * 1024
"""Bodies up to this size skip the budget and the timer (~10 us a message on the hot path):
with h2's 100 streams per connection they add at most 6.25 MiB to a connection's bound."""

_arriving: WeakKeyDictionary[Connection, int] = WeakKeyDictionary()
"""Bytes of request messages being received, per HTTP/2 connection."""


async def _read(stream: H2Stream, size: int, what: str) -> bytes:
    """Exactly `size` bytes, or b"" at a clean end of the client's stream."""
    try:
        return await stream.recv_data(size)
    except AssertionError:  # grpclib's Buffer, when the stream ends inside what was asked for
        _refuse(MalformedMessageError(f"the request ended inside {what}"))
