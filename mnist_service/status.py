"""The one error map: this package's exceptions -> gRPC statuses.

`STATUS_FOR_ERROR` is the one table that turns domain errors into gRPC status codes; handlers
raise domain errors and `as_grpc_errors` translates them. Unexpected exceptions become INTERNAL
with a generic message (grpclib would say UNKNOWN): the details go to the server log, never
to the client.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .errors import (
    CompressionError,
    DeadlineExpiredError,
    InvalidImageError,
    InvalidTensorError,
    MalformedMessageError,
    MessageTooLargeError,
    MnistServiceError,
    ModelControlError,
    ModelError,
    ModelNotFoundError,
    OverloadedError,
    SlowMessageError,
    TooManyImagesError,
    UnsupportedEncodingError,
    UnsupportedMethodError,
)

log = logging.getLogger(__name__)

STATUS_FOR_ERROR: Mapping[type[MnistServiceError], Status] = {
    InvalidImageError: Status.INVALID_ARGUMENT,
    MalformedMessageError: Status.INVALID_ARGUMENT,
    TooManyImagesError: Status.INVALID_ARGUMENT,
    InvalidTensorError: Status.INVALID_ARGUMENT,
    ModelNotFoundError: Status.NOT_FOUND,
    UnsupportedEncodingError: Status.UNIMPLEMENTED,
    UnsupportedMethodError: Status.UNIMPLEMENTED,
    # What grpc-go, grpc-java and grpc core answer for a compressed flag they cannot honour
    # or a body that does not inflate: the client broke the protocol, so no retry helps.
    CompressionError: Status.INTERNAL,
    MessageTooLargeError: Status.RESOURCE_EXHAUSTED,
    SlowMessageError: Status.RESOURCE_EXHAUSTED,
    OverloadedError: Status.RESOURCE_EXHAUSTED,
    DeadlineExpiredError: Status.DEADLINE_EXCEEDED,
    # A model version refused by the control API (its file, config.json, warm-up or golden
    # check), RepositoryError among them; Triton's answer to a load that fails.
    ModelError: Status.INVALID_ARGUMENT,
    # Triton's answer to a load or unload while its model control mode forbids them.
    ModelControlError: Status.UNAVAILABLE,
}
"""Domain error -> gRPC status; the most specific class in an exception's MRO wins."""

INTERNAL_MESSAGE = "internal error; the server log has the details"


def status_for(exc: MnistServiceError) -> Status:
    """The gRPC status for a domain error (INTERNAL for one with no entry)."""
    for cls in type(exc).__mro__:
        status = STATUS_FOR_ERROR.get(cls)
        if status is not None:
            return status
    return Status.INTERNAL


@contextmanager
def as_grpc_errors() -> Iterator[None]:
    """Re-raise errors raised inside the block as `GRPCError`s: domain errors with their
    status and message, anything unexpected as INTERNAL with a generic message (logged)."""
    try:
        yield
    except GRPCError:
        raise
    except MnistServiceError as exc:
        raise GRPCError(status_for(exc), str(exc)) from exc
    except Exception as exc:
        log.exception("unexpected error")
        raise GRPCError(Status.INTERNAL, INTERNAL_MESSAGE) from exc
