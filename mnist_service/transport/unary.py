"""A lean path for unary calls: what grpclib's `request_handler` does, minus what we don't use.

For each unary call grpclib builds a `grpclib.server.Stream`, dispatches four events (even
with no listener), parses and re-encodes metadata and wraps each send: about 50 us per call
at 1 in flight and 30 us at 64 on our machines, on top of HTTP/2 itself. When a call is one
of ours, has no surprises in its headers and nobody listens to grpclib's events, this path
reads the message, calls the handler with it and writes headers, data and trailers straight
to the HTTP/2 stream. Every other call takes grpclib's own path, so its behaviour stays the
reference:

- deadlines (`grpc-timeout`) are honoured as grpclib does: the handler is cancelled at the
  deadline and the call ends with DEADLINE_EXCEEDED. Unlike grpclib, the deadline runs from
  the call's arrival, not from its task's start, and a call that has waited past it is
  answered without running its handler at all;
- a client's cancel (RST_STREAM) or a lost connection cancels the handler, and nothing is
  sent;
- `GRPCError` becomes a trailers-only answer with its status and message; anything else is
  logged and answered UNKNOWN, as grpclib does (the service itself maps its errors first);
- a call without a request message is INVALID_ARGUMENT (grpclib's generated code would fail
  an assertion and answer UNKNOWN).

Every call, on either path, is recorded as an `calls.Call` and handed to the server's
observer when it ends (the request log): its status is what the client was told, CANCELLED
when the client cancelled, DEADLINE_EXCEEDED when its deadline passed.

The handler is also where a draining connection refuses streams opened after its final GOAWAY
(RST_STREAM REFUSED_STREAM, before any call starts; see `transport.drain`).

It relies on grpclib 0.4.9's `Handler` (`_tasks`, `__gc_step__`, `dispatch._listeners`) and
`protocol.Stream` (`_transport`, `wrapper`, `send_headers`, `send_data`, `closable`,
`reset_nowait`); tests/test_transport.py and tests/test_lean_path.py exercise them.
"""

from __future__ import annotations

import asyncio
import logging
import re
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from contextlib import nullcontext
from functools import partial
from typing import Any, NamedTuple

import grpclib.server
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import GRPC_CONTENT_TYPE, CodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline, encode_grpc_message
from grpclib.protocol import Stream as H2Stream
from grpclib.stream import recv_message
from grpclib.utils import DeadlineWrapper, Wrapper
from h2.errors import ErrorCodes
from h2.exceptions import StreamClosedError
from hpack import NeverIndexedHeaderTuple

from ..calls import (
    REQUEST_ID_HEADER,
    Call,
    CallObserver,
    enter,
    expiry,
    ignore,
    request_id,
)
from .coalescing import CoalescingTransport
from .codec import ACCEPT_ENCODING, SizeLimitedCodec, read_message, refuse_missing_message
from .drain import MAX_STREAM_ID

log = logging.getLogger(__name__)

_CONTENT_TYPES = frozenset({GRPC_CONTENT_TYPE, GRPC_CONTENT_TYPE + "+proto"})
_FRAME = struct.Struct(">?I")


class UnaryMethod(NamedTuple):
    """A unary method: its handler takes the request message and returns the reply."""

    func: Callable[[Any], Awaitable[Any]]
    request_type: type[Any]
    reply_type: type[Any]


def unary_methods(
    service: Any, wrap: Callable[[Callable[[Any], Awaitable[Any]]], Any] = lambda f: f
) -> dict[str, UnaryMethod]:
    """The unary methods of a betterproto2 service, by path, each handler passed to `wrap`.

    betterproto2 names the handler of `/pkg.Service/PredictBatch` `predict_batch`.
    """
    methods = {}
    for path, handler in service.__mapping__().items():
        if handler.cardinality is not Cardinality.UNARY_UNARY:
            continue
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", path.rpartition("/")[2]).lower()
        func = getattr(service, name)
        methods[path] = UnaryMethod(wrap(func), handler.request_type, handler.reply_type)
    return methods


RefusedCallback = Callable[[str, tuple[str, int] | None], None]
"""Told of each stream refused after the final GOAWAY: its method and the peer's address."""


class Handler(grpclib.server.Handler):
    """grpclib's per-connection handler, with the lean path for the given unary methods, and
    the stream refusal of a draining connection."""

    last_stream_id = MAX_STREAM_ID
    """Streams above this id are refused (lowered by the final GOAWAY of a drain)."""
    highest_stream_id = 0
    refused = 0

    def __init__(
        self,
        *args: Any,
        unary: Mapping[str, UnaryMethod],
        observer: CallObserver = ignore,
        on_refused: RefusedCallback | None = None,
    ) -> None:
        super().__init__(*args)
        self._unary = unary
        self._observer = observer
        self._on_refused = on_refused

    def accept(
        self, stream: H2Stream, headers: list[tuple[str, str]], release_stream: Callable[[], Any]
    ) -> None:
        """Start the call: on the lean path when it qualifies, else grpclib's; or refuse it
        (REFUSED_STREAM) when the client opened it after this connection's final GOAWAY."""
        stream_id = stream.id
        assert stream_id is not None
        if stream_id > self.last_stream_id:
            self._refuse(stream, headers, release_stream)
            return
        self.highest_stream_id = stream_id  # h2 makes sure ids only grow
        # The request headers, for `codec.read_message` to find a compressed message's
        # grpc-encoding (a server-side stream's `headers` is otherwise unused).
        stream.headers = headers
        fields = dict(headers)
        path = fields.get(":path", "")
        method = self._lean_method(path, fields)
        # The deadline runs from now, when the call arrived, not from when its task starts:
        # under load a call can wait its whole deadline away before that.
        call = Call(
            path,
            None,
            peer=stream._transport.get_extra_info("peername"),
            request_id=request_id(fields.get(REQUEST_ID_HEADER)),
        )
        # For grpclib's own path (`transport.server`), which has no other way to get it.
        stream.call = call  # type: ignore[attr-defined]
        release = _Release(release_stream)
        try:
            call.expires_at = expiry(Deadline.from_headers(headers))
        except ValueError:  # grpclib would answer UNKNOWN: refused here, on either path
            call.end(Status.INVALID_ARGUMENT, "the grpc-timeout header is malformed")
        else:
            if method is None:
                super().accept(stream, headers, release)
                task = self._tasks.get(stream)
                if task is not None:
                    task.add_done_callback(partial(_never_started, release, call, self._observer))
                return
        self.__gc_step__()
        task = self._tasks[stream] = self.loop.create_task(
            _handle(call, method, stream, self.codec, release, self._observer)
        )
        task.add_done_callback(partial(_never_started, release, call, self._observer))

    def running(self) -> set[asyncio.Task[None]]:
        """This connection's calls that have not finished."""
        return {task for task in self._tasks.values() if not task.done()}

    def _refuse(
        self, stream: H2Stream, headers: list[tuple[str, str]], release_stream: Callable[[], Any]
    ) -> None:
        self.refused += 1
        stream.reset_nowait(ErrorCodes.REFUSED_STREAM)
        release_stream()
        if self._on_refused is not None:
            self._on_refused(dict(headers).get(":path", ""), stream.connection.get_peer().addr())

    def _lean_method(self, path: str, fields: dict[str, str]) -> UnaryMethod | None:
        method = self._unary.get(path)
        if (
            method is None
            or fields.get(":method") != "POST"
            or fields.get("content-type") not in _CONTENT_TYPES
            or fields.get("te") != "trailers"
            or any(self.dispatch._listeners.values())  # events promised to listeners
        ):
            return None
        return method


async def _handle(
    call: Call,
    method: UnaryMethod | None,
    stream: H2Stream,
    codec: CodecBase,
    release_stream: Callable[[], Any],
    observer: CallObserver,
) -> None:
    try:
        if call.status is not Status.OK or method is None:  # refused on arrival
            await _send_status(stream, codec, call)
            return
        if call.expired:  # it waited past its deadline: no work for an answer nobody awaits
            call.end(Status.DEADLINE_EXCEEDED)
            await _send_status(stream, codec, call)
            return
        enter(call)
        wrapper: Wrapper
        if call.expires_at is None:
            wrapper = stream.wrapper = Wrapper()
            limit: Any = nullcontext()
        else:
            wrapper = stream.wrapper = DeadlineWrapper()
            limit = wrapper.start(Deadline.from_timeout(call.expires_at - time.monotonic()))
        try:
            with limit, wrapper:
                request = await _read(stream, codec, method.request_type)
                if request is None:
                    refuse_missing_message()
                reply = await method.func(request)
                body = codec.encode(reply, method.reply_type)
        except GRPCError as exc:
            call.end(exc.status, exc.message)
            await _send_status(stream, codec, call)
            return
        except TimeoutError:
            # `wrapper.cancelled`: the deadline fired while the handler ran; `call.expired`:
            # it passed just before the timer could start (grpclib's `start` raises then).
            if not (wrapper.cancelled or call.expired):
                raise
            call.end(Status.DEADLINE_EXCEEDED)
            await _send_status(stream, codec, call)
            return
        except StreamTerminatedError:
            call.end(Status.CANCELLED)
            return  # the client cancelled, or the connection is gone: nobody to answer
        except Exception:
            log.exception("Application error")
            call.end(Status.UNKNOWN, "Internal Server Error")
            await _send_status(stream, codec, call)
            return
        await stream.send_headers(
            [
                (":status", "200"),
                ("content-type", _content_type(codec)),
                ACCEPT_ENCODING,
                request_id_header(call),
            ]
        )
        await stream.send_data(_FRAME.pack(False, len(body)) + body)
        await stream.send_headers([("grpc-status", "0")], end_stream=True)
        if stream.closable:
            stream.reset_nowait()
    except (StreamClosedError, StreamTerminatedError):
        call.end(Status.CANCELLED)  # the client reset the stream or left while we answered
    except asyncio.CancelledError:
        call.end(Status.CANCELLED)  # the server is closing
        raise
    finally:
        release_stream()
        observe(observer, call)
        transport = stream._transport
        if isinstance(transport, CoalescingTransport):
            transport.flush_if_last()  # one call in flight: its answer leaves now, not a turn later


def request_id_header(call: Call) -> tuple[str, str]:
    """The `x-request-id` response header, never indexed by HPACK: each value is new, and
    indexing it would only push the headers that do repeat out of both sides' tables."""
    header: tuple[str, str] = NeverIndexedHeaderTuple(REQUEST_ID_HEADER, call.request_id)  # type: ignore[assignment]
    return header


class _Release:
    """A stream's `release_stream`, callable once.

    grpclib cancels a call's task when the client resets its stream. A task cancelled before
    its first step never runs its coroutine, so the `finally` that releases the stream never
    runs either, and the connection keeps the stream (and its buffers, ~10 KB) for as long as
    it lives: one per client cancel that lands before the handler starts, about 30 a second
    (+18 MB a minute) under the soak's mix. `_never_started` releases it from the task's done
    callback instead.
    """

    __slots__ = ("_release", "done")

    def __init__(self, release: Callable[[], Any]) -> None:
        self._release = release
        self.done = False

    def __call__(self) -> None:
        if not self.done:
            self.done = True
            self._release()


def _never_started(
    release: _Release, call: Call, observer: CallObserver, task: asyncio.Task[None]
) -> None:
    """A call's task has ended: if it never ran (cancelled before its first step), release
    its stream and record the call as what it was, a client's cancel."""
    if release.done:
        return
    release()
    call.end(Status.CANCELLED)
    observe(observer, call)


def observe(observer: CallObserver, call: Call) -> None:
    """Hand a finished call to the observer; its failure is logged, never the call's."""
    try:
        observer(call)
    except Exception:
        log.exception("call observer failed")


async def _send_status(stream: H2Stream, codec: CodecBase, call: Call) -> None:
    """A trailers-only answer with the call's status."""
    headers = [
        (":status", "200"),
        ("content-type", _content_type(codec)),
        ACCEPT_ENCODING,
        request_id_header(call),
        ("grpc-status", str(call.status.value)),
    ]
    if call.message is not None:
        headers.append(("grpc-message", encode_grpc_message(call.message)))
    await stream.send_headers(headers, end_stream=True)
    if stream.closable:
        stream.reset_nowait()


async def _read(stream: H2Stream, codec: CodecBase, message_type: Any) -> Any:
    if isinstance(codec, SizeLimitedCodec):
        return await read_message(stream, codec, message_type)  # refuses oversize from the prefix
    return await recv_message(stream, codec, message_type)


def _content_type(codec: CodecBase) -> str:
    return f"{GRPC_CONTENT_TYPE}+{codec.__content_subtype__}"
