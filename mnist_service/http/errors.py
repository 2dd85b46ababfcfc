"""HTTP statuses for the one error map, and the JSON error bodies.

A domain error gets its gRPC code from `mnist_service.status.STATUS_FOR_ERROR`, and its HTTP
status from that code (`HTTP_STATUS_FOR_CODE`, grpc-gateway's table), except where HTTP has a
more precise status for the same code (`HTTP_STATUS_FOR_ERROR`: 413, 408, 503). What the HTTP
layer refuses before any domain call (an unknown path, a wrong method or content type) is an
`HttpError` carrying both. The tree::

    Exception
    └── HttpError                 refused by the HTTP layer: its code and HTTP status given
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Final

from aiohttp import web
from grpclib.const import Status

from ..errors import MessageTooLargeError, MnistServiceError, OverloadedError, SlowMessageError
from ..status import INTERNAL_MESSAGE, status_for
from . import documents

HTTP_STATUS_FOR_CODE: Final[Mapping[Status, int]] = {
    Status.OK: 200,
    Status.CANCELLED: 499,
    Status.UNKNOWN: 500,
    Status.INVALID_ARGUMENT: 400,
    Status.DEADLINE_EXCEEDED: 504,
    Status.NOT_FOUND: 404,
    Status.ALREADY_EXISTS: 409,
    Status.PERMISSION_DENIED: 403,
    Status.UNAUTHENTICATED: 401,
    Status.RESOURCE_EXHAUSTED: 429,
    Status.FAILED_PRECONDITION: 400,
    Status.ABORTED: 409,
    Status.OUT_OF_RANGE: 400,
    Status.UNIMPLEMENTED: 501,
    Status.INTERNAL: 500,
    Status.UNAVAILABLE: 503,
    Status.DATA_LOSS: 500,
}
"""gRPC code -> HTTP status, as grpc-gateway and Google's APIs map them."""

HTTP_STATUS_FOR_ERROR: Final[Mapping[type[MnistServiceError], int]] = {
    MessageTooLargeError: 413,
    SlowMessageError: 408,
    OverloadedError: 503,
}
"""Where HTTP says more than the code: a body too large, too slow, a full server."""

RETRY_AFTER_S: Final = 1
"""Sent as `Retry-After` with an overloaded server's 503."""


class HttpError(Exception):
    """Raised by the HTTP layer for a request it refuses before any domain call."""

    def __init__(
        self,
        code: Status,
        http_status: int,
        message: str,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.code = code
        self.http_status = http_status
        self.message = message
        self.headers = dict(headers or {})


def refusal(exc: Exception) -> HttpError:
    """The HTTP answer for an exception a handler raised: domain errors through the one
    error map, anything unexpected as INTERNAL with a generic message (the caller logs it)."""
    if isinstance(exc, HttpError):
        return exc
    if isinstance(exc, MnistServiceError):
        code = status_for(exc)
        http_status = HTTP_STATUS_FOR_CODE[code]
        for cls in type(exc).__mro__:
            if cls in HTTP_STATUS_FOR_ERROR:
                http_status = HTTP_STATUS_FOR_ERROR[cls]
                break
        headers = {"Retry-After": str(RETRY_AFTER_S)} if isinstance(exc, OverloadedError) else {}
        return HttpError(code, http_status, str(exc), headers)
    return HttpError(Status.INTERNAL, 500, INTERNAL_MESSAGE)


def error_response(error: HttpError, *, oip: bool = False) -> web.Response:
    """`{"error": {"code": ..., "message": ...}}`; on the Open Inference Protocol's paths the
    protocol's own `{"error": "<message>"}` (what tritonclient and KServe's clients read)."""
    body = (
        {"error": error.message}
        if oip
        else {"error": {"code": error.code.name, "message": error.message}}
    )
    return web.Response(
        status=error.http_status,
        body=documents.dumps(body),
        content_type="application/json",
        headers=error.headers,
    )
