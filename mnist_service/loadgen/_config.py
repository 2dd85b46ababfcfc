"""What to load, how hard and for how long: `LoadConfig`, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, get_args

from ..config import parse_address
from ..errors import ConfigError
from ..tls import ClientTls
from ._workload import Payload

Mode = Literal["unary", "batch", "stream"]
MODES: tuple[str, ...] = get_args(Mode)

DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_REQUESTS = 100_000_000
"""The count bound of a run (calls, or images in stream mode); the duration usually ends it."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadConfig:
    """What to load, how hard and for how long; validated on construction."""

    address: str
    payloads: tuple[Payload, ...]
    mode: Mode = "unary"
    concurrency: int = 8
    """Concurrent callers: in-flight calls (unary, batch) or open streams (stream)."""
    duration_s: float = 10.0
    batch_size: int = 64
    """Images per PredictBatch call (batch mode only)."""
    connections: int | None = None
    """HTTP/2 connections the callers share; None: one per caller, at most 16."""
    stream_window: int = 32
    """Images a stream may have unanswered (stream mode only)."""
    call_timeout_s: float = 30.0
    """Deadline of one call; a stream gets the remaining duration on top."""
    max_requests: int = DEFAULT_MAX_REQUESTS
    model_check: bool = False
    """Classify each payload once first, then count answers under load that disagree."""
    tls: ClientTls | None = None
    """Connect over TLS (None: plaintext)."""

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.payloads:
            raise ConfigError("there are no images to send")
        for name in ("concurrency", "batch_size", "stream_window", "max_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.connections is not None and self.connections < 1:
            raise ConfigError(f"connections must be at least 1, got {self.connections}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ConfigError(f"duration must be a positive number of seconds: {self.duration_s}")
        if not (math.isfinite(self.call_timeout_s) and self.call_timeout_s > 0):
            raise ConfigError(
                f"call timeout must be a positive number of seconds: {self.call_timeout_s}"
            )

    @property
    def connection_count(self) -> int:
        """The connections actually opened (never more than the callers)."""
        wanted = self.connections or DEFAULT_MAX_CONNECTIONS
        return min(wanted, self.concurrency)
