"""The request paths (gRPC and HTTP) leave no reference cycles, on success or on error.

What a call allocates is freed by reference counting as soon as the call ends, so memory
follows the traffic. An object in a cycle waits for the collector instead: an error kept
in a local of a frame its traceback holds (a bad item of a PredictBatch, a refused item of a
PredictStream) used to keep those frames, and the images' bytes they hold, for as long as the
collector took to come round. Each gRPC case runs calls through the real server in memory
(`bench.call_path.Bench`: the server's protocol, services, pipeline and batcher, a stub
model), each HTTP case through the real `HttpServer` on loopback from a raw HTTP/1.1 client;
then what only the collector could free is counted.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import socket
import types
from collections import Counter
from concurrent.futures import ThreadPoolExecutor

import pytest

from bench.call_path import Bench, StubClassifier
from bench.payloads import render
from mnist_service._proto.inference import (
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
)
from mnist_service._proto.mnist import MnistImage, PredictBatchRequest
from mnist_service.config import Limits
from mnist_service.engine.batcher import Batcher
from mnist_service.engine.pipeline import Pipeline
from mnist_service.engine.versions import ModelRegistry, VersionedModel
from mnist_service.http import HttpServer
from mnist_service.http.api import Models

from .conftest import MnistSplit

CALLS = 16
PREDICT = "/mnist.Mnist/Predict"
INFER = "/inference.GRPCInferenceService/ModelInfer"


def infer_request(*items: bytes) -> bytes:
    """A ModelInfer of image files, as tritonclient sends them."""
    raw = b"".join(len(item).to_bytes(4, "little") + item for item in items)
    tensor = ModelInferRequestInferInputTensor(
        name="image_file", datatype="BYTES", shape=[len(items)]
    )
    return bytes(
        ModelInferRequest(model_name="mnist_convnet", inputs=[tensor], raw_input_contents=[raw])
    )


def cases(png: bytes) -> dict[str, tuple[str, list[bytes], int, bool]]:
    """Name -> (path, request messages, calls in flight, whether the calls fail)."""
    image = bytes(MnistImage(data=png))
    bad = bytes(MnistImage(data=b"not an image"))
    blank = bytes(MnistImage(data=bytes(784)))
    batch = PredictBatchRequest(
        images=[MnistImage(data=png), MnistImage(data=b"x"), MnistImage(data=bytes(784))]
    )
    return {
        "Predict": (PREDICT, [image], CALLS, False),
        "Predict, undecodable": (PREDICT, [bad], CALLS, True),
        "Predict, blank": (PREDICT, [blank], CALLS, True),
        "Predict, malformed message": (PREDICT, [b"\x0a\xff"], CALLS, True),
        # items fail, the calls do not
        "PredictBatch, bad items": ("/mnist.Mnist/PredictBatch", [bytes(batch)], CALLS, False),
        "PredictStream, bad items": ("/mnist.Mnist/PredictStream", [image, bad, blank], CALLS,
                                     False),
        # 64 streams of 64 images pass the admission limit (2,048): items are refused
        "PredictStream, overloaded": ("/mnist.Mnist/PredictStream", [image] * 64, 64, False),
        "ModelInfer": (INFER, [infer_request(png)], CALLS, False),
        "ModelInfer, a bad item of two": (INFER, [infer_request(png, b"x")], CALLS, True),
        "ModelInfer, unknown model": (INFER, [infer_request(png).replace(b"convnet", b"nonexx")],
                                      CALLS, True),
        "unknown method": ("/mnist.Mnist/Nope", [b""], CALLS, True),
    }  # fmt: skip


@pytest.fixture(scope="module")
def png(mnist_test_set: MnistSplit) -> bytes:
    return render("mnist-png", mnist_test_set[0][0], 0)


@pytest.mark.parametrize("name", list(cases(b"")))
def test_calls_leave_nothing_for_the_collector(png: bytes, name: str) -> None:
    path, messages, in_flight, fails = cases(png)[name]

    async def run() -> tuple[int, int, Counter[str]]:
        bench = Bench()
        try:
            await bench.round(path, messages, in_flight, in_flight)  # warm: first-time objects
            gc.collect()
            gc.disable()
            try:
                _, failed = await bench.round(path, messages, in_flight, in_flight)
                gc.set_debug(gc.DEBUG_SAVEALL)
                found = gc.collect()
                frames = Counter(
                    f"{item.f_code.co_filename.rpartition('/')[2]}:{item.f_code.co_name}"
                    for item in gc.garbage
                    if isinstance(item, types.FrameType)
                )
            finally:
                gc.set_debug(0)
                gc.garbage.clear()
                gc.enable()
            return found, failed, frames
        finally:
            bench.executor.shutdown()

    found, failed, frames = asyncio.run(run())
    assert found == 0, f"{found} objects in cycles after {in_flight} calls; frames: {frames}"
    assert failed == (in_flight if fails else 0)


def http_request(method: str, path: str, body: bytes = b"", **headers: str) -> bytes:
    """One HTTP/1.1 request on a kept-alive connection."""
    lines = [f"{method} {path} HTTP/1.1", "Host: test", f"Content-Length: {len(body)}"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


def http_cases(png: bytes) -> dict[str, tuple[bytes, int]]:
    """Name -> (request, HTTP status). aiohttp's own 404 is left out: its router keeps a
    small cycle of its own (the route and its refusal, no frames, no request data)."""
    files = [base64.b64encode(item).decode() for item in (png, b"not an image")]
    oip_two = {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [2], "data": files}]}
    octets, json_type = "application/octet-stream", "application/json"
    return {
        "predict": (http_request("POST", "/v1/predict", png, content_type=octets), 200),
        "predict, undecodable": (
            http_request("POST", "/v1/predict", b"not an image", content_type=octets), 400),
        "predict, blank": (http_request("POST", "/v1/predict", bytes(784), content_type=octets),
                           400),
        "predict, past its deadline": (
            http_request("POST", "/v1/predict", png, content_type=octets,
                         x_request_timeout="0.000001"), 504),
        "batch, malformed JSON": (
            http_request("POST", "/v1/predict:batch", b"{not json", content_type=json_type), 400),
        "batch, a bad item": (
            http_request("POST", "/v1/predict:batch", json.dumps({"images": files}).encode(),
                         content_type=json_type), 200),
        "OIP infer, a bad item of two": (
            http_request("POST", "/v2/models/mnist_convnet/infer", json.dumps(oip_two).encode(),
                         content_type=json_type), 400),
    }  # fmt: skip


@pytest.mark.parametrize("name", list(http_cases(b"")))
def test_http_calls_leave_nothing_for_the_collector(png: bytes, name: str) -> None:
    request, status = http_cases(png)[name]

    async def call(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        fields = {
            name.lower(): value
            for name, _, value in (line.partition(": ") for line in head.decode().split("\r\n"))
        }
        await reader.readexactly(int(fields["content-length"]))
        return int(head.split(b" ")[1])

    async def run() -> tuple[int, list[int]]:
        limits = Limits()
        with ThreadPoolExecutor(1) as executor:
            pipeline = Pipeline(
                Batcher(StubClassifier()),
                max_image_pixels=limits.max_image_pixels,
                executor=executor,
            )
            server = HttpServer(
                Models(ModelRegistry([VersionedModel.single("conv", pipeline)], "mnist_convnet")),
                limits=limits,
                executor=executor,
                observer=lambda call: None,
                ready=lambda: True,
            )
            await server.start(socket.create_server(("::1", 0), family=socket.AF_INET6), None)
            reader, writer = await asyncio.open_connection("::1", server.port)
            try:
                await call(reader, writer)  # warm: first-time objects
                gc.collect()
                gc.disable()
                try:
                    statuses = [await call(reader, writer) for _ in range(CALLS)]
                    found = gc.collect()
                finally:
                    gc.enable()
            finally:
                writer.close()
                await server.close()
        return found, statuses

    found, statuses = asyncio.run(run())
    assert statuses == [status] * CALLS
    assert found == 0, f"{found} objects in cycles after {CALLS} calls"
