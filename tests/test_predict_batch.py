"""PredictBatch: in memory for the wire mapping, then through a real server with three clients
(the async client, grpcurl and a grpcio client generated from the shipped proto)."""

from __future__ import annotations

import base64
import json
import subprocess
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from types import ModuleType

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from mnist_service._proto.mnist import MnistImage, MnistStub, PredictBatchRequest
from mnist_service.client import ItemFailure, MnistClient, Prediction
from mnist_service.config import Limits

from .conftest import ROOT, MnistSplit, ServerProcess, png_bytes, run_grpcurl
from .test_service import make_service, raw_image


@pytest.fixture
async def stub() -> AsyncIterator[MnistStub]:
    with ThreadPoolExecutor(2) as executor:
        service = make_service(executor, limits=Limits(max_batch_images=16))
        async with ChannelFor([service]) as channel:
            yield MnistStub(channel)


async def test_results_come_in_request_order_with_per_item_errors(stub: MnistStub) -> None:
    images = [raw_image(n) for n in range(1, 13)]
    images[3] = b""
    images[7] = b"not an image"

    reply = await stub.predict_batch(
        PredictBatchRequest(images=[MnistImage(data=i) for i in images])
    )

    assert [item.index for item in reply.results] == list(range(12))
    for n, item in enumerate(reply.results, start=1):
        if n - 1 in (3, 7):
            assert item.error is not None
            assert item.error.code == Status.INVALID_ARGUMENT.value
        else:
            assert item.prediction is not None
            assert item.prediction.label == n % 10


async def test_the_item_cap_is_invalid_argument(stub: MnistStub) -> None:
    request = PredictBatchRequest(images=[MnistImage(data=raw_image(1))] * 17)

    with pytest.raises(GRPCError) as caught:
        await stub.predict_batch(request)

    assert caught.value.status is Status.INVALID_ARGUMENT
    assert "17 images" in (caught.value.message or "")
    assert "16" in (caught.value.message or "")


async def test_an_empty_batch_gets_an_empty_answer(stub: MnistStub) -> None:
    assert (await stub.predict_batch(PredictBatchRequest())).results == []


# -- through a real server ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--max-batch-images", "100", "--max-batch-size", "16")
    yield process
    assert process.stop() == 0


async def test_async_client_png_and_raw_items(
    batch_server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    payloads: list[bytes] = [png_bytes(images[i]) for i in range(40)]
    payloads += [images[i].tobytes() for i in range(40, 80)]  # raw 784-byte items
    payloads[10] = b"junk"

    async with MnistClient(batch_server.address) as client:
        results = await client.predict_batch(payloads)

    assert len(results) == 80
    assert isinstance(results[10], ItemFailure)
    assert results[10].status is Status.INVALID_ARGUMENT
    predicted = [r.label for i, r in enumerate(results) if i != 10 and isinstance(r, Prediction)]
    expected = [int(labels[i]) for i in range(80) if i != 10]
    assert len(predicted) == 79
    assert sum(p == e for p, e in zip(predicted, expected, strict=True)) >= 78


async def test_async_client_over_the_cap(batch_server: ServerProcess) -> None:
    async with MnistClient(batch_server.address) as client:
        with pytest.raises(GRPCError) as caught:
            await client.predict_batch([raw_image(3)] * 101)

    assert caught.value.status is Status.INVALID_ARGUMENT


def grpcurl_with_proto(
    server: ServerProcess, method: str, stdin: str
) -> subprocess.CompletedProcess[str]:
    """grpcurl with the shipped proto, the request(s) as JSON on stdin."""
    proto = ["-import-path", str(ROOT), "-proto", "mnist.proto"]
    return run_grpcurl("-plaintext", *proto, "-d", "@", server.address, method, stdin=stdin)


def test_grpcurl_predict_batch(batch_server: ServerProcess, mnist_test_set: MnistSplit) -> None:
    images, labels = mnist_test_set
    request = {
        "images": [
            {"data": base64.b64encode(png_bytes(images[0])).decode()},
            {"data": base64.b64encode(images[1].tobytes()).decode()},
            {"data": ""},
        ]
    }

    result = grpcurl_with_proto(batch_server, "mnist.Mnist.PredictBatch", json.dumps(request))

    assert result.returncode == 0, result.stderr
    items = json.loads(result.stdout)["results"]
    assert items[0]["prediction"].get("label", 0) == labels[0]  # proto3 JSON omits a 0
    assert items[1]["index"] == "1"  # uint64 is a string in proto3 JSON
    assert items[1]["prediction"].get("label", 0) == labels[1]
    assert items[2]["error"]["code"] == Status.INVALID_ARGUMENT.value


def test_grpcurl_predict_stream(batch_server: ServerProcess, mnist_test_set: MnistSplit) -> None:
    """PredictStream from grpcurl: PNG and raw items, a bad one, answers in request order."""
    images, labels = mnist_test_set
    items = [png_bytes(images[0]), images[1].tobytes(), b"", png_bytes(images[2])]
    stdin = "\n".join(json.dumps({"data": base64.b64encode(item).decode()}) for item in items)

    result = grpcurl_with_proto(batch_server, "mnist.Mnist.PredictStream", stdin)

    assert result.returncode == 0, result.stderr
    decoder = json.JSONDecoder()
    text, replies = result.stdout.strip(), []
    while text:
        reply, end = decoder.raw_decode(text)
        replies.append(reply)
        text = text[end:].strip()
    assert [int(r.get("index", 0)) for r in replies] == [0, 1, 2, 3]
    assert replies[0]["prediction"].get("label", 0) == labels[0]
    assert replies[1]["prediction"].get("label", 0) == labels[1]
    assert replies[2]["error"]["code"] == Status.INVALID_ARGUMENT.value
    assert replies[3]["prediction"].get("label", 0) == labels[2]


def test_grpcio_client_predict_batch(
    batch_server: ServerProcess,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    with grpc.insecure_channel(batch_server.address) as channel:
        stub = pb2_grpc.MnistStub(channel)
        reply = stub.PredictBatch(
            pb2.PredictBatchRequest(
                images=[pb2.MnistImage(data=png_bytes(i)) for i in images[:50]]
            ),
            timeout=30,
        )
        with pytest.raises(grpc.RpcError) as caught:
            stub.PredictBatch(
                pb2.PredictBatchRequest(images=[pb2.MnistImage(data=b"x")] * 101), timeout=30
            )

    assert [item.index for item in reply.results] == list(range(50))
    labels_back = [item.prediction.label for item in reply.results]
    assert sum(a == b for a, b in zip(labels_back, labels[:50], strict=True)) >= 49
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
