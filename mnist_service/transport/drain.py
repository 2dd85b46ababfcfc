"""The HTTP/2 side of a drain: the two-step GOAWAY, and streaming calls told to stop reading.

A gRPC server that drains sends, on every connection, a first GOAWAY with the largest stream
id (2^31-1, "no new streams, please") and a PING; once the PING is answered (so every stream
the client opened before it saw the GOAWAY has arrived) or a short time has passed, a second
GOAWAY names the real last stream id. Streams above it get RST_STREAM REFUSED_STREAM, which
grpcio retries transparently on another connection.

The frames are written raw: h2's `close_connection()` would move its state machine to CLOSED,
and it would then refuse the frames of the calls still running (their request data, the
client's window updates).

A streaming call (PredictStream) stops reading requests when the drain starts: its handler
sees the end of the request stream, answers what it has read, and the call ends with OK and
the trailing metadata `mnist-draining: true`. Items the server never read are not answered;
a client resends them (from the first unanswered index) on a new connection.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from h2.errors import ErrorCodes
from hyperframe.frame import GoAwayFrame, PingFrame

T = TypeVar("T")

DRAINING_TRAILER = "mnist-draining"
"""Trailing metadata key on a streaming call the server ended because it drains."""
MAX_STREAM_ID = 2**31 - 1
DRAIN_PING = b"mnist-gw"
"""The opaque data of the PING sent with the first GOAWAY (8 bytes, as HTTP/2 requires)."""


def goaway_frame(
    last_stream_id: int, error_code: ErrorCodes = ErrorCodes.NO_ERROR, debug: bytes = b""
) -> bytes:
    """A GOAWAY frame with `error_code` (NO_ERROR) and `last_stream_id`, serialised."""
    frame = GoAwayFrame(
        0, last_stream_id=last_stream_id, error_code=error_code, additional_data=debug
    )
    return bytes(frame.serialize())


def ping_frame(data: bytes = DRAIN_PING) -> bytes:
    """A PING frame (not an ack) carrying `data`, serialised."""
    return bytes(PingFrame(0, opaque_data=data).serialize())


class StreamReads:
    """The request reads of streaming calls, which `stop` ends as if the client had finished.

    A read waiting for the client's next message when the drain starts is cancelled and
    returns None; no task is created per read.
    """

    def __init__(self) -> None:
        self.stopped = False
        self._waiting: set[asyncio.Task[object]] = set()

    async def read(self, read: Callable[[], Awaitable[T]]) -> T | None:
        """`read()`, or None once stopped (the caller then sees the end of its requests)."""
        if self.stopped:
            return None
        task = asyncio.current_task()
        assert task is not None
        self._waiting.add(task)
        try:
            return await read()
        except asyncio.CancelledError:
            # Cancelled by `stop` (and nothing else): the end of this call's requests.
            if self.stopped and task.uncancel() == 0:
                return None
            raise
        finally:
            self._waiting.discard(task)

    @property
    def waiting(self) -> int:
        """How many reads are waiting for a message."""
        return len(self._waiting)

    def stop(self) -> None:
        """End every streaming call's requests: waiting reads return None, later ones too."""
        self.stopped = True
        for task in self._waiting:
            task.cancel()
