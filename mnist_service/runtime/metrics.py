"""Prometheus metrics, served on their own HTTP port (`--metrics-address`; off unless asked).

Every server process records into prometheus-client's multiprocess mode: each process writes
its values to memory-mapped files in one directory, and the process that serves `/metrics`
(the supervisor with `--workers N`, else the server itself) sums them at scrape time. So one
scrape covers every worker: counters and histograms add up across workers (and keep what a
restarted worker counted before it died), gauges of in-flight and queued work are the sum
over live workers, and the model-info gauge is the same in every worker.

The multiprocess directory must be known before prometheus-client is imported: `prepare`
sets it (a fresh temporary directory unless PROMETHEUS_MULTIPROC_DIR is set), and only then
does anything import this module's users. Recording costs a few microseconds per call and is
done only when metrics are on.

Names follow Triton's (`..._request_success`, `..._inference_count`, `..._exec_count`,
`..._queue_duration_...`) and the Prometheus conventions (base units in the name, `_total`
on counters). docs/operations.md has the table.
"""

from __future__ import annotations

import os
import socket
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from grpclib.const import Status

from ..config import format_address
from ..engine.batcher import BatchRecord
from ..errors import ConfigError

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"

LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
"""Seconds, from half a millisecond (one image on an idle server) to ten (a big batch)."""
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


def prepare() -> Path:
    """Choose the multiprocess directory (before prometheus-client is imported anywhere)."""
    directory = os.environ.get(MULTIPROC_ENV)
    if not directory:
        directory = tempfile.mkdtemp(prefix="mnist-metrics-")
        os.environ[MULTIPROC_ENV] = directory
    path = Path(directory)
    path.mkdir(parents=True, exist_ok=True)
    for stale in path.glob("*.db"):  # a previous run's values would be summed in
        stale.unlink()
    return path


@dataclass
class Exporter:
    """The `/metrics` endpoint: an HTTP server thread in this process, summing what every
    process records into the multiprocess directory."""

    port: int
    server: Any
    thread: threading.Thread

    @classmethod
    def start(cls, host: str, port: int) -> Exporter:
        """Prepare the multiprocess directory and serve on `host`:`port` (0: a free port)."""
        prepare()
        from prometheus_client import CollectorRegistry, start_http_server
        from prometheus_client.multiprocess import MultiProcessCollector

        registry = CollectorRegistry()
        MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        try:
            server, thread = start_http_server(port, addr=host, registry=registry)
        except OSError as exc:
            raise ConfigError(
                f"cannot serve metrics on {format_address(host, port)}: {exc.strerror}"
            ) from None
        return cls(server.server_port, server, thread)

    @property
    def socket(self) -> socket.socket:
        """The listening socket (forked workers close their copy)."""
        sock: socket.socket = self.server.socket
        return sock

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


def process_gone(pid: int) -> None:
    """Drop a dead worker's live gauges (its counters stay: they count what it did)."""
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(pid)  # type: ignore[no-untyped-call]


class Metrics:
    """What one server process records. Create it after `prepare`, in the process that
    records (a forked worker creates its own)."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        # Values go to the multiprocess files whatever the registry; a registry of its own
        # lets several servers live in one process (tests) without clashing names.
        registry = CollectorRegistry()

        self.request_success = Counter(
            "mnist_request_success_total",
            "Calls answered OK, by RPC (or HTTP route) and protocol.",
            ["method", "protocol"],
            registry=registry,
        )
        self.request_failure = Counter(
            "mnist_request_failure_total",
            "Calls that ended with a status other than OK, by RPC (or HTTP route), status code"
            " and protocol.",
            ["method", "code", "protocol"],
            registry=registry,
        )
        self.request_duration = Histogram(
            "mnist_request_duration_seconds",
            "From a call's arrival to its status, by RPC (or HTTP route) and protocol.",
            ["method", "protocol"],
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.queue_duration = Histogram(
            "mnist_inference_queue_duration_seconds",
            "How long a caller's images waited in the batcher's queue for a model run.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.compute_duration = Histogram(
            "mnist_inference_compute_duration_seconds",
            "How long one model run (one batch) took.",
            buckets=LATENCY_BUCKETS,
            registry=registry,
        )
        self.inference_count = Counter(
            "mnist_inference_count_total",
            "Model input rows inferred: an image each, a reread digit's shifted views each.",
            registry=registry,
        )
        self.exec_count = Counter(
            "mnist_inference_exec_count_total",
            "Model runs (batches); images / runs = batch fill.",
            registry=registry,
        )
        self.batch_size = Histogram(
            "mnist_inference_batch_size",
            "Model input rows per model run.",
            buckets=BATCH_BUCKETS,
            registry=registry,
        )
        self.in_flight = Gauge(
            "mnist_requests_in_flight",
            "Calls being handled now (all workers).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.queued = Gauge(
            "mnist_inference_queue_images",
            "Images accepted and not yet answered (all workers; --max-queue bounds each).",
            multiprocess_mode="livesum",
            registry=registry,
        )
        self.model_info = Gauge(
            "mnist_model_info",
            "The model served: 1, labelled with what it is.",
            ["architecture", "provider", "weights_sha256"],
            multiprocess_mode="max",
            registry=registry,
        )
        self.model_version = Gauge(
            "mnist_model_version_served",
            "1 for each model version a worker serves now (0 once retired), by model and version.",
            ["model", "version"],
            multiprocess_mode="livemax",
            registry=registry,
        )
        self.version_inference = Counter(
            "mnist_model_version_inference_total",
            "Model input rows inferred, by model and version.",
            ["model", "version"],
            registry=registry,
        )
        self.model_loads = Counter(
            "mnist_model_loads_total",
            "Load and unload requests (the control API, SIGHUP), by model, action and outcome"
            " (done, unchanged, refused).",
            ["model", "action", "outcome"],
            registry=registry,
        )
        self._success: dict[tuple[str, str], Any] = {}
        self._duration: dict[tuple[str, str], Any] = {}

    def describe_model(self, architecture: str, provider: str, weights_sha256: str) -> None:
        self.model_info.labels(architecture, provider, weights_sha256).set(1)

    def version_served(self, model: str, version: str, served: bool) -> None:
        """A model version started (or stopped) serving in this process."""
        self.model_version.labels(model, version).set(1 if served else 0)

    def record_load(self, model: str, action: str, outcome: str) -> None:
        """One load or unload request and how it ended."""
        self.model_loads.labels(model, action, outcome).inc()

    def version_batches(self, model: str, version: str) -> Any:
        """The batch observer of one model version: `record_batch`, and its rows by version."""
        rows = self.version_inference.labels(model, version)

        def observe(batch: BatchRecord) -> None:
            self.record_batch(batch)
            rows.inc(batch.images)

        return observe

    def record_call(
        self, method: str, status: Status, seconds: float, protocol: str = "grpc"
    ) -> None:
        """One finished call (`protocol`: grpc or http; an HTTP call's method is its route)."""
        key = (method, protocol)
        if status is Status.OK:
            counter = self._success.get(key)
            if counter is None:
                counter = self._success[key] = self.request_success.labels(method, protocol)
            counter.inc()
        else:
            self.request_failure.labels(method, status.name, protocol).inc()
        duration = self._duration.get(key)
        if duration is None:
            duration = self._duration[key] = self.request_duration.labels(method, protocol)
        duration.observe(seconds)

    def record_batch(self, batch: BatchRecord) -> None:
        """One model run."""
        self.inference_count.inc(batch.images)
        self.exec_count.inc()
        self.batch_size.observe(batch.images)
        self.compute_duration.observe(batch.seconds)
        for wait in batch.waits:
            self.queue_duration.observe(wait)

    def sample(self, in_flight: int, queued: int) -> None:
        """The gauges of work in progress (sampled, not counted per call)."""
        self.in_flight.set(in_flight)
        self.queued.set(queued)
