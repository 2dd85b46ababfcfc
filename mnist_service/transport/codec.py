"""The protobuf codec the server uses: size-checked, strict decoding and fast encoding.

The hot message types go through `transport.wire` (betterproto2 is slow on the hot path and
lax about malformed input); every other type through betterproto2, as grpclib's `ProtoCodec`
does it (`SerializeToString` / `FromString`).

`read_message` reads one request message off an HTTP/2 stream the way grpclib's
`grpclib.stream.recv_message` does, except that it checks the 5-byte gRPC prefix first: a
message announced over the size limit is refused before a byte of its body is read, so the
body stays in the client (HTTP/2 flow control holds it back once the stream's window, set in
the server's `Configuration`, is full). grpclib would buffer whatever was announced.
"""

from __future__ import annotations

import struct
from typing import Any

from grpclib.encoding.proto import ProtoCodec
from grpclib.protocol import Stream as H2Stream

from ..api.status import as_grpc_errors
from ..errors import MalformedMessageError, MessageTooLargeError, UnsupportedEncodingError
from .wire import WireFormatError, decode_message, encode_message

_PREFIX = struct.Struct(">?I")


class SizeLimitedCodec(ProtoCodec):
    """The protobuf codec, refusing request messages over `Limits.max_message_bytes`."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes

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
            return super().decode(data, message_type)
        return message


async def read_message(stream: H2Stream, codec: SizeLimitedCodec, message_type: Any) -> Any | None:
    """The next request message on `stream`, or None at the end of the client's stream."""
    prefix = await _read(stream, _PREFIX.size, "a gRPC message prefix")
    if not prefix:
        return None
    compressed, length = _PREFIX.unpack(prefix)
    with as_grpc_errors():
        if compressed:
            raise UnsupportedEncodingError(
                "compressed request messages are not supported; send them uncompressed"
                " (grpc-encoding: identity)"
            )
        if length > codec.max_message_bytes:
            raise MessageTooLargeError(
                f"request message is {length} bytes; the limit is {codec.max_message_bytes} bytes"
            )
    body = await _read(stream, length, f"a {length}-byte message")
    return codec.decode(body, message_type)


async def _read(stream: H2Stream, size: int, what: str) -> bytes:
    """Exactly `size` bytes, or b"" at a clean end of the client's stream."""
    try:
        return await stream.recv_data(size)
    except AssertionError:  # grpclib's Buffer, when the stream ends inside what was asked for
        with as_grpc_errors():
            raise MalformedMessageError(f"the request ended inside {what}") from None
