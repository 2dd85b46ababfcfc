"""The `mnist.Mnist` gRPC service: maps RPCs to domain calls.

Handlers raise domain errors inside `as_grpc_errors` (`mnist_service.status`, the one error map).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator

from grpclib.const import Status

from .. import __version__
from .._proto.mnist import (
    ItemError,
    MnistBase,
    MnistImage,
    MnistPrediction,
    ModelInfo,
    ModelInfoRequest,
    PredictBatchRequest,
    PredictBatchResponse,
    StreamPrediction,
)
from ..calls import annotate, current_call, current_expiry
from ..config import Limits
from ..engine.inference import FloatArray
from ..engine.pipeline import ItemResult, Pipeline
from ..errors import MnistServiceError, TooManyImagesError
from ..status import INTERNAL_MESSAGE, as_grpc_errors, status_for

log = logging.getLogger(__name__)


class MnistService(MnistBase):
    """Classifies digits through the engine's pipeline (preprocess, batcher, model)."""

    def __init__(self, pipeline: Pipeline, *, limits: Limits) -> None:
        self._pipeline = pipeline
        self._limits = limits

    async def predict(self, message: MnistImage) -> MnistPrediction:
        """Classify one image."""
        call = current_call()
        with as_grpc_errors():
            probabilities = await self._pipeline.classify(
                message.data,
                call.expires_at if call is not None else None,
                call.rode_in if call is not None else None,
            )
        prediction = _prediction(probabilities)
        if call is not None:
            call.fields["label"] = prediction.label
        return prediction

    async def predict_batch(self, message: PredictBatchRequest) -> PredictBatchResponse:
        """Classify many images as one call: results in request order, errors per item."""
        images = message.images
        with as_grpc_errors():
            if len(images) > self._limits.max_batch_images:
                raise TooManyImagesError(
                    f"PredictBatch holds {len(images)} images; the limit is "
                    f"{self._limits.max_batch_images} per call"
                )
            results = await self._pipeline.classify_many(
                [image.data for image in images], current_expiry()
            )
        annotate(items=len(results))
        return PredictBatchResponse(
            results=[_item(index, result) for index, result in enumerate(results)]
        )

    async def predict_stream(
        self, messages: AsyncIterator[MnistImage]
    ) -> AsyncIterator[StreamPrediction]:
        """Classify many images, answering in request order while later ones are in flight.

        Up to `max_stream_in_flight` images are in the pipeline at once (the batcher groups
        them with everyone else's); reading pauses beyond that, and HTTP/2 flow control
        pushes back on the client.
        """
        in_flight = asyncio.Semaphore(self._limits.max_stream_in_flight)
        expires_at = current_expiry()
        started: asyncio.Queue[asyncio.Future[FloatArray] | None] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                async for message in messages:
                    await in_flight.acquire()
                    started.put_nowait(self._pipeline.start(message.data, expires_at))
            finally:
                started.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        index = 0
        try:
            while (future := await started.get()) is not None:
                result: ItemResult
                try:
                    result = (await future)[0]
                except Exception as exc:  # per item: becomes an ItemError, the stream goes on
                    result = exc
                in_flight.release()
                yield _item(index, result)
                index += 1
            await reader  # re-raises what ended the request stream, e.g. an oversize message
        finally:
            reader.cancel()
            while not started.empty():
                if (future := started.get_nowait()) is None:
                    continue
                if future.done() and not future.cancelled():
                    future.exception()  # retrieved: nobody is left to answer, nothing to log
                future.cancel()
            annotate(items=index)

    async def get_model_info(self, message: ModelInfoRequest) -> ModelInfo:
        """Describe the served model."""
        info = self._pipeline.info
        return ModelInfo(
            architecture=info.architecture,
            weights_path=str(info.weights_path),
            weights_sha256=info.weights_sha256,
            input_name=info.input_name,
            input_shape=list(info.input_shape),
            execution_provider=info.execution_provider,
            metadata=dict(info.metadata),
            server_version=__version__,
        )


def _item(index: int, result: ItemResult) -> StreamPrediction:
    """One item of a PredictStream or PredictBatch answer."""
    if not isinstance(result, Exception):
        return StreamPrediction(index=index, prediction=_prediction(result))
    if isinstance(result, MnistServiceError):
        error = ItemError(code=status_for(result).value, message=str(result))
    else:
        log.error("unexpected error on item %d", index, exc_info=result)
        error = ItemError(code=Status.INTERNAL.value, message=INTERNAL_MESSAGE)
    return StreamPrediction(index=index, error=error)


def _prediction(probabilities: FloatArray) -> MnistPrediction:
    return MnistPrediction(label=int(probabilities.argmax()), probabilities=probabilities.tolist())
