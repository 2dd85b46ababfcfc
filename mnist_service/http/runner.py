"""The one HTTP call runner: every request, routed or not, goes through `CallRunner`.

It is the HTTP twin of the gRPC transport's runner, an aiohttp middleware that applies the
same rules once:

- the call record (`calls.Call`, with `protocol=http`), made current for the handler and
  handed to the observer (the request log, the metrics) at the end;
- the deadline from `X-Request-Timeout` (seconds) or `grpc-timeout` (gRPC's format), counted
  from the request's arrival;
- errors to JSON answers through the one error map (`errors.refusal`);
- the `x-request-id`, `Server-Timing` and CORS headers on every answer, preflights answered;
- `Connection: close` on answers sent while the server drains.

`read_body` is the size-capped, time-limited read every handler uses.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any, Final

from aiohttp import web
from grpclib.const import Status
from grpclib.metadata import decode_timeout

from ..calls import REQUEST_ID_HEADER, Call, CallObserver, enter, observe, request_id
from ..errors import MessageTooLargeError, SlowMessageError
from .errors import HttpError, error_response, refusal
from .timing import Timing

log = logging.getLogger(__name__)

TIMING: Final = web.RequestKey("timing", Timing)
"""The request's `Timing`, under this key of the aiohttp request."""
TIMEOUT_HEADER: Final = "x-request-timeout"
OIP_PREFIX: Final = "/v2"
ALLOWED_METHODS: Final = "GET, POST, OPTIONS"
ALLOWED_HEADERS: Final = (
    "content-type, x-request-id, x-request-timeout, grpc-timeout, inference-header-content-length"
)
EXPOSED_HEADERS: Final = "server-timing, x-request-id, inference-header-content-length"
PREFLIGHT_MAX_AGE_S: Final = 600
_MAX_TIMEOUT_S: Final = 24 * 3600.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Cors:
    """Which origins' pages may call the API (`--cors-allow-origin`)."""

    def __init__(self, origins: Iterable[str]) -> None:
        self._origins = frozenset(origins)
        self._any = "*" in self._origins

    @property
    def varies(self) -> bool:
        """Whether answers differ by origin (`Vary: Origin`): some origins, not all."""
        return bool(self._origins) and not self._any

    def allowed(self, origin: str | None) -> str | None:
        """What `Access-Control-Allow-Origin` says to `origin` (None: nothing, not allowed)."""
        if origin is None or not self._origins:
            return None
        if self._any:
            return "*"
        return origin if origin in self._origins else None


class CallRunner:
    """The middleware every request runs through (see the module's docstring).

    `on_start` and `on_end` are told of each request's transport when its handler starts
    and ends (the server times out connections that idle inside a request's headers).
    """

    __middleware_version__ = 1  # aiohttp's marker of a new-style middleware

    def __init__(
        self,
        observer: CallObserver,
        *,
        cors: Cors,
        max_body_bytes: int,
        max_body_seconds: float,
        on_start: Callable[[Any], None] | None = None,
        on_end: Callable[[Any], None] | None = None,
    ) -> None:
        self._observer = observer
        self._cors = cors
        self.max_body_bytes = max_body_bytes
        self.max_body_seconds = max_body_seconds
        self._on_start = on_start
        self._on_end = on_end
        self.draining = False
        self._running: set[asyncio.Future[None]] = set()

    def calls(self) -> set[asyncio.Future[None]]:
        """The calls still running: each future is done when its call has been answered."""
        return {call for call in self._running if not call.done()}

    async def __call__(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        timing = Timing()
        request[TIMING] = timing
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "(unrouted)"
        call = Call(
            f"{request.method} {route}",
            None,
            peer=request.transport.get_extra_info("peername") if request.transport else None,
            request_id=request_id(request.headers.get(REQUEST_ID_HEADER)),
        )
        call.fields["protocol"] = "http"
        enter(call)
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._running.add(done)
        if self._on_start is not None:
            self._on_start(request.transport)
        origin = request.headers.get("Origin")
        try:
            response = await self._answer(request, handler, call, origin)
        except asyncio.CancelledError:
            call.end(Status.CANCELLED)
            raise
        finally:
            self._running.discard(done)
            done.set_result(None)
            if self._on_end is not None:
                self._on_end(request.transport)
            observe(self._observer, call)
        response.headers[REQUEST_ID_HEADER] = call.request_id
        response.headers["Server-Timing"] = timing.header()
        allowed = self._cors.allowed(origin)
        if allowed is not None:
            response.headers["Access-Control-Allow-Origin"] = allowed
            response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
            response.headers["Timing-Allow-Origin"] = allowed
        if self._cors.varies:
            response.headers["Vary"] = "Origin"
        if self.draining:
            response.force_close()  # Connection: close, and no next request on it
        return response

    async def _answer(
        self, request: web.Request, handler: Handler, call: Call, origin: str | None
    ) -> web.StreamResponse:
        oip = request.path.startswith(OIP_PREFIX)
        try:
            call.expires_at = _expiry(request)
            if request.method == "OPTIONS":
                return self._preflight(request, origin)
            response = await handler(request)
        # An error raised through this frame holds it in its traceback: none may stay
        # referenced from here (from `error`, or from aiohttp's match_info in the request,
        # which keeps its router's refusal), or the two keep each other, and the request,
        # until the collector comes round.
        except web.HTTPException as exc:  # aiohttp's router: unknown path, wrong method
            error = _from_aiohttp(request, exc)
            exc.__traceback__ = None
        except HttpError as exc:
            error = exc.with_traceback(None)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            error = refusal(exc)
            if error.code is Status.INTERNAL:
                log.exception("unexpected error in %s %s", request.method, request.path)
        else:
            return response
        call.end(error.code, error.message)
        response = error_response(error, oip=oip)
        if error.http_status in (408, 413):
            response.force_close()  # the rest of the body is not read: the connection ends
        return response

    def _preflight(self, request: web.Request, origin: str | None) -> web.Response:
        """An OPTIONS request: a CORS preflight from an allowed origin, or what is allowed."""
        if origin is None:
            return web.Response(status=204, headers={"Allow": ALLOWED_METHODS})
        allowed = self._cors.allowed(origin)
        if allowed is None:
            raise HttpError(
                Status.PERMISSION_DENIED,
                403,
                f"origin {origin!r} may not call this server; the server's "
                "--cors-allow-origin lists the origins that may",
            )
        return web.Response(
            status=204,
            headers={
                "Access-Control-Allow-Methods": ALLOWED_METHODS,
                "Access-Control-Allow-Headers": ALLOWED_HEADERS,
                "Access-Control-Max-Age": str(PREFLIGHT_MAX_AGE_S),
            },
        )


def _expiry(request: web.Request) -> float | None:
    """The call's deadline as a `time.monotonic()` value, from its timeout header."""
    arrived = time.monotonic()
    seconds_text = request.headers.get(TIMEOUT_HEADER)
    if seconds_text is not None:
        try:
            seconds = float(seconds_text)
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= _MAX_TIMEOUT_S:
            raise HttpError(
                Status.INVALID_ARGUMENT,
                400,
                f"the X-Request-Timeout header takes seconds, more than 0 and at most "
                f"{_MAX_TIMEOUT_S:g}, got {seconds_text[:40]!r}",
            )
        return arrived + seconds
    grpc_timeout = request.headers.get("grpc-timeout")
    if grpc_timeout is not None:
        try:
            return arrived + decode_timeout(grpc_timeout)
        except ValueError:
            raise HttpError(
                Status.INVALID_ARGUMENT, 400, "the grpc-timeout header is malformed"
            ) from None
    return None


def _from_aiohttp(request: web.Request, exc: web.HTTPException) -> HttpError:
    """aiohttp's own refusals (its router's 404 and 405, mostly) as our JSON errors."""
    if exc.status == 404:
        return HttpError(Status.NOT_FOUND, 404, f"no such path: {request.path[:200]}")
    if exc.status == 405:
        allowed = exc.headers.get("Allow", "")
        return HttpError(
            Status.UNIMPLEMENTED,
            405,
            f"{request.path[:200]} does not take {request.method[:20]}; it takes {allowed}",
            {"Allow": allowed},
        )
    code = Status.INVALID_ARGUMENT if exc.status < 500 else Status.INTERNAL
    return HttpError(code, exc.status, exc.reason)


async def read_body(request: web.Request) -> bytes:
    """The request's body, at most `max_body_bytes` (refused from its Content-Length before a
    byte is read, or counted as chunks arrive), within `max_body_seconds`."""
    runner = request.app[RUNNER]
    limit = runner.max_body_bytes
    announced = request.content_length
    if announced is not None and announced > limit:
        raise MessageTooLargeError(f"request body is {announced} bytes; the limit is {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async with asyncio.timeout(runner.max_body_seconds):
            while chunk := await request.content.readany():
                size += len(chunk)
                if size > limit:
                    raise MessageTooLargeError(
                        f"request body is more than {limit} bytes; the limit is {limit} bytes"
                    )
                chunks.append(chunk)
    except TimeoutError:
        raise SlowMessageError(
            f"the request body did not arrive within {runner.max_body_seconds:g} s "
            f"({size} bytes came)"
        ) from None
    return b"".join(chunks)


RUNNER: Final = web.AppKey("runner", CallRunner)
"""The app's `CallRunner` (for `read_body`'s limits)."""
