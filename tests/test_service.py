"""The Mnist service's gRPC plumbing, in memory (grpclib.testing.ChannelFor).

A fake classifier stands in for the model here: these tests are about the wire mapping,
error statuses, streaming order and limits, not about inference (tests/test_inference.py and
tests/test_end_to_end.py use the real ONNX files).
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from mnist_service._proto.mnist import MnistImage, MnistStub, ModelInfoRequest
from mnist_service.api.mnist import MnistService
from mnist_service.config import Limits
from mnist_service.constants import IMAGE_SIZE, NUM_CLASSES
from mnist_service.engine.batcher import Batcher
from mnist_service.engine.inference import FloatArray, ModelInfo
from mnist_service.engine.pipeline import Pipeline
from mnist_service.errors import (
    BlankImageError,
    CompressionError,
    DeadlineExpiredError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageError,
    MessageTooLargeError,
    MnistServiceError,
    ModelControlError,
    ModelError,
    RepositoryError,
    UndecodableImageError,
)
from mnist_service.status import status_for
from mnist_service.transport.codec import SizeLimitedCodec

FAKE_INFO = ModelInfo(
    architecture="conv",
    weights_path=Path("fake.onnx"),
    weights_sha256="0" * 64,
    input_name="image",
    input_shape=(-1, 1, IMAGE_SIZE, IMAGE_SIZE),
    execution_provider="CPUExecutionProvider",
    metadata={"test_accuracy": "1.0"},
)


class CountingClassifier:
    """Predicts (number of full-ink pixels) mod 10; sleeps longer for fewer pixels."""

    info = FAKE_INFO

    def __init__(self, *, slow: bool = False) -> None:
        self.slow = slow

    def classify(self, batch: FloatArray) -> FloatArray:
        counts = np.rint(batch.reshape(len(batch), -1).sum(axis=1)).astype(int)
        if self.slow:  # later (larger) items finish first: responses must still keep order
            time.sleep(0.002 * max(0, 30 - int(counts[0])))
        probabilities = np.zeros((len(batch), NUM_CLASSES), dtype=np.float32)
        probabilities[np.arange(len(batch)), counts % NUM_CLASSES] = 1.0
        return probabilities


def raw_image(ink_pixels: int) -> bytes:
    """784 raw MNIST-format bytes with `ink_pixels` white pixels (no other ink)."""
    pixels = np.zeros(IMAGE_SIZE * IMAGE_SIZE, dtype=np.uint8)
    pixels[:ink_pixels] = 255
    return pixels.tobytes()


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(4) as pool:
        yield pool


def make_service(
    executor: ThreadPoolExecutor,
    *,
    slow: bool = False,
    limits: Limits | None = None,
    classifier: CountingClassifier | None = None,
) -> MnistService:
    limits = limits or Limits()
    classifier = classifier or CountingClassifier(slow=slow)
    # The model runs in the executor: the slow fake sleeps, and must not block the loop.
    batcher = Batcher(classifier, max_batch_size=8, executor=executor)
    pipeline = Pipeline(batcher, max_image_pixels=limits.max_image_pixels, executor=executor)
    return MnistService(pipeline, limits=limits)


@pytest.fixture
async def stub(executor: ThreadPoolExecutor) -> AsyncIterator[MnistStub]:
    limits = Limits(max_message_bytes=64 * 1024, max_image_pixels=1000 * 1000)
    service = make_service(executor, limits=limits)
    async with ChannelFor([service], codec=SizeLimitedCodec(limits.max_message_bytes)) as channel:
        yield MnistStub(channel)


async def test_predict_returns_label_and_probabilities(stub: MnistStub) -> None:
    prediction = await stub.predict(MnistImage(data=raw_image(7)))

    assert prediction.label == 7
    assert len(prediction.probabilities) == NUM_CLASSES
    assert prediction.probabilities[7] == 1.0


@pytest.mark.parametrize(
    ("data", "fragment"),
    [
        pytest.param(b"", "empty", id="empty"),
        pytest.param(b"definitely not an image", "784 raw pixels", id="garbage"),
        pytest.param(raw_image(0), "no ink", id="blank-raw-pixels"),
        pytest.param(raw_image(5)[:-1], "got 783 bytes", id="783-bytes"),
    ],
)
async def test_bad_images_are_invalid_argument_and_service_keeps_serving(
    stub: MnistStub, data: bytes, fragment: str
) -> None:
    with pytest.raises(GRPCError) as caught:
        await stub.predict(MnistImage(data=data))

    assert caught.value.status is Status.INVALID_ARGUMENT
    assert fragment in (caught.value.message or "").lower()
    assert (await stub.predict(MnistImage(data=raw_image(3)))).label == 3


async def test_oversize_message_is_resource_exhausted(stub: MnistStub) -> None:
    with pytest.raises(GRPCError) as caught:
        await stub.predict(MnistImage(data=b"\x00" * (65 * 1024)))

    assert caught.value.status is Status.RESOURCE_EXHAUSTED
    assert "limit" in (caught.value.message or "")
    assert (await stub.predict(MnistImage(data=raw_image(4)))).label == 4


async def test_stream_answers_in_request_order_with_per_item_errors(
    executor: ThreadPoolExecutor,
) -> None:
    service = make_service(executor, slow=True, limits=Limits(max_stream_in_flight=8))
    requests = [MnistImage(data=raw_image(n)) for n in range(1, 25)]
    requests[5] = MnistImage(data=b"")
    requests[9] = MnistImage(data=b"junk")

    async with ChannelFor([service]) as channel:
        items = [item async for item in MnistStub(channel).predict_stream(requests)]

    assert [item.index for item in items] == list(range(len(requests)))
    for n, item in enumerate(items, start=1):
        if n - 1 in (5, 9):
            assert item.prediction is None
            assert item.error is not None
            assert item.error.code == Status.INVALID_ARGUMENT.value
        else:
            assert item.prediction is not None
            assert item.prediction.label == n % 10


async def test_empty_stream_gives_no_responses(stub: MnistStub) -> None:
    assert [item async for item in stub.predict_stream([])] == []


async def test_model_info_reports_the_predictor(stub: MnistStub) -> None:
    info = await stub.get_model_info(ModelInfoRequest())

    assert info.architecture == "conv"
    assert info.input_shape == [-1, 1, 28, 28]
    assert info.execution_provider == "CPUExecutionProvider"
    assert info.metadata == {"test_accuracy": "1.0", "model_version": "1", "served_versions": "1"}
    assert info.server_version


@pytest.mark.parametrize(
    ("error", "status"),
    [
        (EmptyImageError("x"), Status.INVALID_ARGUMENT),
        (UndecodableImageError("x"), Status.INVALID_ARGUMENT),
        (ImageTooLargeError("x"), Status.INVALID_ARGUMENT),
        (BlankImageError("x"), Status.INVALID_ARGUMENT),
        (InvalidImageError("x"), Status.INVALID_ARGUMENT),
        (MessageTooLargeError("x"), Status.RESOURCE_EXHAUSTED),
        (DeadlineExpiredError("x"), Status.DEADLINE_EXCEEDED),
        (CompressionError("x"), Status.INTERNAL),
        (ModelError("x"), Status.INVALID_ARGUMENT),
        (RepositoryError("x"), Status.INVALID_ARGUMENT),
        (ModelControlError("x"), Status.UNAVAILABLE),
        (MnistServiceError("x"), Status.INTERNAL),
    ],
    ids=lambda value: type(value).__name__ if isinstance(value, Exception) else value.name,
)
def test_error_status_table(error: MnistServiceError, status: Status) -> None:
    assert status_for(error) is status


async def test_stream_in_flight_limit_applies_back_pressure(
    executor: ThreadPoolExecutor,
) -> None:
    """With a limit of 2, the server never has more than 2 items of one stream in flight:
    the batcher (which takes up to 8) never sees more than 2 at once."""
    peak = 0

    class Gauge(CountingClassifier):
        def classify(self, batch: FloatArray) -> FloatArray:
            nonlocal peak
            peak = max(peak, len(batch))
            time.sleep(0.005)
            return super().classify(batch)

    service = make_service(executor, classifier=Gauge(), limits=Limits(max_stream_in_flight=2))
    async with ChannelFor([service]) as channel:
        requests = [MnistImage(data=raw_image(n)) for n in range(1, 13)]
        items = [item async for item in MnistStub(channel).predict_stream(requests)]

    assert len(items) == 12
    assert 1 <= peak <= 2


class BrokenClassifier(CountingClassifier):
    """Fails like a bug would, with internals in the message."""

    def classify(self, batch: FloatArray) -> FloatArray:
        raise RuntimeError("secret internal detail /srv/model")


async def test_unexpected_errors_are_internal_and_leak_nothing(
    executor: ThreadPoolExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    service = make_service(executor, classifier=BrokenClassifier())
    async with ChannelFor([service]) as channel:
        stub = MnistStub(channel)
        with pytest.raises(GRPCError) as caught:
            await stub.predict(MnistImage(data=raw_image(3)))
        items = [item async for item in stub.predict_stream([MnistImage(data=raw_image(3))])]

    assert caught.value.status is Status.INTERNAL
    assert "secret" not in (caught.value.message or "")
    assert items[0].error is not None
    assert items[0].error.code == Status.INTERNAL.value
    assert "secret" not in items[0].error.message
    assert "secret internal detail" in caplog.text  # the operator still sees it
