"""The call being served: what its handler can read and add to, and what is recorded at its end.

The transport opens a `Call` for every RPC before the handler runs (`transport.server.Handler`;
the one call runner, `transport.runner`, then serves it), makes it current in a `ContextVar`
(so it follows the handler's task and nothing else), sets its final status when the call
ends, and hands it to the server's observer: the request log, and anything else that counts
calls. A client's cancel is recorded as CANCELLED and an expired deadline as
DEADLINE_EXCEEDED, never as a server fault.
"""

from __future__ import annotations

import itertools
import logging
import os
import time
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status
from grpclib.metadata import Deadline

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class Call:
    """One RPC, from its arrival (when `Handler.accept` sees its headers) to its status."""

    method: str
    """The gRPC path, e.g. `/mnist.Mnist/Predict`."""
    expires_at: float | None
    """The client's deadline as a `time.monotonic()` value (None: none was sent)."""
    peer: Any = None
    """The client's socket address as the transport reports it (a tuple), if known."""
    started: float = field(default_factory=time.perf_counter)
    status: Status = Status.OK
    message: str | None = None
    """The status message sent with a non-OK status."""
    fields: dict[str, Any] = field(default_factory=dict)
    """What the handler added with `annotate` (e.g. the label, the item count)."""
    request_id: str = ""
    """The client's `x-request-id`, or one made up for the call; sent back to the client."""

    @property
    def expired(self) -> bool:
        """Whether the client's deadline has passed."""
        return self.expires_at is not None and self.expires_at <= time.monotonic()

    def rode_in(self, batch_size: int) -> None:
        """Note the size of the model run this call's image rode in (for the request log)."""
        self.fields["batch"] = batch_size

    def end(self, status: Status, message: str | None = None) -> None:
        self.status = status
        self.message = message


CallObserver = Callable[[Call], None]

REQUEST_ID_HEADER = "x-request-id"
_MAX_REQUEST_ID = 128
_PROCESS_PREFIX = os.urandom(6).hex()
_sequence = itertools.count(1)


def request_id(sent: str | None) -> str:
    """The call's request id: the client's `x-request-id` when it is a sane token (visible
    ASCII, at most 128 characters), else a new one, unique across processes and restarts."""
    if sent and len(sent) <= _MAX_REQUEST_ID and sent.isascii() and sent.isprintable():
        return sent
    return f"{_PROCESS_PREFIX}{next(_sequence):06x}"


def _reseed() -> None:
    """A new prefix for a forked process's made-up ids (workers must not repeat each other)."""
    global _PROCESS_PREFIX
    _PROCESS_PREFIX = os.urandom(6).hex()


os.register_at_fork(after_in_child=_reseed)


def expiry(deadline: Deadline | None) -> float | None:
    """grpclib's `Deadline` as a `time.monotonic()` value."""
    return None if deadline is None else time.monotonic() + deadline.time_remaining()


def current_expiry() -> float | None:
    """The current call's deadline as a `time.monotonic()` value (None: none, or no call)."""
    call = _current.get()
    return None if call is None else call.expires_at


_current: ContextVar[Call | None] = ContextVar("mnist_service_call", default=None)


def current_call() -> Call | None:
    """The call the running task serves (None outside a call)."""
    return _current.get()


def enter(call: Call) -> None:
    """Make `call` the current one for the rest of this task (the transport calls this)."""
    _current.set(call)


def annotate(**fields: Any) -> None:
    """Add fields to the current call's record (a no-op outside a call)."""
    call = _current.get()
    if call is not None:
        call.fields.update(fields)


def observe(observer: CallObserver, call: Call) -> None:
    """Hand a finished call to the observer, as every protocol's call runner does at a call's
    end: the observer's failure is logged, and never becomes the call's."""
    try:
        observer(call)
    except Exception:
        log.exception("call observer failed")


def ignore(call: Call) -> None:
    """An observer that records nothing."""
