"""The protobuf codec the server uses: size-checked decoding of requests."""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec

from ..api.status import as_grpc_errors
from ..errors import MessageTooLargeError


class SizeLimitedCodec(ProtoCodec):
    """The protobuf codec, refusing request messages over `Limits.max_message_bytes`."""

    def __init__(self, max_message_bytes: int) -> None:
        self._max_message_bytes = max_message_bytes

    def decode(self, data: bytes, message_type: Any) -> Any:
        """Parse one message after checking its size."""
        if len(data) > self._max_message_bytes:
            with as_grpc_errors():
                raise MessageTooLargeError(
                    f"request message is {len(data)} bytes; "
                    f"the limit is {self._max_message_bytes} bytes"
                )
        return super().decode(data, message_type)
