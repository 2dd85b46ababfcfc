"""The garbage collector's settings for a serving process, applied once it is ready.

Reference counting frees what a call allocates as soon as the call ends; the cyclic
collector is only needed for reference cycles, and the request paths make none, on success or
on error (`tests/test_cycles.py`). Two settings follow:

- **Freeze what exists at startup.** Modules, the model and the server live as long as the
  process: `gc.freeze` takes them out of the collector's sight, or each full collection walks
  them all again (measured: 45-55 ms pauses about once a second under load, the whole p99
  tail).
- **Collect the youngest generation only when it grows.** Python collects it after 700 net
  allocations of tracked objects. With 64 calls in flight, what the calls hold at once passes
  that, so the collector ran about every 14 calls, each time walking the calls in flight and
  moving them to an older generation: 1,436 collections in 20,000 Predict calls, 3.9 µs of
  CPU a call (`python -m bench.call_path` and gc callbacks in a server under h2load). At
  `YOUNG_THRESHOLD` the same load makes 0-1 collections; the server's CPU per call fell by
  6-12 µs (2.5-4.5 %, 3 alternating pairs). The collector still runs when objects really
  accumulate, cycles among them, once they number that many.
"""

from __future__ import annotations

import gc
from typing import Final

__all__ = ["YOUNG_THRESHOLD", "settle"]

YOUNG_THRESHOLD: Final = 5_000
"""Net allocations of tracked objects between collections of the youngest generation."""


def settle() -> None:
    """Collect once, freeze what is left (it lives as long as the process), and collect the
    youngest generation only past `YOUNG_THRESHOLD` net allocations; the older generations'
    thresholds stay as they are."""
    gc.collect()
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
