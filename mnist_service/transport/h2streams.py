"""How many closed streams h2 remembers on each of our connections: 1,024, not 65,536.

`h2.connection.H2Connection` keeps the id and the manner of closing (`StreamClosedBy`) of
every stream it has closed in `_closed_streams`, a `h2.utilities.SizeLimitDict` that drops
its oldest entry past `H2Connection.MAX_CLOSED_STREAMS`, 2**16. An entry is some 120 bytes
(the ordered dict's slot and link, and the stream id's int): 7.7 MB resident once a
connection has carried 65,536 calls. So a worker's memory rose for as long as its long-lived
connections had made fewer calls than that (issue 21), and 256 connections could hold 2 GB.

What h2 needs it for (h2 4.4.1, `H2Connection._receive_frame`): a frame for a stream that is
no longer open. DATA is answered with RST_STREAM and its flow-control credit returned, and
WINDOW_UPDATE, RST_STREAM and PRIORITY are dropped, whether the stream is remembered or not.
Only a HEADERS frame on a closed stream reads the memory: on a stream that we reset it gets a
RST_STREAM, otherwise (a stream that ended, or one forgotten) it is a connection error. A gRPC
client sends HEADERS only to open a stream, never on one it knows, so for gRPC the memory
decides nothing; for other HTTP/2 clients (request trailers after our reset) the late HEADERS
was in flight for about one round trip, while the client had at most 100 streams open (the
MAX_CONCURRENT_STREAMS that h2 announces and grpclib keeps). 1,024 entries keep ten times
that, at about 0.17 MB a connection (45 MB for `--max-connections` 256).

Relies on h2's `H2Connection._closed_streams` and `h2.utilities.SizeLimitDict` (h2 is pinned
in pyproject.toml; tests/test_closed_streams.py checks the names and a real connection).
"""

from __future__ import annotations

from h2.connection import H2Connection
from h2.utilities import SizeLimitDict

__all__ = ["CLOSED_STREAMS_KEPT", "limit_closed_streams"]

CLOSED_STREAMS_KEPT = 1024
"""Closed streams each server connection remembers (h2's own default is 65,536)."""


def limit_closed_streams(connection: H2Connection, kept: int = CLOSED_STREAMS_KEPT) -> None:
    """Make a new h2 connection remember only its last `kept` closed streams."""
    remembered = SizeLimitDict(size_limit=kept)
    remembered.update(connection._closed_streams)  # empty on a new connection
    connection._closed_streams = remembered
