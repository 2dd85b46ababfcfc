"""The Open Inference Protocol's `inference.GRPCInferenceService`: maps RPCs to domain calls.

The models are those loaded (`mnist_convnet`, `mnist_mlp`; version "1" unless a model
repository serves others), each version behind its own pipeline and batcher, the same engine
`mnist.Mnist` uses. A call picks its version when it starts (`engine.versions`). Triton's
repository extension (`RepositoryIndex`, `RepositoryModelLoad`, `RepositoryModelUnload`)
goes to the server's `ModelControl`. `engine.tensors` declares and
decodes their tensors; handlers raise domain errors inside `as_grpc_errors`
(`mnist_service.status`, the one error map). Triton's RPCs beyond the protocol answer
UNIMPLEMENTED (`TritonOnlyMethods`).
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

import grpclib.const
from grpclib.const import Cardinality

from .. import __version__
from .._proto.inference import (
    GrpcInferenceServiceBase,
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
    ModelInferRequestInferRequestedOutputTensor,
    ModelInferResponse,
    ModelInferResponseInferOutputTensor,
    ModelMetadataRequest,
    ModelMetadataResponse,
    ModelMetadataResponseTensorMetadata,
    ModelReadyRequest,
    ModelReadyResponse,
    ModelStreamInferResponse,
    RepositoryIndexRequest,
    RepositoryIndexResponse,
    RepositoryIndexResponseModelIndex,
    RepositoryModelLoadRequest,
    RepositoryModelLoadResponse,
    RepositoryModelUnloadRequest,
    RepositoryModelUnloadResponse,
    ServerLiveRequest,
    ServerLiveResponse,
    ServerMetadataRequest,
    ServerMetadataResponse,
    ServerReadyRequest,
    ServerReadyResponse,
)
from ..calls import annotate, current_call, current_expiry
from ..config import Limits
from ..constants import Architecture
from ..engine import tensors
from ..engine.inference import FloatArray
from ..engine.pipeline import Pipeline
from ..engine.versions import ModelControl, ModelRegistry, VersionedModel
from ..errors import (
    InvalidTensorError,
    MnistServiceError,
    ModelControlError,
    RepositoryError,
    TooManyImagesError,
    UnsupportedMethodError,
)
from ..status import INTERNAL_MESSAGE, as_grpc_errors

log = logging.getLogger(__name__)

SERVICE: Final = "inference.GRPCInferenceService"
SERVER_NAME: Final = "mnist-service"
MODEL_VERSION: Final = "1"
PLATFORM: Final = "onnxruntime_onnx"
EXTENSIONS: Final = ("classification",)
"""The protocol extensions supported (Triton's names)."""


class InferenceService(GrpcInferenceServiceBase):
    """Health, metadata and inference of the loaded models over the Open Inference Protocol;
    `models` is one pipeline per model (each served as version 1) or the server's registry,
    `control` what loads and unloads them (None: refused)."""

    def __init__(
        self,
        models: Mapping[Architecture, Pipeline] | ModelRegistry,
        *,
        limits: Limits,
        control: ModelControl | None = None,
    ) -> None:
        if not isinstance(models, ModelRegistry):
            served = [VersionedModel.single(arch, pipeline) for arch, pipeline in models.items()]
            models = ModelRegistry(served, served[0].name)
        self._models = models
        self._control = control
        self._limits = limits
        self.ready = False
        """Whether the server takes inference requests (set by the server's lifecycle)."""

    async def server_live(self, message: ServerLiveRequest) -> ServerLiveResponse:
        """Alive: this answer is the proof."""
        return ServerLiveResponse(live=True)

    async def server_ready(self, message: ServerReadyRequest) -> ServerReadyResponse:
        """Ready from SERVING until the drain starts, like health."""
        return ServerReadyResponse(ready=self.ready)

    async def model_ready(self, message: ModelReadyRequest) -> ModelReadyResponse:
        """Whether the model and version are loaded (and the server ready)."""
        try:
            self._models.get(message.name, message.version)
        except MnistServiceError:
            return ModelReadyResponse(ready=False)
        return ModelReadyResponse(ready=self.ready)

    async def server_metadata(self, message: ServerMetadataRequest) -> ServerMetadataResponse:
        """Name, version and extensions."""
        return ServerMetadataResponse(
            name=SERVER_NAME, version=__version__, extensions=list(EXTENSIONS)
        )

    async def model_metadata(self, message: ModelMetadataRequest) -> ModelMetadataResponse:
        """A loaded model's versions, platform and tensors."""
        with as_grpc_errors():
            model = self._models.model(message.name)
            model.get(message.version)
        return ModelMetadataResponse(
            name=model.name,
            versions=list(model.versions),
            platform=PLATFORM,
            inputs=[_tensor_metadata(spec) for spec in tensors.INPUTS],
            outputs=[_tensor_metadata(spec) for spec in tensors.OUTPUTS],
        )

    async def model_infer(self, message: ModelInferRequest) -> ModelInferResponse:
        """Classify a batch of images with one model."""
        with as_grpc_errors():
            return await self._infer(message, current_expiry(), on_call=True)

    async def model_stream_infer(
        self, messages: AsyncIterator[ModelInferRequest]
    ) -> AsyncIterator[ModelStreamInferResponse]:
        """Answer each request in order while later ones are in flight; a failed request
        gets an `error_message` and the stream goes on (Triton's streaming extension).

        Up to `max_stream_in_flight` requests are worked on at once; reading pauses beyond
        that, and HTTP/2 flow control pushes back on the client.
        """
        in_flight = asyncio.Semaphore(self._limits.max_stream_in_flight)
        expires_at = current_expiry()
        started: asyncio.Queue[asyncio.Future[ModelStreamInferResponse] | None] = asyncio.Queue()

        async def read_requests() -> None:
            try:
                async for message in messages:
                    await in_flight.acquire()
                    started.put_nowait(
                        asyncio.ensure_future(self._stream_item(message, expires_at))
                    )
            finally:
                started.put_nowait(None)

        reader = asyncio.create_task(read_requests())
        answered = 0
        try:
            while (future := await started.get()) is not None:
                response = await future
                in_flight.release()
                yield response
                answered += 1
            await reader  # re-raises what ended the request stream, e.g. an oversize message
        finally:
            reader.cancel()
            while not started.empty():
                if (future := started.get_nowait()) is not None:
                    future.cancel()
            annotate(items=answered)

    async def _stream_item(
        self, message: ModelInferRequest, expires_at: float | None
    ) -> ModelStreamInferResponse:
        try:
            return ModelStreamInferResponse(infer_response=await self._infer(message, expires_at))
        except MnistServiceError as exc:
            return ModelStreamInferResponse(error_message=str(exc))
        except Exception:
            log.exception("unexpected error in ModelStreamInfer")
            return ModelStreamInferResponse(error_message=INTERNAL_MESSAGE)

    async def _infer(
        self, message: ModelInferRequest, expires_at: float | None, *, on_call: bool = False
    ) -> ModelInferResponse:
        model = self._models.get(message.model_name, message.model_version)
        spec, shape, values = self._input(model.name, message)
        wanted = _requested_outputs(model.name, message.outputs)
        call = current_call() if on_call else None
        if call is not None:
            call.fields.update(model=model.architecture, version=model.version, items=shape[0])
        on_batch = call.rode_in if call is not None else None
        if isinstance(values, list):
            probabilities = await _classify_items(model.pipeline, values, expires_at, on_batch)
        elif spec.datatype == tensors.UINT8:
            probabilities = await _classify_items(
                model.pipeline, [image.tobytes() for image in values], expires_at, on_batch
            )
        else:
            probabilities = await model.pipeline.classify_prepared(
                values,  # type: ignore[arg-type]  # FP32, checked by tensors
                expires_at,
                on_batch,
            )
        outputs, raw = _outputs(wanted, probabilities)
        return ModelInferResponse(
            model_name=model.name,
            model_version=model.version,
            id=message.id,
            outputs=outputs,
            raw_output_contents=raw,
        )

    async def repository_index(self, message: RepositoryIndexRequest) -> RepositoryIndexResponse:
        """The repository's models, their versions and state (Triton's repository extension)."""
        with as_grpc_errors():
            entries = self._control_api().index(ready_only=message.ready)
        return RepositoryIndexResponse(
            models=[
                RepositoryIndexResponseModelIndex(
                    name=e.name, version=e.version, state=e.state, reason=e.reason
                )
                for e in entries
            ]
        )

    async def repository_model_load(
        self, message: RepositoryModelLoadRequest
    ) -> RepositoryModelLoadResponse:
        """Load or reload a model: warmed up and checked before it serves; refused with the
        reason otherwise, the old version serving on."""
        with as_grpc_errors():
            control = self._control_api()
            config = None
            parameter = message.parameters.get("config")
            if parameter is not None:
                config = _config_parameter(parameter.string_param)
            annotate(model=message.model_name)
            await control.load(message.model_name, config)
        return RepositoryModelLoadResponse()

    async def repository_model_unload(
        self, message: RepositoryModelUnloadRequest
    ) -> RepositoryModelUnloadResponse:
        """Stop serving a model; calls running on it finish."""
        with as_grpc_errors():
            annotate(model=message.model_name)
            await self._control_api().unload(message.model_name)
        return RepositoryModelUnloadResponse()

    def _control_api(self) -> ModelControl:
        if self._control is None:
            raise ModelControlError("explicit model load / unload is not allowed on this server")
        return self._control

    def _input(
        self, model: str, message: ModelInferRequest
    ) -> tuple[tensors.TensorSpec, list[int], tensors.Decoded]:
        """The request's one input: declared, shaped, sized and decoded."""
        inputs = message.inputs
        if len(inputs) != 1:
            raise InvalidTensorError(
                f"model {model!r} takes exactly one input, one of "
                f"{', '.join(spec.name for spec in tensors.INPUTS)}; the request has {len(inputs)}"
            )
        (tensor,) = inputs
        shape = list(tensor.shape)
        spec = tensors.input_spec(model, tensor.name, tensor.datatype, shape)
        if shape[0] > self._limits.max_batch_images:
            raise TooManyImagesError(
                f"input {spec.name!r} holds {shape[0]} images; the limit is "
                f"{self._limits.max_batch_images} per request"
            )
        raw = message.raw_input_contents
        if raw:
            if len(raw) != len(inputs):
                raise InvalidTensorError(
                    f"raw_input_contents has {len(raw)} entries for {len(inputs)} input; "
                    "it needs one per input"
                )
            if _has_values(tensor.contents):
                raise InvalidTensorError(
                    f"input {spec.name!r} has values in both contents and raw_input_contents; "
                    "send them in one"
                )
            return spec, shape, tensors.from_raw(spec, shape, raw[0])
        return spec, shape, tensors.from_values(spec, shape, _typed_values(spec, tensor))


def _config_parameter(text: str | None) -> dict[str, Any]:
    """The `config` parameter of a load: a JSON object (Triton's model config override)."""
    try:
        document = json.loads(text or "")
    except ValueError:
        document = None
    if not isinstance(document, dict):
        raise RepositoryError("the load's 'config' parameter must be a JSON object in string_param")
    return document


def _classify_items(
    pipeline: Pipeline,
    items: Sequence[bytes],
    expires_at: float | None,
    on_batch: Callable[[int], None] | None,
) -> Awaitable[FloatArray]:
    """Images through Predict's preprocessing; the first that fails fails the request, with
    the error Predict would give for it. One image takes Predict's own path (its future is
    awaited as it is: no coroutine in between)."""
    if len(items) == 1:
        return pipeline.start(items[0], expires_at, on_batch)
    return pipeline.classify_all(items, expires_at)


def _typed_values(
    spec: tensors.TensorSpec, tensor: ModelInferRequestInferInputTensor
) -> Sequence[Any]:
    """The values in the `contents` field of the input's datatype; refused when they are in
    another field."""
    contents = tensor.contents
    field = tensors.contents_field(spec.datatype)
    if contents is not None:
        for name, _ in _populated(contents):
            if name != field:
                raise InvalidTensorError(
                    f"input {spec.name!r} is {spec.datatype}: its values go in "
                    f"contents.{field}, not contents.{name}"
                )
    values: Sequence[Any] = getattr(contents, field) if contents is not None else []
    return values


def _populated(contents: InferTensorContents) -> list[tuple[str, Sequence[Any]]]:
    return [(name, values) for name in _CONTENTS_FIELDS if (values := getattr(contents, name))]


_CONTENTS_FIELDS: Final = (
    "bool_contents",
    "int_contents",
    "int64_contents",
    "uint_contents",
    "uint64_contents",
    "fp32_contents",
    "fp64_contents",
    "bytes_contents",
)


def _has_values(contents: InferTensorContents | None) -> bool:
    return contents is not None and bool(_populated(contents))


@dataclass(frozen=True, slots=True)
class _Wanted:
    spec: tensors.TensorSpec
    class_count: int = 0
    """Top-k classes asked for (0: the tensor itself)."""


def _requested_outputs(
    model: str, requested: Sequence[ModelInferRequestInferRequestedOutputTensor]
) -> Sequence[_Wanted]:
    """The outputs to answer with, in the order asked (all of them when none is asked)."""
    if not requested:
        return _ALL_OUTPUTS
    wanted: list[_Wanted] = []
    for output in requested:
        spec = tensors.output_spec(model, output.name)
        if any(w.spec == spec for w in wanted):
            raise InvalidTensorError(f"output {spec.name!r} is requested twice")
        wanted.append(_Wanted(spec, _class_count(spec, output.parameters)))
    return wanted


_ALL_OUTPUTS: Final = tuple(_Wanted(spec) for spec in tensors.OUTPUTS)


def _class_count(spec: tensors.TensorSpec, parameters: Mapping[str, InferParameter]) -> int:
    parameter = parameters.get(tensors.CLASSIFICATION)
    if parameter is None:
        return 0
    if parameter.int64_param is not None:
        count = parameter.int64_param
    elif parameter.uint64_param is not None:
        count = parameter.uint64_param
    else:
        raise InvalidTensorError(
            f"the {tensors.CLASSIFICATION!r} parameter of output {spec.name!r} must be an "
            "integer (int64_param or uint64_param)"
        )
    return tensors.class_count(spec, count)


def _outputs(
    wanted: Sequence[_Wanted], probabilities: FloatArray
) -> tuple[list[ModelInferResponseInferOutputTensor], list[bytes]]:
    """The output tensors' descriptions and their raw contents, in the order wanted."""
    described: list[ModelInferResponseInferOutputTensor] = []
    raw: list[bytes] = []
    for want in wanted:
        out = tensors.output(want.spec, probabilities, want.class_count)
        described.append(
            ModelInferResponseInferOutputTensor(
                name=want.spec.name, datatype=out.datatype, shape=out.shape
            )
        )
        raw.append(out.raw())
    return described, raw


def _tensor_metadata(spec: tensors.TensorSpec) -> ModelMetadataResponseTensorMetadata:
    return ModelMetadataResponseTensorMetadata(
        name=spec.name, datatype=spec.datatype, shape=list(spec.shape)
    )


TRITON_ONLY_METHODS: Final = (
    "ModelConfig",
    "ModelStatistics",
    "SystemSharedMemoryStatus",
    "SystemSharedMemoryRegister",
    "SystemSharedMemoryUnregister",
    "CudaSharedMemoryStatus",
    "CudaSharedMemoryRegister",
    "CudaSharedMemoryUnregister",
    "TraceSetting",
    "LogSettings",
)
"""The RPCs of Triton's `GRPCInferenceService` beyond the protocol: not implemented here."""

IMPLEMENTED_METHODS: Final = (
    "ServerLive",
    "ServerReady",
    "ModelReady",
    "ServerMetadata",
    "ModelMetadata",
    "ModelInfer",
    "ModelStreamInfer",
    "RepositoryIndex",
    "RepositoryModelLoad",
    "RepositoryModelUnload",
)


class TritonOnlyMethods:
    """Answers Triton's RPCs beyond the protocol with UNIMPLEMENTED and a message that says
    what is served instead (grpclib alone would say only "Method not found").

    Served beside `InferenceService` under the same service name; not declared in
    `inference.proto`, so reflection lists only what is implemented. The request message is
    never read.
    """

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        return {
            f"/{SERVICE}/{method}": grpclib.const.Handler(
                _refusal(method), Cardinality.UNARY_UNARY, ServerLiveRequest, ServerLiveResponse
            )
            for method in TRITON_ONLY_METHODS
        }


def _refusal(method: str) -> Callable[[Any], Awaitable[None]]:
    async def refuse(stream: Any) -> None:
        with as_grpc_errors():
            raise UnsupportedMethodError(
                f"{SERVICE}/{method} is one of Triton's own RPCs, which mnist-service does not "
                f"implement; it serves {', '.join(IMPLEMENTED_METHODS)}"
            )

    return refuse
