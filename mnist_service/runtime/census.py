"""What a worker holds, written to the log on SIGUSR2: for finding memory that grows.

`kill -USR2 <worker pid>` logs one `memory census` line (at info) with the resident set, the
event loop's tasks, the threads, the server's own registries (connections, calls, waiting
stream reads, connection handlers), and the objects the collector tracks, counted by type (the
most common 12; what `gc.freeze` set aside at startup is not counted). Under
`PYTHONTRACEMALLOC=1` (Python's own switch, or `python -X tracemalloc`; a debugging aid: it
costs a few times the CPU and memory) the line also carries the 12 source lines whose
allocations changed most since the previous census, or since the worker started serving.

Send it to the workers, not to a supervisor (`--workers` above 1), which has no handler.
Reading it: a registry or a type whose count rises from one census to the next while the load
stays the same is what holds on; tracemalloc's lines say where it was allocated.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import threading
import tracemalloc
from collections import Counter
from collections.abc import Callable, Mapping
from pathlib import Path

__all__ = ["Census"]

log = logging.getLogger(__name__)

TOP = 12
"""How many object types and allocation sites a census lists."""

_IGNORED = (
    tracemalloc.Filter(inclusive=False, filename_pattern=tracemalloc.__file__),
    tracemalloc.Filter(inclusive=False, filename_pattern="<frozen importlib._bootstrap*>"),
    tracemalloc.Filter(inclusive=False, filename_pattern="<unknown>"),
)


def resident_mb() -> float | None:
    """This process's resident set, in MB (Linux's /proc; None elsewhere)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except OSError:
        return None
    return round(pages * os.sysconf("SC_PAGE_SIZE") / 2**20, 1)


class Census:
    """Takes and logs the census; `registries` gives the server's own counts."""

    def __init__(self, registries: Callable[[], Mapping[str, int]]) -> None:
        self._registries = registries
        self._snapshot = self._trace()

    def take(self) -> dict[str, object]:
        """The census as log fields."""
        types = Counter(type(item).__qualname__ for item in gc.get_objects())
        fields: dict[str, object] = {
            "rss_mb": resident_mb(),
            "tasks": len(asyncio.all_tasks()),
            "threads": threading.active_count(),
            **self._registries(),
            "gc_objects": types.total(),
            "gc_top": dict(types.most_common(TOP)),
        }
        snapshot = self._trace()
        if snapshot is not None:
            if self._snapshot is not None:
                changed = [s for s in snapshot.compare_to(self._snapshot, "lineno") if s.size_diff]
                fields["tracemalloc_top"] = [str(stat) for stat in changed[:TOP]]
            self._snapshot = snapshot
        return fields

    def log(self) -> None:
        """Log the census (a signal handler: it runs on the event loop)."""
        log.info("memory census", extra={"fields": self.take()})

    @staticmethod
    def _trace() -> tracemalloc.Snapshot | None:
        if not tracemalloc.is_tracing():
            return None
        return tracemalloc.take_snapshot().filter_traces(_IGNORED)
