"""The JSON API: `POST /v1/predict`, `POST /v1/predict:batch`, `GET /v1/models`.

Each route maps a request to the engine call its gRPC twin makes, and the answer back:
`/v1/predict` is `Mnist/Predict` (one image through `Pipeline.start`), `:batch` is
`PredictBatch` (`Pipeline.classify_many`, errors per item). So the probabilities are the same
float32 values, bit for bit (JSON prints each as the shortest decimal that reads back to it).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import io
import logging
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Executor
from email.parser import BytesParser
from email.policy import HTTP
from typing import Any, Final

import numpy as np
from aiohttp import web
from grpclib.const import Status
from PIL import Image

from ..calls import Call, current_call
from ..config import Limits
from ..engine.inference import FloatArray
from ..engine.pipeline import ItemResult
from ..engine.preprocess import preprocess
from ..engine.versions import ModelControl, ModelRegistry, ModelVersion
from ..errors import MnistServiceError, TooManyImagesError
from ..status import INTERNAL_MESSAGE, status_for
from . import documents
from .errors import HttpError
from .runner import TIMING, read_body
from .timing import ModelClock, Timing

log = logging.getLogger(__name__)

_now = time.perf_counter
RAW_TYPES: Final = ("application/octet-stream", "application/x-www-form-urlencoded")
"""Bodies read as the image file itself (or 784 raw pixels): curl's `--data-binary` sends the
second unless told otherwise."""
ACCEPTED: Final = (
    "image/* (png, jpeg, bmp, gif, webp, tiff), application/octet-stream (a file or 784 raw "
    'pixels), multipart/form-data (a file field) or application/json ({"data": "<base64>"})'
)


class Models:
    """The served models by name, from the server's registry: `default` is the one the MNIST
    API serves unless asked, `control` what loads and unloads them (None: refused). Each call
    runs on one version of a model (`engine.versions.ModelVersion`), as on gRPC."""

    def __init__(self, registry: ModelRegistry, *, control: ModelControl | None = None) -> None:
        self.registry = registry
        self.control = control

    def __iter__(self) -> Iterator[ModelVersion]:
        return iter([m.default for m in self.registry if m.default is not None])

    @property
    def default(self) -> ModelVersion:
        """The MNIST API's model, its default version (ModelNotFoundError once unloaded)."""
        return self.get(None)

    def get(self, name: str | None, version: str = "") -> ModelVersion:
        """The version a call runs on, of model `name` (None: the default model), or
        ModelNotFoundError as the Open Inference Protocol's gRPC service words it."""
        return self.registry.get(name, version)


def on_batch(call: Call | None, timing: Timing, model: ModelVersion) -> Callable[[int], None]:
    """What the batcher tells of each model run the call's images rode in."""
    clock = model.clock if isinstance(model.clock, ModelClock) else None

    def rode_in(size: int) -> None:
        if call is not None:
            call.rode_in(size)
        if clock is not None:
            timing.inference += clock.last_run_s

    return rode_in


async def classify_one(model: ModelVersion, data: bytes, timing: Timing) -> FloatArray:
    """One image through `Mnist/Predict`'s own path: probabilities [1, 10]."""
    call = current_call()
    expires_at = call.expires_at if call is not None else None
    start = _now()
    future = model.pipeline.start(data, expires_at, on_batch(call, timing, model))
    handed = _now()
    timing.preprocess += handed - start
    try:
        return await future
    finally:
        timing.waited += _now() - handed
        # An error raised here holds this frame in its traceback, and the future holds the
        # error: without this, the two would keep each other (and the request) for the
        # collector to find.
        del future


class PredictApi:
    """The `/v1` routes."""

    def __init__(self, models: Models, *, limits: Limits, executor: Executor) -> None:
        self._models = models
        self._limits = limits
        self._executor = executor

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post("/v1/predict", self.predict),
            web.post("/v1/predict:batch", self.predict_batch),
            web.get("/v1/models", self.list_models),
        ]

    async def predict(self, request: web.Request) -> web.Response:
        """One image (a file body, a form's file field or base64 JSON) -> its prediction."""
        model = self._models.get(request.query.get("model"))
        data = await image_from(request)
        timing = request[TIMING]
        probabilities = (await classify_one(model, data, timing))[0]
        label = int(probabilities.argmax())
        call = current_call()
        if call is not None:
            call.fields.update(label=label, model=model.architecture, version=model.version)
        answer: dict[str, Any] = _prediction(probabilities)
        answer.update(model=model.name, version=model.version)
        if request.query.get("explain") in ("1", "true"):
            answer["explain"] = {"input_png": await self._model_input_png(data)}
        return _json(answer)

    async def predict_batch(self, request: web.Request) -> web.Response:
        """`{"images": ["<base64>", ...]}` -> one result or error per image, in order."""
        model = self._models.get(request.query.get("model"))
        document = _json_body(await read_body(request))
        images = document.get("images") if isinstance(document, dict) else None
        if not isinstance(images, list):
            raise HttpError(
                Status.INVALID_ARGUMENT,
                400,
                'the body must be a JSON object {"images": ["<base64>", ...]}',
            )
        if len(images) > self._limits.max_batch_images:
            raise TooManyImagesError(
                f"the batch holds {len(images)} images; the limit is "
                f"{self._limits.max_batch_images} per call"
            )
        items = [_base64(item, f"images[{index}]") for index, item in enumerate(images)]
        call = current_call()
        timing: Timing = request[TIMING]
        handed = _now()
        results = await model.pipeline.classify_many(
            items, call.expires_at if call is not None else None
        )
        timing.waited += _now() - handed
        if call is not None:
            call.fields.update(items=len(results), model=model.architecture, version=model.version)
        return _json(
            {
                "results": [_item(index, result) for index, result in enumerate(results)],
                "model": model.name,
                "version": model.version,
            }
        )

    async def list_models(self, request: web.Request) -> web.Response:
        """The served models, the default first."""
        default = self._models.registry.default.name
        models = sorted(self._models.registry, key=lambda m: m.name != default)
        return _json(
            {
                "models": [
                    {
                        "name": m.name,
                        "version": m.default.version,
                        "versions": list(m.versions),
                        "architecture": m.architecture,
                        "default": m.name == default,
                    }
                    for m in models
                    if m.default is not None
                ]
            }
        )

    async def _model_input_png(self, data: bytes) -> str:
        """The 28x28 image the model read, as a PNG data URL."""
        loop = asyncio.get_running_loop()
        image = await loop.run_in_executor(
            self._executor, lambda: preprocess(data, max_pixels=self._limits.max_image_pixels)
        )
        pixels = np.clip(np.rint(image[0] * 255), 0, 255).astype(np.uint8)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


async def image_from(request: web.Request) -> bytes:
    """The image a `/v1/predict` request carries, by its content type."""
    content_type = request.content_type  # aiohttp: application/octet-stream when missing
    if content_type.startswith("image/") or content_type in RAW_TYPES:
        return await read_body(request)
    if content_type == "multipart/form-data":
        return _form_file(request.headers.get("Content-Type", ""), await read_body(request))
    if content_type == "application/json":
        document = _json_body(await read_body(request))
        data = document.get("data") if isinstance(document, dict) else None
        if data is None:
            raise HttpError(
                Status.INVALID_ARGUMENT, 400, 'the body must be a JSON object {"data": "<base64>"}'
            )
        return _base64(data, "data")
    raise HttpError(
        Status.INVALID_ARGUMENT,
        415,
        f"content type {content_type[:100]!r} is not taken here; send {ACCEPTED}",
    )


def _form_file(content_type: str, body: bytes) -> bytes:
    """The file of a multipart form: the field named image or file, or the first file."""
    message = BytesParser(policy=HTTP).parsebytes(
        b"Content-Type: " + content_type.encode("latin-1") + b"\r\n\r\n" + body
    )
    if not message.is_multipart():
        raise HttpError(Status.INVALID_ARGUMENT, 400, "the multipart form cannot be parsed")
    chosen = None
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if name in ("image", "file") or (chosen is None and part.get_filename()):
            chosen = part
            if name in ("image", "file"):
                break
    if chosen is None:
        raise HttpError(
            Status.INVALID_ARGUMENT,
            400,
            "the multipart form has no file: send the image in a field named image or file",
        )
    payload = chosen.get_payload(decode=True)
    return payload if isinstance(payload, bytes) else b""


def _json_body(body: bytes) -> Any:
    try:
        return documents.loads(body)
    except documents.DecodeError as exc:
        raise HttpError(
            Status.INVALID_ARGUMENT, 400, f"the request body is not valid JSON: {exc.msg}"
        ) from None


def _base64(value: object, where: str) -> bytes:
    if not isinstance(value, str):
        raise HttpError(Status.INVALID_ARGUMENT, 400, f"{where} must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise HttpError(Status.INVALID_ARGUMENT, 400, f"{where} is not valid base64") from None


def _prediction(probabilities: FloatArray) -> dict[str, Any]:
    return {"label": int(probabilities.argmax()), "probabilities": probabilities.tolist()}


def _item(index: int, result: ItemResult) -> Mapping[str, Any]:
    """One item of a batch answer, as PredictBatch's `StreamPrediction`."""
    if not isinstance(result, Exception):
        return {"index": index, **_prediction(result)}
    if isinstance(result, MnistServiceError):
        code, message = status_for(result), str(result)
    else:
        log.error("unexpected error on item %d", index, exc_info=result)
        code, message = Status.INTERNAL, INTERNAL_MESSAGE
    return {"index": index, "error": {"code": code.name, "message": message}}


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=documents.dumps(document), content_type="application/json"
    )
