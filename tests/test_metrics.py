"""Prometheus metrics from a real two-worker server, scraped during and after real traffic.

The counts must add up to the calls made, across both worker processes (one scrape covers
them all), and every documented series must be there.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import Iterator

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client.parser import text_string_to_metric_families

from mnist_service.client import MnistClient

from .conftest import MnistSplit, ServerProcess, png_bytes
from .waiting import eventually

PREDICT = "/mnist.Mnist/Predict"
BATCH = "/mnist.Mnist/PredictBatch"

SERIES = {
    "mnist_request_success",
    "mnist_request_failure",
    "mnist_request_duration_seconds",
    "mnist_inference_queue_duration_seconds",
    "mnist_inference_compute_duration_seconds",
    "mnist_inference_count",
    "mnist_inference_exec_count",
    "mnist_inference_batch_size",
    "mnist_requests_in_flight",
    "mnist_inference_queue_images",
    "mnist_model_info",
}


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "2", "--log-level", "info", "--metrics-address", "[::1]:0")
    yield process
    assert process.stop() == 0


def metrics_port(server: ServerProcess) -> int:
    serving = next(e for e in server.logs if str(e.get("message", "")).startswith("serving"))
    return int(serving["metrics_port"])


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]
"""A scrape: each sample's value by its name and sorted labels."""


def scrape(server: ServerProcess) -> Samples:
    url = f"http://[::1]:{metrics_port(server)}/metrics"
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        text = response.read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def value(samples: Samples, name: str, **labels: str) -> float:
    wanted = tuple(sorted(labels.items()))
    return sum(v for (n, ls), v in samples.items() if n == name and set(wanted) <= set(ls))


async def traffic(address: str, images: list[bytes], connections: int) -> tuple[int, int, int]:
    """Predict calls (some invalid) and PredictBatch calls over several connections, so both
    workers serve some; (OK predicts, INVALID_ARGUMENT predicts, images in OK batches)."""
    ok = invalid = batched = 0

    async def one_connection(index: int) -> None:
        nonlocal ok, invalid, batched
        async with MnistClient(address, timeout=30) as client:
            for i, data in enumerate(images):
                if (i + index) % 5:
                    await client.predict(data)
                    ok += 1
                else:
                    with pytest.raises(GRPCError) as refused:
                        await client.predict(b"not an image")
                    assert refused.value.status is Status.INVALID_ARGUMENT
                    invalid += 1
            await client.predict_batch(images[:8])
            batched += 8

    await asyncio.gather(*(one_connection(i) for i in range(connections)))
    return ok, invalid, batched


async def test_metrics_add_up_to_the_calls_made(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, _ = mnist_test_set
    data = [png_bytes(images[i]) for i in range(40)]
    before = scrape(server)

    ok, invalid, batched = await traffic(server.address, data, connections=8)
    calls = ok + invalid + 8  # and a PredictBatch on each connection

    def settled() -> Samples | None:
        """A scrape that has every call, with the in-flight gauges (sampled every half
        second, not counted per call) back at 0."""
        samples = scrape(server)
        recorded = value(samples, "mnist_request_duration_seconds_count") - value(
            before, "mnist_request_duration_seconds_count"
        )
        idle = value(samples, "mnist_requests_in_flight") == 0
        empty = value(samples, "mnist_inference_queue_images") == 0
        return samples if recorded >= calls and idle and empty else None

    after = await eventually(settled, "every call in the metrics and their gauges back at 0")

    def delta(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert _families(after) >= SERIES
    assert delta("mnist_request_success_total", method=PREDICT) == ok
    assert delta("mnist_request_success_total", method=BATCH) == 8
    assert delta("mnist_request_failure_total", method=PREDICT, code="INVALID_ARGUMENT") == invalid
    assert delta("mnist_request_duration_seconds_count", method=PREDICT) == ok + invalid
    # Every valid image was inferred once, in model runs of one or more images.
    assert delta("mnist_inference_count_total") == ok + batched
    runs = delta("mnist_inference_exec_count_total")
    assert 1 <= runs <= ok + batched
    assert delta("mnist_inference_batch_size_count") == runs
    assert delta("mnist_inference_batch_size_sum") == ok + batched
    assert delta("mnist_inference_compute_duration_seconds_count") == runs
    assert delta("mnist_inference_queue_duration_seconds_count") == ok + 8  # per caller
    # 8 connections spread over 2 workers by SO_REUSEPORT: one scrape sums every worker.
    assert value(after, "mnist_requests_in_flight") == 0
    assert value(after, "mnist_inference_queue_images") == 0
    info = [labels for (name, labels), v in after.items() if name == "mnist_model_info" and v == 1]
    assert len(info) == 1
    assert dict(info[0])["architecture"] == "conv"
    assert dict(info[0])["provider"] == "CPUExecutionProvider"
    assert len(dict(info[0])["weights_sha256"]) == 64


def _families(samples: Samples) -> set[str]:
    names = set()
    for name, _ in samples:
        for suffix in ("_total", "_count", "_sum", "_bucket", "_created"):
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names
