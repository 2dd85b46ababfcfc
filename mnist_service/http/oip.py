"""The Open Inference Protocol's REST API (KServe v2), with the binary tensor data extension.

The same models, tensors (`engine.tensors`) and engine calls as the protocol's gRPC service:
`image_file` (BYTES) and `pixels` (UINT8) items take `Mnist/Predict`'s preprocessing, one
image on Predict's own path; `image` (FP32) goes to the model as is. Errors are the
protocol's `{"error": "<message>"}`, with the messages the gRPC service gives.

Binary data: a request whose `Inference-Header-Content-Length` header is set carries that many
bytes of JSON, then each input's raw bytes (`parameters.binary_data_size`). Outputs come back
as raw bytes after the JSON when asked (`binary_data` on an output, `binary_data_output` on
the request), in the same layout.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import numpy as np
from aiohttp import web
from grpclib.const import Status

from .. import __version__
from ..calls import current_call
from ..engine import tensors
from ..engine.inference import FloatArray
from ..engine.versions import ModelControl, ModelVersion
from ..errors import InvalidTensorError, ModelControlError, RepositoryError, TooManyImagesError
from . import documents
from .api import Models, classify_one, on_batch
from .errors import HttpError
from .runner import TIMING, read_body
from .timing import Timing

SERVER_NAME: Final = "mnist-service"
PLATFORM: Final = "onnxruntime_onnx"
EXTENSIONS: Final = ("classification", "binary_tensor_data")
HEADER_LENGTH: Final = "Inference-Header-Content-Length"
_MAX_HEADER_LENGTH_DIGITS: Final = 12


@dataclass(frozen=True, slots=True)
class _Wanted:
    spec: tensors.TensorSpec
    class_count: int
    binary: bool


class OipApi:
    """The `/v2` routes; `ready` says whether the server takes inference requests (from
    SERVING until the drain starts, like health)."""

    def __init__(self, models: Models, *, max_batch_images: int, ready: Callable[[], bool]):
        self._models = models
        self._max_batch_images = max_batch_images
        self._ready = ready

    def routes(self) -> list[web.RouteDef]:
        model = "/v2/models/{name}"
        versioned = "/v2/models/{name}/versions/{version}"
        return [
            web.get("/v2", self.server_metadata),
            web.get("/v2/health/live", self.live),
            web.get("/v2/health/ready", self.ready),
            web.get(model, self.model_metadata),
            web.get(versioned, self.model_metadata),
            web.get(model + "/ready", self.model_ready),
            web.get(versioned + "/ready", self.model_ready),
            web.post(model + "/infer", self.infer),
            web.post(versioned + "/infer", self.infer),
            web.post("/v2/repository/index", self.repository_index),
            web.post("/v2/repository/models/{name}/load", self.repository_load),
            web.post("/v2/repository/models/{name}/unload", self.repository_unload),
        ]

    async def server_metadata(self, request: web.Request) -> web.Response:
        return _json({"name": SERVER_NAME, "version": __version__, "extensions": list(EXTENSIONS)})

    async def live(self, request: web.Request) -> web.Response:
        return _json({"live": True})

    async def ready(self, request: web.Request) -> web.Response:
        ready = self._ready()
        return _json({"ready": ready}, 200 if ready else 503)

    async def model_metadata(self, request: web.Request) -> web.Response:
        model = self._model(request)
        return _json(
            {
                "name": model.name,
                "versions": list(self._models.registry.model(model.name).versions),
                "platform": PLATFORM,
                "inputs": [_metadata(spec) for spec in tensors.INPUTS],
                "outputs": [_metadata(spec) for spec in tensors.OUTPUTS],
            }
        )

    async def model_ready(self, request: web.Request) -> web.Response:
        model = self._model(request)
        ready = self._ready()
        return _json({"name": model.name, "ready": ready}, 200 if ready else 503)

    async def infer(self, request: web.Request) -> web.StreamResponse:
        """Classify a batch of images with one model."""
        model = self._model(request)
        document, binary = _split(request, await read_body(request))
        spec, shape, values = self._input(model.name, document, binary)
        wanted = _requested_outputs(model.name, document)
        call = current_call()
        if call is not None:
            call.fields.update(model=model.architecture, version=model.version, items=shape[0])
        probabilities = await self._classify(model, spec, values, request[TIMING])
        answer: dict[str, Any] = {"model_name": model.name, "model_version": model.version}
        if isinstance(document.get("id"), str):
            answer["id"] = document["id"]
        outputs, blobs = _outputs(wanted, probabilities)
        answer["outputs"] = outputs
        head = documents.dumps(answer)
        if not blobs:
            return web.Response(body=head, content_type="application/json")
        return web.Response(
            body=head + b"".join(blobs),
            content_type="application/octet-stream",
            headers={HEADER_LENGTH: str(len(head))},
        )

    async def repository_index(self, request: web.Request) -> web.Response:
        """Triton's repository index: `[{"name", "version", "state", "reason"}, ...]`."""
        body = await read_body(request)
        document = _json_object(body, "the index request") if body.strip() else {}
        ready_only = document.get("ready") is True
        entries = self._control().index(ready_only=ready_only)
        return _json(
            [
                {"name": e.name, "version": e.version, "state": e.state, "reason": e.reason}
                for e in entries
            ]
        )

    async def repository_load(self, request: web.Request) -> web.Response:
        """Load or reload a model (`{"parameters": {"config": "<JSON>"}}` overrides its
        config.json); 200 with an empty body once it serves, or the reason it was refused."""
        control = self._control()
        body = await read_body(request)
        document = _json_object(body, "the load request") if body.strip() else {}
        parameters = document.get("parameters") or {}
        config = parameters.get("config") if isinstance(parameters, dict) else None
        if config is not None:
            if isinstance(config, str):
                config = _json_object(config.encode(), "the load's config parameter")
            if not isinstance(config, dict):
                raise RepositoryError("the load's config parameter must be a JSON object")
        name = request.match_info["name"]
        _annotate_model(name)
        await control.load(name, config)
        return web.Response(status=200)

    async def repository_unload(self, request: web.Request) -> web.Response:
        """Unload a model; calls running on it finish."""
        control = self._control()
        await read_body(request)
        name = request.match_info["name"]
        _annotate_model(name)
        await control.unload(name)
        return web.Response(status=200)

    def _control(self) -> ModelControl:
        if self._models.control is None:
            raise ModelControlError("explicit model load / unload is not allowed on this server")
        return self._models.control

    def _model(self, request: web.Request) -> ModelVersion:
        return self._models.get(request.match_info["name"], request.match_info.get("version", ""))

    def _input(
        self, model: str, document: Mapping[str, Any], binary: memoryview
    ) -> tuple[tensors.TensorSpec, list[int], tensors.Decoded]:
        """The request's one input: declared, shaped, sized and decoded."""
        inputs = document.get("inputs")
        if not isinstance(inputs, list) or len(inputs) != 1:
            count = len(inputs) if isinstance(inputs, list) else 0
            raise InvalidTensorError(
                f"model {model!r} takes exactly one input, one of "
                f"{', '.join(spec.name for spec in tensors.INPUTS)}; the request has {count}"
            )
        (tensor,) = inputs
        if not isinstance(tensor, dict):
            raise InvalidTensorError("an input must be a JSON object")
        shape = tensor.get("shape")
        if not isinstance(shape, list) or not all(
            isinstance(d, int) and not isinstance(d, bool) for d in shape
        ):
            raise InvalidTensorError("an input's shape must be a list of integers")
        spec = tensors.input_spec(
            model, str(tensor.get("name", ""))[:100], str(tensor.get("datatype", ""))[:20], shape
        )
        if shape[0] > self._max_batch_images:
            raise TooManyImagesError(
                f"input {spec.name!r} holds {shape[0]} images; the limit is "
                f"{self._max_batch_images} per request"
            )
        parameters = tensor.get("parameters") or {}
        size = parameters.get("binary_data_size") if isinstance(parameters, dict) else None
        if size is not None:
            if "data" in tensor:
                raise InvalidTensorError(
                    f"input {spec.name!r} has both data and binary_data_size; send one"
                )
            if not isinstance(size, int) or size != len(binary):
                raise InvalidTensorError(
                    f"input {spec.name!r} announces {size} bytes of binary data; "
                    f"{len(binary)} follow the JSON header"
                )
            return spec, shape, tensors.from_raw(spec, shape, bytes(binary))
        if len(binary):
            raise InvalidTensorError(
                f"{len(binary)} bytes of binary data follow the JSON header, but no input "
                "announces them (parameters.binary_data_size)"
            )
        return spec, shape, tensors.from_values(spec, shape, _values(spec, tensor.get("data")))

    async def _classify(
        self,
        model: ModelVersion,
        spec: tensors.TensorSpec,
        values: tensors.Decoded,
        timing: Timing,
    ) -> FloatArray:
        """As the gRPC service's ModelInfer: files and pixels through Predict's path (the
        first that fails fails the request), FP32 straight to the batcher."""
        call = current_call()
        expires_at = call.expires_at if call is not None else None
        if isinstance(values, list) or spec.datatype == tensors.UINT8:
            items = values if isinstance(values, list) else [image.tobytes() for image in values]
            if len(items) == 1:
                return await classify_one(model, items[0], timing)
            return await model.pipeline.classify_all(items, expires_at)
        return await model.pipeline.classify_prepared(
            values,  # type: ignore[arg-type]  # FP32, checked by tensors
            expires_at,
            on_batch(call, timing, model),
        )


def _annotate_model(name: str) -> None:
    call = current_call()
    if call is not None:
        call.fields["model"] = name[:100]


def _json_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = documents.loads(body)
    except documents.DecodeError:
        document = None
    if not isinstance(document, dict):
        raise _bad(f"{what} must be a JSON object")
    return document


def _split(request: web.Request, body: bytes) -> tuple[dict[str, Any], memoryview]:
    """The request's JSON document and the binary data after it."""
    announced = request.headers.get(HEADER_LENGTH)
    view = memoryview(body)
    if announced is not None:
        if not announced.isdigit() or len(announced) > _MAX_HEADER_LENGTH_DIGITS:
            raise _bad(f"the {HEADER_LENGTH} header must be a byte count")
        length = int(announced)
        if length > len(body):
            raise _bad(
                f"the {HEADER_LENGTH} header says {length} bytes of JSON; the body has {len(body)}"
            )
        head, binary = view[:length], view[length:]
    else:
        head, binary = view, view[len(body) :]
    try:
        document = documents.loads(head)
    except documents.DecodeError as exc:
        raise _bad(f"the inference request is not valid JSON: {exc.msg}") from None
    if not isinstance(document, dict):
        raise _bad("the inference request must be a JSON object")
    return document, binary


def _values(spec: tensors.TensorSpec, data: object) -> Any:
    """An input's JSON `data`, flattened row-major: numbers, or strings for BYTES."""
    if not isinstance(data, list):
        raise InvalidTensorError(f"input {spec.name!r} needs its values in a data list")
    if spec.datatype == tensors.BYTES:
        flat = _flatten(data)
        if not all(isinstance(item, str) for item in flat):
            raise InvalidTensorError(f"input {spec.name!r} is BYTES: its data must be strings")
        return [item.encode() for item in flat]
    try:
        array = np.asarray(data)
    except ValueError:
        raise InvalidTensorError(f"input {spec.name!r} has ragged data") from None
    if array.dtype.kind not in "biuf" or (array.size and array.dtype.kind == "b"):
        raise InvalidTensorError(
            f"input {spec.name!r} is {spec.datatype}: its data must be numbers"
        )
    if spec.datatype == tensors.UINT8 and array.dtype.kind == "f":
        raise InvalidTensorError(f"input {spec.name!r} is UINT8: its data must be integers")
    return array.ravel()


def _flatten(data: list[Any]) -> list[Any]:
    flat: list[Any] = []
    stack = [iter(data)]
    while stack:
        for item in stack[-1]:
            if isinstance(item, list):
                stack.append(iter(item))
                break
            flat.append(item)
        else:
            stack.pop()
    return flat


def _requested_outputs(model: str, document: Mapping[str, Any]) -> list[_Wanted]:
    """The outputs to answer with, in the order asked (all of them when none is asked)."""
    parameters = document.get("parameters")
    binary_default = isinstance(parameters, dict) and parameters.get("binary_data_output") is True
    requested = document.get("outputs")
    if not requested:
        return [_Wanted(spec, 0, binary_default) for spec in tensors.OUTPUTS]
    if not isinstance(requested, list):
        raise InvalidTensorError("outputs must be a list")
    wanted: list[_Wanted] = []
    for output in requested:
        if not isinstance(output, dict):
            raise InvalidTensorError("a requested output must be a JSON object")
        spec = tensors.output_spec(model, str(output.get("name", ""))[:100])
        if any(w.spec == spec for w in wanted):
            raise InvalidTensorError(f"output {spec.name!r} is requested twice")
        options = output.get("parameters") or {}
        if not isinstance(options, dict):
            raise InvalidTensorError(f"the parameters of output {spec.name!r} must be an object")
        binary = options.get("binary_data", binary_default) is True
        wanted.append(
            _Wanted(spec, _class_count(spec, options.get(tensors.CLASSIFICATION)), binary)
        )
    return wanted


def _class_count(spec: tensors.TensorSpec, count: object) -> int:
    if count is None:
        return 0
    if not isinstance(count, int) or isinstance(count, bool):
        raise InvalidTensorError(
            f"the {tensors.CLASSIFICATION!r} parameter of output {spec.name!r} must be an integer"
        )
    return tensors.class_count(spec, count)


def _outputs(
    wanted: Sequence[_Wanted], probabilities: FloatArray
) -> tuple[list[dict[str, Any]], list[bytes]]:
    """The output tensors, in the order wanted, and the binary data of those sent so."""
    described: list[dict[str, Any]] = []
    blobs: list[bytes] = []
    for want in wanted:
        out = tensors.output(want.spec, probabilities, want.class_count)
        tensor: dict[str, Any] = {"name": want.spec.name, "datatype": out.datatype}
        tensor["shape"] = out.shape
        if want.binary:
            raw = out.raw()
            tensor["parameters"] = {"binary_data_size": len(raw)}
            blobs.append(raw)
        elif isinstance(out.values, list):
            tensor["data"] = [item.decode() for item in out.values]
        else:
            tensor["data"] = out.values.ravel().tolist()
        described.append(tensor)
    return described, blobs


def _metadata(spec: tensors.TensorSpec) -> dict[str, Any]:
    return {"name": spec.name, "datatype": spec.datatype, "shape": list(spec.shape)}


def _bad(message: str) -> HttpError:
    return HttpError(Status.INVALID_ARGUMENT, 400, message)


def _json(document: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=documents.dumps(document), content_type="application/json"
    )
