"""A real server at the default `--log-level info` (the rest of the end-to-end suite runs at
debug): unary calls and streams through real clients, deadlines, the drain, and what is (not)
logged at that level. Waits are for events (a census of the server's calls, a log line, the
client's connection retired), never for a fixed time."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
from collections.abc import Iterator
from types import ModuleType

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from mnist_service.client import ItemFailure, MnistClient, Prediction

from .conftest import ROOT, MnistSplit, ServerProcess, png_bytes, run_grpcurl
from .test_census import census
from .waiting import eventually


@pytest.fixture(scope="module")
def info_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--log-level", "info", "--workers", "1")
    yield process
    assert process.stop() == 0


async def test_unary_rpcs_through_the_async_client(
    info_server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    async with MnistClient(info_server.address, timeout=30) as client:
        single = await client.predict(png_bytes(images[0]))
        batch = await client.predict_batch([png_bytes(images[1]), b"", images[2].tobytes()])
        info = await client.model_info()
        with pytest.raises(GRPCError) as refused:
            await client.predict(b"not an image")

    assert isinstance(single, Prediction)
    assert single.label == labels[0]
    assert isinstance(batch[0], Prediction)
    assert batch[0].label == labels[1]
    assert isinstance(batch[1], ItemFailure)
    assert batch[1].status is Status.INVALID_ARGUMENT
    assert isinstance(batch[2], Prediction)
    assert batch[2].label == labels[2]
    assert info.architecture == "conv"
    assert refused.value.status is Status.INVALID_ARGUMENT
    assert "784 raw pixels" in (refused.value.message or "")


def test_grpcurl_predict_and_error(info_server: ServerProcess, mnist_test_set: MnistSplit) -> None:
    images, labels = mnist_test_set
    request = json.dumps({"data": base64.b64encode(png_bytes(images[3])).decode()})
    proto = ["-import-path", str(ROOT), "-proto", "mnist.proto"]

    ok = run_grpcurl("-plaintext", *proto, "-d", "@", info_server.address,
                     "mnist.Mnist.Predict", stdin=request)  # fmt: skip
    bad = run_grpcurl("-plaintext", *proto, "-d", '{"data": ""}', info_server.address,
                      "mnist.Mnist.Predict")  # fmt: skip

    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout).get("label", 0) == labels[3]  # proto3 JSON omits a 0
    assert bad.returncode != 0
    assert "InvalidArgument" in bad.stderr


def test_grpcio_client_unary_calls_and_statuses(
    info_server: ServerProcess,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    with grpc.insecure_channel(info_server.address) as channel:
        stub = pb2_grpc.MnistStub(channel)
        reply = stub.Predict(pb2.MnistImage(data=png_bytes(images[4])), timeout=30)
        batch = stub.PredictBatch(
            pb2.PredictBatchRequest(images=[pb2.MnistImage(data=png_bytes(images[5]))]),
            timeout=30,
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.Predict(pb2.MnistImage(data=bytes(784)), timeout=30)

    assert reply.label == labels[4]
    assert batch.results[0].prediction.label == labels[5]
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "no ink" in (caught.value.details() or "")


async def test_deadline_and_drain(mnist_test_set: MnistSplit) -> None:
    """A call whose deadline passes while it waits for its batch is cut short, the server
    goes on serving, and during a drain queued calls finish while the port takes no new
    connection (the client's GOAWAY-tolerant channel tries a new one for its next call)."""
    images, labels = mnist_test_set
    server = ServerProcess(
        "--log-level", "info", "--workers", "1", "--max-batch-delay", "400000"
    )  # fmt: skip
    async with MnistClient(server.address, timeout=30) as client:
        with pytest.raises((TimeoutError, GRPCError)):
            await client.predict(png_bytes(images[6]), timeout=0.1)
        queued = asyncio.ensure_future(client.predict(png_bytes(images[7])))
        await eventually(
            lambda: asyncio.to_thread(lambda: census(server)["calls"] == 1), "the queued call"
        )
        server.process.send_signal(signal.SIGTERM)
        await eventually(lambda: client._channel.retired > 0, "the drain's GOAWAY")
        with pytest.raises(ConnectionRefusedError):
            await client.predict(png_bytes(images[8]))
        answered = await queued
    assert server.wait(30) == 0

    assert isinstance(answered, Prediction)
    assert answered.label == labels[7]


async def test_client_cancels_and_deadlines_are_not_logged_as_faults(
    mnist_test_set: MnistSplit,
) -> None:
    """At the default log level, neither a cancelled stream nor a missed deadline produces a
    log line beyond the request log's: they are the client's doing, not the server's."""
    images, _ = mnist_test_set
    server = ServerProcess("--log-level", "info", "--workers", "1", "--max-batch-delay", "300000")
    try:
        async with MnistClient(server.address, timeout=30) as client:
            stream = client.predict_many(png_bytes(image) for image in images[:50])
            await anext(stream)
            await stream.aclose()  # cancels the call mid-stream
            with pytest.raises((TimeoutError, GRPCError)):
                await client.predict(png_bytes(images[0]), timeout=0.05)
            with pytest.raises((TimeoutError, GRPCError)):
                async for _ in client.predict_many([png_bytes(images[2])] * 3, timeout=0.05):
                    pass
            # the server has ended the three calls when the request log has them
            await eventually(
                lambda: (
                    len([e for e in server.logs if e.get("message", "").startswith("call ")]) >= 3
                ),
                "the three calls in the request log",
            )
            assert (await client.predict(png_bytes(images[1]))).label == mnist_test_set[1][1]
    finally:
        assert server.stop() == 0

    lines = [
        e for e in server.logs if e.get("logger", "").startswith(("grpclib", "mnist_service."))
    ]
    noisy = [
        e for e in lines if e.get("level") not in ("info",) or e["logger"].startswith("grpclib")
    ]
    assert noisy == [], noisy


async def test_past_max_queue_calls_are_refused_at_once(mnist_test_set: MnistSplit) -> None:
    """With 4 images allowed to wait (held by a long batch delay), the 5th to 8th concurrent
    calls get RESOURCE_EXHAUSTED without waiting; once the 4 are answered, calls go through."""
    images, labels = mnist_test_set
    server = ServerProcess(
        "--log-level", "info", "--workers", "1", "--max-queue", "4",
        "--max-batch-images", "4", "--max-batch-delay", "500000",
    )  # fmt: skip
    try:
        async with MnistClient(server.address, timeout=30) as client:
            results = await asyncio.gather(
                *(client.predict(png_bytes(images[i])) for i in range(8)), return_exceptions=True
            )
            after = await client.predict(png_bytes(images[9]))
    finally:
        assert server.stop() == 0

    answered = [r for r in results if isinstance(r, Prediction)]
    refused = [r for r in results if isinstance(r, GRPCError)]
    assert len(answered) == 4
    assert len(refused) == 4
    assert all(r.status is Status.RESOURCE_EXHAUSTED for r in refused)
    assert "retry later" in (refused[0].message or "")
    assert after.label == labels[9]
