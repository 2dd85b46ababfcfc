"""h2's per-frame trace line, formatted only when something logs it.

`h2.connection.H2Connection._receive_frame` starts with
``self.config.logger.trace("Received frame: %s", repr(frame))``: the frame is formatted (its
header block or data hex-dumped) before the logger is asked, and grpclib's connections use h2's
`DummyLogger`, which drops it. On a small unary call that is three frames and about 15 us of
the ~570 us a call costs at one call in flight, ~3 % of the service's latency for nothing.

`defer_frame_reprs` gives `h2.connection` a module-level `repr` that returns a `LazyRepr`: the
real `repr` runs when the line is formatted, so a logger that does write h2's trace (an
`h2.config.OutputLogger`, say) gets the same text as before. `h2.connection` calls `repr` only
there; tests/test_transport.py checks that against the installed h2.
"""

from __future__ import annotations

import builtins

import h2.connection

__all__ = ["LazyRepr", "defer_frame_reprs"]


class LazyRepr:
    """`repr(value)`, computed when it is formatted with ``%s``/``%r`` or `str`, never before."""

    __slots__ = ("_value",)

    def __init__(self, value: object) -> None:
        self._value = value

    def __str__(self) -> str:
        return builtins.repr(self._value)

    __repr__ = __str__


def defer_frame_reprs() -> None:
    """Make h2's received-frame trace lazy (idempotent; process-wide, h2.connection only)."""
    h2.connection.repr = LazyRepr  # type: ignore[attr-defined]
