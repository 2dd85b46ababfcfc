"""The request paths leave no reference cycles, on success or on error.

What a call allocates is freed by reference counting as soon as the call ends, so memory
follows the traffic. An object in a cycle waits for the collector instead: an error kept
in a local of a frame its traceback holds (a bad item of a PredictBatch, a refused item of a
PredictStream) used to keep those frames, and the images' bytes they hold, for as long as the
collector took to come round. Each case runs calls through the real server in memory
(`bench.call_path.Bench`: the server's protocol, services, pipeline and batcher, a stub
model), then counts what only the collector could free.
"""

from __future__ import annotations

import asyncio
import gc
import types
from collections import Counter

import pytest

from bench.call_path import Bench
from bench.payloads import render
from mnist_service._proto.inference import (
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
)
from mnist_service._proto.mnist import MnistImage, PredictBatchRequest

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
