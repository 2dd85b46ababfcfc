"""One socket write per event-loop turn and connection, instead of one per frame.

grpclib writes a call's headers, data and trailers with a `transport.write` each, and every
concurrent call does the same. `CoalescingTransport` buffers a connection's writes and sends
them together when the loop turn that made them ends (a `call_soon` flush), or at once when a
unary call's answer is complete and nothing else is queued to run in this turn
(`flush_if_last`): then nothing could join the write, and waiting a turn only adds latency.
"""

from __future__ import annotations

import asyncio
from typing import Any

from .. import _compat

__all__ = ["CoalescingTransport"]


class CoalescingTransport:
    """Proxy of an asyncio transport that joins the writes of one loop turn into one."""

    __slots__ = ("_buffer", "_ended", "_loop", "_scheduled", "_transport")

    def __init__(self, transport: asyncio.Transport, loop: asyncio.AbstractEventLoop) -> None:
        self._transport = transport
        self._loop = loop
        self._buffer: list[bytes] = []
        self._scheduled = False
        self._ended = False

    @property
    def raw(self) -> asyncio.Transport:
        """The socket's own transport."""
        return self._transport

    def write(self, data: bytes) -> None:
        """Buffer `data`; it is sent with the rest of this loop turn's writes. Once `end` has
        run, nothing more is sent."""
        if not data or self._ended:
            return
        self._buffer.append(data)
        if not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self.flush)

    def flush(self) -> None:
        """Send what is buffered, in one write."""
        self._scheduled = False
        if not self._buffer:
            return
        data = b"".join(self._buffer) if len(self._buffer) > 1 else self._buffer[0]
        self._buffer.clear()
        if not self._transport.is_closing():
            self._transport.write(data)

    def flush_if_last(self) -> None:
        """Send what is buffered now if this turn has nothing left to run but this flush: one
        call in flight, say (`_compat.ready_callbacks`; on loops that cannot tell, such as
        uvloop, the writes wait for the flush as usual)."""
        if self._scheduled and _compat.ready_callbacks(self._loop) == 1:
            self.flush()

    def end(self) -> None:
        """Send what is buffered; later writes are dropped (the caller ends the connection)."""
        self.flush()
        self._ended = True

    def close(self) -> None:
        """Send what is buffered, then close."""
        self.end()
        self._transport.close()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)
