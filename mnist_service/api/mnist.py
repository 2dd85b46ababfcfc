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
from ..engine.versions import ModelVersion, VersionedModel
from ..errors import MnistServiceError, TooManyImagesError
from ..status import INTERNAL_MESSAGE, as_grpc_errors, status_for

log = logging.getLogger(__name__)


class MnistService(MnistBase):
    """Classifies digits through the engine's pipeline (preprocess, batcher, model).

    `model` is one pipeline (served as version 1) or a model whose served versions change at
    run time: each call takes the default version when it starts and keeps it.
    """

    def __init__(self, model: Pipeline | VersionedModel, *, limits: Limits) -> None:
        if isinstance(model, Pipeline):
            model = VersionedModel.single(model.info.architecture, model)  # type: ignore[arg-type]
        self._model = model
        self._limits = limits

    def _version(self) -> ModelVersion:
        """The version a call runs on, noted in its request log line."""
        version = self._model.get()
        annotate(version=version.version)
        return version

    async def predict(self, message: MnistImage) -> MnistPrediction:
        """Classify one image."""
        call = current_call()
        with as_grpc_errors():
            probabilities = await self._version().pipeline.classify(
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
            results = await self._version().pipeline.classify_many(
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
        arrived: list[bytes] = []  # read in this loop turn, not started yet

        def start_arrived() -> None:
            # The images that arrived together start together: MNIST-format ones share one
            # vectorised check and one submission to the batcher (`Pipeline.start_many`).
            if not arrived:
                return
            try:
                pipeline = self._model.get().pipeline  # each turn's images: the default now
            except MnistServiceError as exc:
                futures = [_failed(exc) for _ in arrived]
            else:
                futures = pipeline.start_many(arrived, expires_at)
            arrived.clear()
            for future in futures:
                started.put_nowait(future)

        async def read_requests() -> None:
            loop = asyncio.get_running_loop()
            try:
                async for message in messages:
                    await in_flight.acquire()  # if it waits, `start_arrived` runs meanwhile
                    arrived.append(message.data)
                    if len(arrived) == 1:
                        loop.call_soon(start_arrived)  # once no more messages are at hand
            finally:
                start_arrived()
                started.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        index = 0
        try:
            while (future := await started.get()) is not None:
                # The item is made inside the `except`: a local that kept the error would hold
                # its traceback, and so this frame, in a cycle only the collector breaks.
                try:
                    item = _item(index, (await future)[0])
                except Exception as exc:  # per item: becomes an ItemError, the stream goes on
                    item = _item(index, exc)
                in_flight.release()
                yield item
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
        """Describe the served model: its default version, and in `metadata` every served
        version (`served_versions`) and the default one (`model_version`)."""
        with as_grpc_errors():
            version = self._model.get()
        info = version.info
        metadata = dict(info.metadata)
        metadata.update(
            model_version=version.version, served_versions=",".join(self._model.versions)
        )
        return ModelInfo(
            architecture=info.architecture,
            weights_path=str(info.weights_path),
            weights_sha256=info.weights_sha256,
            input_name=info.input_name,
            input_shape=list(info.input_shape),
            execution_provider=info.execution_provider,
            metadata=metadata,
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


def _failed(exc: Exception) -> asyncio.Future[FloatArray]:
    future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _prediction(probabilities: FloatArray) -> MnistPrediction:
    return MnistPrediction(label=int(probabilities.argmax()), probabilities=probabilities.tolist())
