"""A grpclib client `Channel` whose close can be awaited until its connection is gone.

grpclib's `Channel.close()` only starts closing. A plaintext socket closes on the next loop
turn, but a TLS connection first exchanges close_notify with the server, and an event loop
that ends before then leaves the socket open (a ResourceWarning, and a file descriptor held
until the collector runs). `aclose` waits for the connection to be lost, and aborts it if
the server does not answer in time.

This relies on grpclib 0.4.9's `Channel._protocol_factory` and `Channel._protocol`.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.client
from grpclib.protocol import H2Protocol

CLOSE_TIMEOUT_S = 1.0
"""How long `aclose` waits for the server's side of a TLS close before aborting."""


class _Protocol(H2Protocol):
    """grpclib's client protocol, remembering its transport and when the connection ended."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.lost = asyncio.Event()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport (to abort it), then let grpclib set up HTTP/2."""
        self.transport = transport
        super().connection_made(transport)

    def connection_lost(self, exc: BaseException | None) -> None:
        """The socket is closed: grpclib ends its streams, and `aclose` may return."""
        super().connection_lost(exc)
        self.lost.set()


class Channel(grpclib.client.Channel):
    """`grpclib.client.Channel` with `aclose`, which returns once the connection is closed."""

    def _protocol_factory(self) -> H2Protocol:
        # grpclib's own factory, with the protocol that reports its end.
        return _Protocol(grpclib.client.Handler(), self._config, self._h2_config)

    async def aclose(self, timeout: float = CLOSE_TIMEOUT_S) -> None:
        """Close, and wait until the socket is closed (aborting it after `timeout` seconds)."""
        protocol = self._protocol  # None when never connected
        self.close()
        if not isinstance(protocol, _Protocol):
            return
        try:
            await asyncio.wait_for(protocol.lost.wait(), timeout)
        except TimeoutError:
            if protocol.transport is not None:
                protocol.transport.abort()  # type: ignore[attr-defined]  # a stream transport
