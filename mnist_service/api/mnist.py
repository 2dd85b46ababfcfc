"""The `mnist.Mnist` gRPC service: maps RPCs to domain calls.

Handlers raise domain errors inside `as_grpc_errors` (`api.status`, the one error map).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Executor
from functools import partial

import numpy as np
from grpclib.const import Status

from .. import __version__
from .._proto.mnist import (
    ItemError,
    MnistBase,
    MnistImage,
    MnistPrediction,
    ModelInfo,
    ModelInfoRequest,
    StreamPrediction,
)
from ..config import Limits
from ..engine.inference import FloatArray, Predictor
from ..engine.preprocess import preprocess
from ..errors import MnistServiceError
from ..runtime.telemetry import annotate_request
from .status import INTERNAL_MESSAGE, as_grpc_errors, status_for

log = logging.getLogger(__name__)


class MnistService(MnistBase):
    """Classifies digits: decode and preprocess in the executor, then ask the predictor."""

    def __init__(self, predictor: Predictor, *, executor: Executor, limits: Limits) -> None:
        self._predictor = predictor
        self._executor = executor
        self._limits = limits

    async def predict(self, message: MnistImage) -> MnistPrediction:
        """Classify one image."""
        with as_grpc_errors():
            prediction = await self._classify(message.data)
        annotate_request(label=prediction.label)
        return prediction

    async def predict_stream(
        self, messages: AsyncIterator[MnistImage]
    ) -> AsyncIterator[StreamPrediction]:
        """Classify many images, answering in request order while later ones are in flight."""
        in_flight = asyncio.Semaphore(self._limits.max_stream_in_flight)
        queue: asyncio.Queue[asyncio.Task[StreamPrediction] | None] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                index = 0
                async for message in messages:
                    await in_flight.acquire()
                    queue.put_nowait(asyncio.create_task(self._stream_item(index, message.data)))
                    index += 1
            finally:
                queue.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        count = 0
        try:
            while (task := await queue.get()) is not None:
                item = await task
                in_flight.release()
                count += 1
                yield item
            await reader  # re-raises what ended the request stream, e.g. an oversize message
        finally:
            reader.cancel()
            while not queue.empty():
                if (task := queue.get_nowait()) is not None:
                    task.cancel()
            annotate_request(items=count)

    async def get_model_info(self, message: ModelInfoRequest) -> ModelInfo:
        """Describe the served model."""
        info = self._predictor.info
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

    async def _classify(self, data: bytes) -> MnistPrediction:
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(
            self._executor,
            partial(preprocess, data, max_pixels=self._limits.max_image_pixels),
        )
        probabilities = await self._predictor.predict(image[np.newaxis])
        return _prediction(probabilities[0])

    async def _stream_item(self, index: int, data: bytes) -> StreamPrediction:
        try:
            return StreamPrediction(index=index, prediction=await self._classify(data))
        except MnistServiceError as exc:
            error = ItemError(code=status_for(exc).value, message=str(exc))
        except Exception:
            log.exception("unexpected error on PredictStream item %d", index)
            error = ItemError(code=Status.INTERNAL.value, message=INTERNAL_MESSAGE)
        return StreamPrediction(index=index, error=error)


def _prediction(probabilities: FloatArray) -> MnistPrediction:
    return MnistPrediction(
        label=int(np.argmax(probabilities)), probabilities=probabilities.tolist()
    )
