"""Latency statistics: the one definition of a percentile that every report here uses.

Every latency report of this project takes its percentiles from here: the load command
(`mnist-service load`), the benchmark (`bench.run`, `bench.load`) and the scale-out run
(`bench.scaleout`), so that a p99 means the same in each of them.

The definition is linear interpolation between closest ranks: of n values sorted ascending
(v[0] .. v[n-1]), the q-th percentile sits at rank r = (n - 1) * q / 100, and is
v[floor(r)] + (v[floor(r) + 1] - v[floor(r)]) * (r - floor(r)). This is numpy's default
(`np.percentile(..., method="linear")`), Hyndman and Fan's type 7, and what spreadsheets call
PERCENTILE.INC. Why this one: it is defined for any number of values from one up, it moves
continuously as values change instead of jumping from one sample to the next, its median is
the usual median (`statistics.median`), and our earlier reports (`docs/benchmarks.md`, through
`np.percentile`) already used it, so old and new figures compare. The price: on few samples a
high percentile lies between the two largest values rather than being a latency that was
seen; report the count beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

__all__ = ["LatencySummary", "median", "percentile", "summarise_latency"]


def percentile(ordered: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of values sorted ascending, by linear interpolation."""
    if not ordered:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    rank = (len(ordered) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Iterable[float]) -> float:
    """The 50th percentile of values in any order."""
    return percentile(sorted(values), 50)


@dataclass(frozen=True, kw_only=True, slots=True)
class LatencySummary:
    """Latency percentiles in milliseconds, of calls (unary, batch) or of images (stream)."""

    of: Literal["call", "image"]
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


def summarise_latency(
    seconds: Iterable[float], of: Literal["call", "image"]
) -> LatencySummary | None:
    """Percentiles of latencies given in seconds; None when there are none."""
    ordered = sorted(seconds)
    if not ordered:
        return None
    ms = [value * 1000 for value in ordered]
    return LatencySummary(
        of=of,
        count=len(ms),
        mean_ms=math.fsum(ms) / len(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1],
    )
