"""An async Python client for mnist-service.

    async with MnistClient("[::1]:50051") as client:
        prediction = await client.predict("four.png")
        print(prediction.label, prediction.confidence)

Images may be encoded bytes, a path, a PIL image or a numpy array (a 28x28 uint8 array, or
floats in [0, 1], travels as 784 raw MNIST-format bytes; any other array as a PNG file). Call
failures raise `grpclib.exceptions.GRPCError`; `predict_many` (a stream) and `predict_batch`
(one call) report per-image failures as `ItemFailure` values instead, in request order.

Over TLS, say whom to trust (and, for mutual TLS, which certificate to show):

    MnistClient("mnist.example.com:443", tls=ClientTls(ca=Path("ca.pem")))
"""

from __future__ import annotations

import io
import os
from collections.abc import AsyncGenerator, AsyncIterable, Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import numpy as np
import numpy.typing as npt
from grpclib.config import Configuration
from grpclib.const import Cardinality, Status
from PIL import Image

from ._proto.mnist import (
    MnistImage,
    MnistPrediction,
    MnistStub,
    PredictBatchRequest,
    StreamPrediction,
)
from .config import DEFAULT_HOST, DEFAULT_PORT, format_address, parse_address
from .constants import IMAGE_SIZE
from .tls import ClientTls
from .transport.channel import Channel

ImageLike = bytes | str | os.PathLike[str] | Image.Image | npt.NDArray[Any]
DEFAULT_TIMEOUT = 30.0
PREDICT = "/mnist.Mnist/Predict"
REQUEST_ID_HEADER = "x-request-id"


@dataclass(frozen=True, slots=True)
class Prediction:
    """A classified digit: the label and the probabilities of 0-9 (and, from `predict`, the
    call's request id, as the server logged it)."""

    label: int
    probabilities: tuple[float, ...]
    request_id: str | None = None

    @property
    def confidence(self) -> float:
        """The probability of the predicted label."""
        return self.probabilities[self.label]


@dataclass(frozen=True, slots=True)
class ModelInfo:
    """What a server serves (`MnistClient.model_info`)."""

    architecture: str
    weights_path: str
    weights_sha256: str
    input_name: str
    input_shape: tuple[int, ...]
    """-1 for the batch dimension."""
    execution_provider: str
    metadata: dict[str, str]
    """The ONNX file's metadata: architecture, test accuracy, training settings..."""
    server_version: str


@dataclass(frozen=True, slots=True)
class ItemFailure:
    """Why one image of a `predict_many` call could not be classified."""

    status: Status
    message: str


class MnistClient:
    """An async client for the `mnist.Mnist` service; use it as an async context manager."""

    def __init__(
        self,
        address: str = format_address(DEFAULT_HOST, DEFAULT_PORT),
        *,
        timeout: float | None = DEFAULT_TIMEOUT,
        tls: ClientTls | None = None,
    ) -> None:
        """Connect lazily to `address`; over TLS when `tls` is given, else plaintext."""
        host, port = parse_address(address)
        if tls is None:
            self._channel = Channel(host, port)
        else:
            self._channel = Channel(
                host,
                port,
                ssl=tls.context(),
                config=Configuration(ssl_target_name_override=tls.server_name),
            )
        self._stub = MnistStub(self._channel)
        self._timeout = timeout

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def close(self) -> None:
        """Start closing the underlying connection (`aclose` also waits until it is closed)."""
        self._channel.close()

    async def aclose(self) -> None:
        """Close the underlying connection, and wait until it is closed (a TLS connection
        takes a round trip to the server)."""
        await self._channel.aclose()

    async def predict(
        self, image: ImageLike, *, timeout: float | None = None, request_id: str | None = None
    ) -> Prediction:
        """Classify one image. The server logs the call under `request_id` (sent as
        `x-request-id`), or under one it makes up; either way the answer carries it."""
        metadata = {REQUEST_ID_HEADER: request_id} if request_id is not None else None
        async with self._channel.request(
            PREDICT,
            Cardinality.UNARY_UNARY,
            MnistImage,
            MnistPrediction,
            timeout=timeout or self._timeout,
            metadata=metadata,
        ) as stream:
            await stream.send_message(MnistImage(data=encode_image(image)), end=True)
            reply = await stream.recv_message()
            assert reply is not None  # grpclib raises GRPCError for an answer without one
            received = stream.initial_metadata
            given = received.get(REQUEST_ID_HEADER) if received is not None else None
        return _prediction(reply, given if isinstance(given, str) else None)

    async def predict_many(
        self,
        images: Iterable[ImageLike] | AsyncIterable[ImageLike],
        *,
        timeout: float | None = None,
    ) -> AsyncGenerator[Prediction | ItemFailure, None]:
        """Classify many images over one streaming call; results come in request order.
        Closing the generator early (`aclose`) cancels the call.

        An async iterable of images lets the caller pace the stream, e.g. by waiting for
        answers before sending more; a plain iterable is sent as fast as flow control allows.
        """
        requests: Iterable[MnistImage] | AsyncIterable[MnistImage]
        if isinstance(images, AsyncIterable):
            requests = (MnistImage(data=encode_image(image)) async for image in images)
        else:
            requests = (MnistImage(data=encode_image(image)) for image in images)
        async for item in self._stub.predict_stream(requests, timeout=timeout or self._timeout):
            yield _result(item)

    async def predict_batch(
        self, images: Iterable[ImageLike], *, timeout: float | None = None
    ) -> list[Prediction | ItemFailure]:
        """Classify many images in one `PredictBatch` call; results come in request order."""
        request = PredictBatchRequest(images=[MnistImage(data=encode_image(i)) for i in images])
        reply = await self._stub.predict_batch(request, timeout=timeout or self._timeout)
        return [_result(item) for item in reply.results]

    async def health(self, service: str = "", *, timeout: float | None = None) -> str:
        """The server's `grpc.health.v1` status for `service` ("" is the whole server; the
        server also knows "mnist.Mnist"): "SERVING", "NOT_SERVING"... An unknown service
        raises `GRPCError` NOT_FOUND."""
        from grpclib.health.v1.health_grpc import HealthStub
        from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

        reply = await HealthStub(self._channel).Check(
            HealthCheckRequest(service=service), timeout=timeout or self._timeout
        )
        assert reply is not None
        name: str = HealthCheckResponse.ServingStatus.Name(reply.status)
        return name

    async def model_info(self, *, timeout: float | None = None) -> ModelInfo:
        """Describe the served model."""
        reply = await self._stub.get_model_info(timeout=timeout or self._timeout)
        return ModelInfo(
            architecture=reply.architecture,
            weights_path=reply.weights_path,
            weights_sha256=reply.weights_sha256,
            input_name=reply.input_name,
            input_shape=tuple(reply.input_shape),
            execution_provider=reply.execution_provider,
            metadata=dict(reply.metadata),
            server_version=reply.server_version,
        )


def encode_image(image: ImageLike) -> bytes:
    """The request bytes for an image given in any of the accepted forms."""
    if isinstance(image, bytes):
        return image
    if isinstance(image, str | os.PathLike):
        return Path(image).read_bytes()
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()
    if isinstance(image, np.ndarray):
        return _encode_array(image)
    raise TypeError(f"cannot send an image of type {type(image).__name__}")


def _encode_array(array: npt.NDArray[Any]) -> bytes:
    if np.issubdtype(array.dtype, np.floating):
        array = (np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8)
    if array.dtype != np.uint8:
        raise TypeError(f"arrays must be uint8, or floats in [0, 1]; got {array.dtype}")
    if array.shape == (IMAGE_SIZE, IMAGE_SIZE):
        return array.tobytes()
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def _prediction(reply: MnistPrediction, request_id: str | None = None) -> Prediction:
    return Prediction(
        label=reply.label, probabilities=tuple(reply.probabilities), request_id=request_id
    )


def _result(item: StreamPrediction) -> Prediction | ItemFailure:
    if item.prediction is not None:
        return _prediction(item.prediction)
    if item.error is not None:
        return ItemFailure(Status(item.error.code), item.error.message)
    return ItemFailure(Status.INTERNAL, "the server sent an item with neither result")
