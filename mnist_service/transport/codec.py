"""The protobuf codec the server uses: size-checked, strict decoding and fast encoding.

The hot message types go through `transport.wire` (betterproto2 is slow on the hot path and
lax about malformed input); every other type through betterproto2, as grpclib's `ProtoCodec`
does it (`SerializeToString` / `FromString`).
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from ..api.status import as_grpc_errors
from ..errors import MalformedMessageError, MessageTooLargeError
from .wire import WireFormatError, decode_message, encode_message


class SizeLimitedCodec(ProtoCodec):
    """The protobuf codec, refusing request messages over `Limits.max_message_bytes`."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes

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
