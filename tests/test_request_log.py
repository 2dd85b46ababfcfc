"""The request log: one line per call at info level, with a request id the client can see.

Real servers (two workers, so made-up ids must not repeat across processes), real clients:
the project's async client, grpcio (unary and a stream).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import ModuleType
from typing import Any

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from mnist_service.client import MnistClient

from .conftest import MnistSplit, ServerProcess, png_bytes

PREDICT = "/mnist.Mnist/Predict"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "2", "--log-level", "info")
    yield process
    assert process.stop() == 0


def call_lines(server: ServerProcess, **match: Any) -> list[dict[str, Any]]:
    """Request-log lines matching `match`, waiting briefly for them to be written."""
    deadline = time.monotonic() + 5
    while True:
        lines = [
            e
            for e in server.logs
            if e.get("logger") == "mnist_service.requests"
            and all(e.get(k) == v for k, v in match.items())
        ]
        if lines or time.monotonic() > deadline:
            return lines
        time.sleep(0.05)


async def test_a_client_request_id_is_logged_and_returned(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    async with MnistClient(server.address) as client:
        prediction = await client.predict(png_bytes(images[0]), request_id="order-42/item-7")

    assert prediction.request_id == "order-42/item-7"
    (line,) = call_lines(server, request_id="order-42/item-7")
    assert line["level"] == "info"
    assert line["method"] == PREDICT
    assert line["status"] == "OK"
    assert line["model"] == "conv"
    assert line["label"] == labels[0]
    assert line["batch"] >= 1
    assert line["duration_ms"] > 0
    assert line["peer"].startswith("[::1]:")


async def test_made_up_request_ids_are_returned_and_unique_across_workers(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, _ = mnist_test_set
    data = png_bytes(images[1])
    too_long = "x" * 200

    async def one_connection() -> list[str | None]:
        async with MnistClient(server.address) as client:
            ids = [(await client.predict(data)).request_id for _ in range(5)]
            ids.append((await client.predict(data, request_id=too_long)).request_id)
            return ids

    # Several connections: SO_REUSEPORT spreads them over both workers.
    batches = await asyncio.gather(*(one_connection() for _ in range(8)))
    ids = [i for batch in batches for i in batch]

    assert all(isinstance(i, str) and i for i in ids)
    assert too_long not in ids  # not a sane token: replaced by a made-up one
    assert len(set(ids)) == len(ids)
    pids = {line["pid"] for i in ids for line in call_lines(server, request_id=i)}
    assert len(pids) == 2  # both workers made some up, and none repeated another's


async def test_a_failed_call_is_logged_with_its_status_and_message(
    server: ServerProcess,
) -> None:
    async with MnistClient(server.address) as client:
        with pytest.raises(GRPCError) as refused:
            await client.predict(b"not an image", request_id="bad-image-1")

    assert refused.value.status is Status.INVALID_ARGUMENT
    (line,) = call_lines(server, request_id="bad-image-1")
    assert line["level"] == "info"  # the client's mistake, not a server fault
    assert line["status"] == "INVALID_ARGUMENT"
    assert "784 raw pixels" in line["error"]


async def test_concurrent_calls_log_the_batch_they_rode_in(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, _ = mnist_test_set
    async with MnistClient(server.address) as client:
        await asyncio.gather(
            *(client.predict(png_bytes(images[i]), request_id=f"crowd-{i}") for i in range(64))
        )
    batches = [call_lines(server, request_id=f"crowd-{i}")[0]["batch"] for i in range(64)]
    assert max(batches) > 1  # 64 calls at once on one connection share model runs


def test_grpcio_sees_the_request_id_on_unary_calls_and_streams(
    server: ServerProcess,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, _ = mnist_test_set
    data = png_bytes(images[2])
    with grpc.insecure_channel(server.address) as channel:
        stub = pb2_grpc.MnistStub(channel)
        _, unary = stub.Predict.with_call(
            pb2.MnistImage(data=data), metadata=[("x-request-id", "grpcio-unary")], timeout=30
        )
        stream = stub.PredictStream(
            iter([pb2.MnistImage(data=data)] * 3),
            metadata=[("x-request-id", "grpcio-stream")],
            timeout=30,
        )
        answers = list(stream)

    assert dict(unary.initial_metadata())["x-request-id"] == "grpcio-unary"
    assert dict(stream.initial_metadata())["x-request-id"] == "grpcio-stream"
    assert len(answers) == 3
    (line,) = call_lines(server, request_id="grpcio-stream")
    assert line["method"] == "/mnist.Mnist/PredictStream"
    assert line["items"] == 3


async def test_no_access_log_means_no_lines(mnist_test_set: MnistSplit) -> None:
    images, _ = mnist_test_set
    quiet = ServerProcess("--workers", "1", "--log-level", "info", "--no-access-log")
    try:
        async with MnistClient(quiet.address) as client:
            await client.predict(png_bytes(images[0]), request_id="unlogged")
            with pytest.raises(GRPCError):
                await client.predict(b"")
        await asyncio.sleep(0.2)
    finally:
        assert quiet.stop() == 0
    assert not [e for e in quiet.logs if e.get("logger") == "mnist_service.requests"]
