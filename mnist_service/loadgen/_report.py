"""What a run tells: progress snapshots, the final report, and both as text or JSON."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ._config import Mode
from .latency import LatencySummary

CPU_BOUND_FRACTION = 0.9
"""Client CPU time over wall time above which the client, not the server, was the limit."""


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a run in progress."""

    elapsed_s: float
    requests: int
    images: int
    errors: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCheck:
    """The outcome of `--model-check`."""

    references: int
    """Payloads that got a reference label from one Predict call before the load."""
    drawn_correct: int | None
    """Of the payloads showing a known digit, how many the model got right (None: none known)."""
    drawn_total: int
    mismatched: int
    """Answers under load whose label differs from their payload's reference."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """The outcome of a run: counts, rates, latency, errors, and how busy the client was."""

    mode: Mode
    address: str
    concurrency: int
    connections: int
    batch_size: int | None
    payloads: int
    duration_s: float
    elapsed_s: float
    interrupted: bool
    requests: int
    """Answered request messages: calls (unary, batch) or streamed images (stream)."""
    images: int
    """Answered images, classified or not."""
    classified: int
    latency: LatencySummary | None
    errors: Mapping[str, int]
    """Failed calls by gRPC status (or by exception, for transport failures)."""
    item_errors: Mapping[str, int]
    """Images a batch or stream answer reported as failed, by gRPC status."""
    server: Mapping[str, str] | None
    """What GetModelInfo said (None when the server does not implement it)."""
    model_check: ModelCheck | None
    client_cpu_s: float
    event_loop: str

    @property
    def requests_per_s(self) -> float:
        """Answered requests per second of elapsed time."""
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Answered images per second of elapsed time."""
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def client_busy(self) -> float:
        """Client CPU time over wall time: near 1 means the client was the bottleneck."""
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_bound(self) -> bool:
        """Whether the client was busy enough that the numbers are a lower bound."""
        return self.client_busy > CPU_BOUND_FRACTION

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON types."""
        return {
            "mode": self.mode,
            "address": self.address,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "batch_size": self.batch_size,
            "payloads": self.payloads,
            "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 4),
            "interrupted": self.interrupted,
            "requests": self.requests,
            "images": self.images,
            "classified": self.classified,
            "requests_per_s": round(self.requests_per_s, 2),
            "images_per_s": round(self.images_per_s, 2),
            "latency_ms": _latency_json(self.latency),
            "errors": dict(self.errors),
            "item_errors": dict(self.item_errors),
            "server": dict(self.server) if self.server is not None else None,
            "model_check": _model_check_json(self.model_check),
            "client": {
                "cpu_s": round(self.client_cpu_s, 3),
                "busy": round(self.client_busy, 3),
                "cpu_bound": self.cpu_bound,
                "event_loop": self.event_loop,
            },
        }


def format_progress(progress: Progress) -> str:
    """One status line: elapsed, completed, rate, errors."""
    rate = progress.images / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
    return (
        f"{progress.elapsed_s:6.1f} s  {progress.requests:,} requests  {progress.images:,} images"
        f"  {rate:,.0f} images/s  {progress.errors:,} errors"
    )


def format_report(report: LoadReport) -> str:
    """The report for people: counts, rates, latency, errors, and a CPU-bound warning if due."""
    what = {"unary": "Predict", "batch": f"PredictBatch of {report.batch_size}"}
    calls = what.get(report.mode, "PredictStream")
    callers = "streams" if report.mode == "stream" else "callers"
    lines = [
        f"{report.mode}: {report.concurrency} {callers} ({calls}) on {report.connections} "
        f"connection(s) to {report.address}, {report.payloads} payload(s)",
        f"elapsed     {report.elapsed_s:.2f} s of {report.duration_s:g} s"
        + ("  (interrupted: partial results)" if report.interrupted else ""),
        f"requests    {report.requests:,}  ({report.requests_per_s:,.1f}/s)",
        f"images      {report.images:,}  ({report.images_per_s:,.1f}/s), "
        f"{report.classified:,} classified",
    ]
    if report.latency is not None:
        latency = report.latency
        lines.append(
            f"latency ms  p50 {latency.p50_ms:.2f}  p90 {latency.p90_ms:.2f}  "
            f"p99 {latency.p99_ms:.2f}  max {latency.max_ms:.2f}  (per {latency.of})"
        )
    lines.append(f"errors      {_counts(report.errors)}")
    if report.mode != "unary":
        lines.append(f"item errors {_counts(report.item_errors)}")
    if report.server is not None:
        server = report.server
        lines.append(
            f"server      {server['architecture']} on {server['execution_provider']}, "
            f"mnist-service {server['server_version']}"
        )
    if report.model_check is not None:
        check = report.model_check
        drawn = (
            f", {check.drawn_correct}/{check.drawn_total} drawn digits read as drawn"
            if check.drawn_correct is not None
            else ""
        )
        lines.append(
            f"model check {check.mismatched:,} answers disagreed with their reference label "
            f"({check.references} references{drawn})"
        )
    lines.append(
        f"client CPU  {report.client_busy:.0%} of wall time ({report.event_loop} event loop)"
    )
    if report.cpu_bound:
        lines.append(
            f"WARNING: the client was CPU-bound (busy {report.client_busy:.0%} of the time), so "
            "these numbers are a lower bound of what the server can do. Run several load "
            "processes at once (and add up their rates), or use h2load."
        )
    if report.model_check is not None and report.model_check.mismatched:
        lines.append("WARNING: some answers under load disagreed with the same image's reference.")
    return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    if not counts:
        return "none"
    return "  ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))


def _latency_json(latency: LatencySummary | None) -> dict[str, Any] | None:
    if latency is None:
        return None
    return {
        "of": latency.of,
        "count": latency.count,
        "mean": round(latency.mean_ms, 4),
        "p50": round(latency.p50_ms, 4),
        "p90": round(latency.p90_ms, 4),
        "p99": round(latency.p99_ms, 4),
        "max": round(latency.max_ms, 4),
    }


def _model_check_json(check: ModelCheck | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        "references": check.references,
        "drawn_correct": check.drawn_correct,
        "drawn_total": check.drawn_total,
        "mismatched": check.mismatched,
    }
