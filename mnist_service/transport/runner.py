"""The one call runner: every RPC the server accepts runs through `run_call`.

Unary, server-streaming, client-streaming and bidi calls, on every service (`mnist.Mnist`,
the Open Inference Protocol, health, reflection), get the same eight behaviours, here once:

1. **the call record**: a `calls.Call`, opened when the call's headers arrive, made current
   for its handler, ended with the status the client was told and handed to the observer
   (the request log, metrics);
2. **the expiry check**: a call that waited past its deadline is answered DEADLINE_EXCEEDED
   without running its handler;
3. **deadline and cancel**: at the deadline the handler is cancelled and the call ends
   DEADLINE_EXCEEDED (the deadline runs from the call's arrival); a client's RST_STREAM or a
   lost connection cancels it and nothing is sent (CANCELLED);
4. **errors to statuses**: a `GRPCError` becomes trailers with its status and message
   (trailers-only when nothing was sent yet); anything else is logged and answered UNKNOWN
   (the services map their domain errors first, `mnist_service.status`);
5. **response headers**: `grpc-accept-encoding: gzip` and the call's `x-request-id`;
6. **size-limited reads** (`codec.read_message`): a message announced over the limit is
   refused from its prefix; streaming calls' reads end when the drain starts
   (`drain.StreamReads`), and their trailers then say `mnist-draining: true`;
7. **a missing request message** on a unary-request call is INVALID_ARGUMENT;
8. **the reset after trailers**: if the client's side of the stream is still open, a
   RST_STREAM NO_ERROR tells it to stop sending, as grpc-core and grpc-go do.

How the handler is called is the only thing that differs. A unary method of a betterproto2
service is called with its request message and returns its reply (`Method.unary`), and the
answer is written as headers, data and trailers straight to the HTTP/2 stream. Every other
handler (streaming methods, grpclib's health and reflection services) is written against
grpclib's `grpclib.server.Stream` interface and gets a `ServerStream`, which offers it on
top of the same reads and writes.

grpclib provides the HTTP/2 layer under this: `grpclib.protocol.Stream` (`recv_data`,
`send_headers`, `send_data`, `reset_nowait`, `closable`, `wrapper`), its `Deadline` and
deadline `Wrapper`s, and the codec. Nothing here reaches past their public names.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import nullcontext
from typing import Any, NamedTuple

import betterproto2.grpclib
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE, CodecBase
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from grpclib.metadata import Deadline, decode_metadata, encode_grpc_message, encode_metadata
from grpclib.protocol import Stream as H2Stream
from grpclib.stream import recv_message
from grpclib.utils import DeadlineWrapper
from h2.exceptions import StreamClosedError
from hpack import NeverIndexedHeaderTuple
from multidict import MultiDict

from .. import _compat
from ..calls import REQUEST_ID_HEADER, Call, CallObserver, enter, observe
from .codec import ACCEPT_ENCODING, SizeLimitedCodec, read_message, refuse_missing_message
from .drain import DRAINING_TRAILER, StreamReads

log = logging.getLogger(__name__)

__all__ = ["Method", "ServerStream", "methods", "run_call"]

_FRAME = struct.Struct(">?I")

UnaryFunc = Callable[[Any], Awaitable[Any]]
StreamHandler = Callable[["ServerStream"], Awaitable[None]]


class Method(NamedTuple):
    """One RPC the server serves."""

    path: str
    """`/package.Service/Method`."""
    cardinality: Cardinality
    request_type: type[Any]
    reply_type: type[Any]
    handler: StreamHandler
    """The handler as grpclib's services are written: it reads and writes a stream."""
    unary: UnaryFunc | None = None
    """For a unary method of a betterproto2 service: request message -> reply message."""


def methods(services: Iterable[Any]) -> dict[str, Method]:
    """The methods of grpclib-servable services (a `__mapping__` each), by path.

    A unary method of a betterproto2 service is also found by its Python name (betterproto2
    names the handler of `/pkg.Service/PredictBatch` `predict_batch`), so it can be called
    with its message rather than through a stream.
    """
    found: dict[str, Method] = {}
    for service in services:
        direct = isinstance(service, betterproto2.grpclib.ServiceBase)
        for path, handler in service.__mapping__().items():
            unary = None
            if direct and handler.cardinality is Cardinality.UNARY_UNARY:
                unary = getattr(service, _python_name(path))
            found[path] = Method(
                path, handler.cardinality, handler.request_type, handler.reply_type,
                handler.func, unary,
            )  # fmt: skip
    return found


def _python_name(path: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", path.rpartition("/")[2]).lower()


def request_id_header(call: Call) -> tuple[str, str]:
    """The `x-request-id` response header, never indexed by HPACK: each value is new, and
    indexing it would only push the headers that do repeat out of both sides' tables."""
    header: tuple[str, str] = NeverIndexedHeaderTuple(REQUEST_ID_HEADER, call.request_id)  # type: ignore[assignment]
    return header


class ServerStream:
    """A call's stream as grpclib's handlers use it (`grpclib.server.Stream`'s interface:
    receive and send messages, initial and trailing metadata), over the runner's reads and
    writes: size-limited reads that end with the drain, our response headers, no events."""

    __slots__ = (
        "_call",
        "_codec",
        "_headers",
        "_method",
        "_reads",
        "_stream",
        "deadline",
        "drained",
        "initial_sent",
        "message_sent",
        "trailers_sent",
    )

    def __init__(
        self,
        stream: H2Stream,
        method: Method,
        codec: CodecBase,
        call: Call,
        headers: list[tuple[str, str]],
        reads: StreamReads | None,
    ) -> None:
        self._stream = stream
        self._method = method
        self._codec = codec
        self._call = call
        self._headers = headers
        self._reads = reads
        self.deadline = Deadline.from_headers(headers)
        self.drained = False
        self.initial_sent = False
        self.message_sent = False
        self.trailers_sent = False

    @property
    def metadata(self) -> MultiDict[str | bytes]:
        """The client's invocation metadata (its custom headers)."""
        return decode_metadata(self._headers)

    @property
    def user_agent(self) -> str | None:
        """The client's user-agent header."""
        return next((v for k, v in self._headers if k == "user-agent"), None)

    @property
    def peer(self) -> Any:
        """The connection's peer (`grpclib.protocol.Peer`)."""
        return self._stream.connection.get_peer()

    async def recv_message(self) -> Any:
        """The next request message, or None at the end of the client's stream (or, for a
        client-streaming call, once the drain has started)."""
        if self._reads is None:
            message = await self._read()
        else:
            message = await self._reads.read(self._read)
            if message is None and self._reads.stopped:
                self.drained = True
        if message is None and not self._method.cardinality.client_streaming:
            refuse_missing_message()
        return message

    async def _read(self) -> Any:
        return await _read(self._stream, self._codec, self._method.request_type)

    def __aiter__(self) -> AsyncIterator[Any]:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    async def send_initial_metadata(self, *, metadata: Any = None) -> None:
        """The response headers, with `metadata` (sent with the first message if not before)."""
        if self.initial_sent:
            raise ProtocolError("Initial metadata was already sent")
        headers = _response_headers(self._codec, self._call)
        if metadata:
            headers.extend(encode_metadata(MultiDict(metadata)))
        self.initial_sent = True
        await self._stream.send_headers(headers)

    async def send_message(self, message: Any) -> None:
        """One reply message (the only one, on a unary-response call)."""
        if not self.initial_sent:
            await self.send_initial_metadata()
        if self.message_sent and not self._method.cardinality.server_streaming:
            raise ProtocolError("Message was already sent")
        body = self._codec.encode(message, self._method.reply_type)
        self.message_sent = True
        data = _FRAME.pack(False, len(body)) + body
        if not _compat.write_answer(self._stream, None, data, None):  # a full window or socket
            await self._stream.send_data(data)

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: Any = None,
    ) -> None:
        """The trailers: the status (and `metadata`), ending the call. Status details are not
        sent (no service of ours gives any)."""
        if self.trailers_sent:
            raise ProtocolError("Trailing metadata was already sent")
        if (
            status is Status.OK
            and not self.message_sent
            and not self._method.cardinality.server_streaming
        ):
            raise ProtocolError("Unary response with OK status requires a single message")
        self._call.end(status, status_message)
        extra = list(encode_metadata(MultiDict(metadata))) if metadata else []
        await _send_trailers(self._stream, self._codec, self._call, self.initial_sent, extra)
        self.trailers_sent = True

    async def cancel(self) -> None:
        """Reset the stream: the client learns that no answer will come."""
        await self._stream.reset()

    async def finish(self) -> None:
        """After the handler returned: the trailers it did not send itself."""
        if self.trailers_sent:
            return
        if not self.message_sent and not self._method.cardinality.server_streaming:
            log.error("%s returned without an answer", self._method.path)
            raise GRPCError(Status.UNKNOWN, "Internal Server Error")
        metadata = {DRAINING_TRAILER: "true"} if self.drained else None
        await self.send_trailing_metadata(metadata=metadata)


async def run_call(
    call: Call,
    method: Method,
    stream: H2Stream,
    headers: list[tuple[str, str]],
    codec: CodecBase,
    release: Callable[[], None],
    observer: CallObserver,
    reads: StreamReads | None,
    flush_if_last: Callable[[], None],
) -> None:
    """Serve one call to its end (see the module's docstring): `reads` end streaming calls'
    requests in a drain; `flush_if_last` is the connection's (`CoalescingTransport`), so a
    lone call's answer leaves at once. A status already on `call` (a malformed deadline)
    answers it with that status without running it."""
    streamed: ServerStream | None = None
    try:
        if call.status is not Status.OK:
            await _send_trailers(stream, codec, call, False)
            return
        if call.expired:  # it waited past its deadline: no work for an answer nobody awaits
            call.end(Status.DEADLINE_EXCEEDED)
            await _send_trailers(stream, codec, call, False)
            return
        enter(call)
        # A client's reset or a lost connection cancels the call's task (`Handler.cancel`,
        # `Handler.close`); a deadline needs grpclib's timer, which cancels it too.
        wrapper: Any = nullcontext()
        limit: Any = nullcontext()
        if call.expires_at is not None:
            wrapper = stream.wrapper = DeadlineWrapper()
            limit = wrapper.start(Deadline.from_timeout(call.expires_at - time.monotonic()))
        try:
            with limit, wrapper:
                if method.unary is not None:
                    await _unary(call, method, method.unary, stream, codec)
                else:
                    client_streaming = method.cardinality.client_streaming
                    streamed = ServerStream(
                        stream, method, codec, call, headers, reads if client_streaming else None
                    )
                    await method.handler(streamed)
                    await streamed.finish()
        except GRPCError as exc:
            await _fail(stream, codec, call, streamed, exc.status, exc.message)
        except TimeoutError:
            # The deadline fired while the handler ran (`wrapper.cancelled`), or passed just
            # before the timer could start (grpclib's `start` raises then).
            if not (getattr(wrapper, "cancelled", False) or call.expired):
                raise
            await _fail(stream, codec, call, streamed, Status.DEADLINE_EXCEEDED)
        except StreamTerminatedError:
            call.end(Status.CANCELLED)  # the client cancelled, or the connection is gone
        except Exception:
            log.exception("Application error")
            await _fail(stream, codec, call, streamed, Status.UNKNOWN, "Internal Server Error")
    except (StreamClosedError, StreamTerminatedError):
        call.end(Status.CANCELLED)  # the client reset the stream or left while we answered
    except asyncio.CancelledError:
        # the client reset the stream (`Handler.cancel`), or the connection or server closes
        call.end(Status.CANCELLED)
        raise
    finally:
        release()
        observe(observer, call)
        flush_if_last()  # one call in flight: its answer leaves now, not a turn later


async def _fail(
    stream: H2Stream,
    codec: CodecBase,
    call: Call,
    streamed: ServerStream | None,
    status: Status,
    message: str | None = None,
) -> None:
    """End the call with `status`: in its trailers, unless the handler sent them already."""
    if streamed is not None and streamed.trailers_sent:
        return  # what the client was told stands (grpclib does the same)
    call.end(status, message)
    await _send_trailers(stream, codec, call, streamed is not None and streamed.initial_sent)


async def _unary(
    call: Call, method: Method, func: UnaryFunc, stream: H2Stream, codec: CodecBase
) -> None:
    """A unary call to a function of its request message: read, call, answer."""
    request = await _read(stream, codec, method.request_type)
    if request is None:
        refuse_missing_message()
    reply = await func(request)
    body = codec.encode(reply, method.reply_type)
    data = _FRAME.pack(False, len(body)) + body
    headers = _response_headers(codec, call)
    if not _compat.write_answer(stream, headers, data, _OK):  # a big answer, or a full socket
        await stream.send_headers(headers)
        await stream.send_data(data)
        await stream.send_headers(_OK, end_stream=True)
    if stream.closable:
        stream.reset_nowait()


_OK = [("grpc-status", "0")]


def _response_headers(codec: CodecBase, call: Call) -> list[tuple[str, str]]:
    subtype = codec.__content_subtype__
    head = _HEADS.get(subtype)
    if head is None:
        head = _HEADS[subtype] = ((":status", "200"), ("content-type", content_type(codec)),
                                  ACCEPT_ENCODING)  # fmt: skip
    return [*head, request_id_header(call)]


_HEADS: dict[str, tuple[tuple[str, str], ...]] = {}
"""The response headers every call of a codec starts with, by its content subtype."""


async def _send_trailers(
    stream: H2Stream,
    codec: CodecBase,
    call: Call,
    after_headers: bool,
    extra: list[tuple[str, str]] | None = None,
) -> None:
    """The trailers with the call's status, ending the stream (trailers-only when no headers
    were sent); then a reset if the client's side is still open."""
    trailers = [] if after_headers else _response_headers(codec, call)
    trailers.append(("grpc-status", str(call.status.value)))
    if call.message is not None:
        trailers.append(("grpc-message", encode_grpc_message(call.message)))
    if extra:
        trailers.extend(extra)
    await stream.send_headers(trailers, end_stream=True)
    if stream.closable:
        stream.reset_nowait()


async def _read(stream: H2Stream, codec: CodecBase, message_type: Any) -> Any:
    if isinstance(codec, SizeLimitedCodec):
        return await read_message(stream, codec, message_type)  # refuses oversize from the prefix
    return await recv_message(stream, codec, message_type)


def content_type(codec: CodecBase) -> str:
    """The response's content-type for `codec`."""
    return f"{GRPC_CONTENT_TYPE}+{codec.__content_subtype__}"
