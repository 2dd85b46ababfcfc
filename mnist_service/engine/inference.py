"""Inference: onnxruntime sessions behind two small interfaces. Knows nothing about gRPC.

- `Classifier` is the synchronous model: float32 [N, 1, 28, 28] in, probabilities [N, 10] out.
  `OnnxClassifier` implements it with one onnxruntime session, loaded and warmed up once.
- `Predictor` is the asynchronous seam the pipeline calls; `engine.batcher.Batcher` implements
  it by gathering concurrent calls into shared model runs.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from ..constants import IMAGE_SIZE, META_ARCHITECTURE, NUM_CLASSES, PROBABILITIES_NAME
from ..errors import ConfigError, ModelError

FloatArray = npt.NDArray[np.float32]

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
DYNAMIC = -1
"""Stands for a dynamic dimension in `ModelInfo.input_shape`."""

_ORT_ERROR_SEVERITY = 3  # onnxruntime logs errors only; fallbacks are reported by us instead


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelInfo:
    """What is being served, as reported to clients and in the startup log."""

    architecture: str
    weights_path: Path
    weights_sha256: str
    input_name: str
    input_shape: tuple[int, ...]
    execution_provider: str
    metadata: Mapping[str, str] = field(default_factory=dict)


class Classifier(Protocol):
    """A loaded model: synchronous, thread-safe, batch in and probabilities out."""

    @property
    def info(self) -> ModelInfo: ...

    def classify(self, batch: FloatArray) -> FloatArray:
        """Float32 [N, 1, 28, 28] in [0, 1] -> float32 [N, 10] probabilities."""
        ...


class Predictor(Protocol):
    """The asynchronous seam the service calls; implementations keep the event loop free."""

    @property
    def info(self) -> ModelInfo: ...

    async def predict(
        self,
        batch: FloatArray,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> FloatArray:
        """Float32 [N, 1, 28, 28] in [0, 1] -> float32 [N, 10] probabilities.

        Images still waiting at `expires_at` (a `time.monotonic()` value) are not run: the
        call raises `DeadlineExpiredError` instead. `on_batch` is told each model run's size.
        """
        ...

    def submit(
        self,
        batch: FloatArray,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> asyncio.Future[FloatArray]:
        """Like `predict` without waiting: the probabilities arrive in the future."""
        ...


class OnnxClassifier:
    """A `Classifier` over one onnxruntime `InferenceSession`."""

    def __init__(self, session: ort.InferenceSession, info: ModelInfo) -> None:
        self._session = session
        self._info = info

    @property
    def info(self) -> ModelInfo:
        """What is being served."""
        return self._info

    @classmethod
    def load(
        cls,
        path: Path,
        *,
        architecture: str,
        device: str = "auto",
        threads: int = 1,
    ) -> OnnxClassifier:
        """Load, validate and warm up the ONNX model at `path`; raise ModelError if unusable."""
        try:
            model_bytes = path.read_bytes()
        except FileNotFoundError:
            raise ModelError(f"model weights not found: {path}") from None
        except OSError as exc:
            raise ModelError(f"cannot read model weights {path}: {exc.strerror}") from exc

        options = ort.SessionOptions()
        # Requests are single images: parallelism comes from concurrent calls, not intra-op.
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = _ORT_ERROR_SEVERITY
        providers = _providers(device)
        try:
            session = ort.InferenceSession(model_bytes, sess_options=options, providers=providers)
        except Exception as exc:  # onnxruntime raises its own untyped errors here
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc)
            raise ModelError(f"{path} is not a loadable ONNX model: {first_line}") from exc

        provider = session.get_providers()[0]
        if device == "cuda" and provider != CUDA_PROVIDER:
            raise ModelError(
                "--device cuda: the CUDA execution provider failed to start "
                "(check the CUDA and cuDNN libraries onnxruntime-gpu needs)"
            )
        input_name, input_shape = _check_contract(session, path)
        metadata = dict(session.get_modelmeta().custom_metadata_map)
        declared = metadata.get(META_ARCHITECTURE)
        if declared is not None and declared != architecture:
            raise ModelError(
                f"{path} holds a {declared!r} model, but the architecture asked for is "
                f"{architecture!r} (see --model-architecture)"
            )
        info = ModelInfo(
            architecture=architecture,
            weights_path=path,
            weights_sha256=hashlib.sha256(model_bytes).hexdigest(),
            input_name=input_name,
            input_shape=input_shape,
            execution_provider=provider,
            metadata=metadata,
        )
        classifier = cls(session, info)
        classifier.classify(np.zeros((1, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32))
        return classifier

    def classify(self, batch: FloatArray) -> FloatArray:
        """Float32 [N, 1, 28, 28] in [0, 1] -> float32 [N, 10] probabilities."""
        (probabilities,) = self._session.run([PROBABILITIES_NAME], {self._info.input_name: batch})
        return np.asarray(probabilities, dtype=np.float32)


def available_devices() -> tuple[str, ...]:
    """The devices this onnxruntime build can use: always "cpu", "cuda" with onnxruntime-gpu."""
    providers = ort.get_available_providers()
    return ("cpu", "cuda") if CUDA_PROVIDER in providers else ("cpu",)


def _providers(device: str) -> list[str]:
    if device == "cpu":
        return [CPU_PROVIDER]
    if device == "cuda":
        if "cuda" not in available_devices():
            raise ConfigError(
                "--device cuda: this onnxruntime has no CUDA execution provider "
                "(install onnxruntime-gpu instead of onnxruntime)"
            )
        return [CUDA_PROVIDER, CPU_PROVIDER]
    if device == "auto":
        return [CUDA_PROVIDER, CPU_PROVIDER] if "cuda" in available_devices() else [CPU_PROVIDER]
    raise ConfigError(f"unknown device {device!r}")


def _check_contract(session: ort.InferenceSession, path: Path) -> tuple[str, tuple[int, ...]]:
    """Check the model takes [N, 1, 28, 28] float32 and gives `probabilities` [N, 10]."""
    inputs = session.get_inputs()
    expected = f"one float32 input [N, 1, {IMAGE_SIZE}, {IMAGE_SIZE}]"
    if len(inputs) != 1 or inputs[0].type != "tensor(float)":
        raise ModelError(f"{path} does not fit the model contract: expected {expected}")
    shape = tuple(d if isinstance(d, int) else DYNAMIC for d in inputs[0].shape)
    if len(shape) != 4 or shape[1:] != (1, IMAGE_SIZE, IMAGE_SIZE):
        raise ModelError(f"{path} takes input shape {list(shape)}; expected {expected}")
    outputs = {o.name: o for o in session.get_outputs()}
    output = outputs.get(PROBABILITIES_NAME)
    if output is None or len(output.shape) != 2 or output.shape[1] != NUM_CLASSES:
        raise ModelError(
            f"{path} does not fit the model contract: expected an output "
            f"{PROBABILITIES_NAME!r} of shape [N, {NUM_CLASSES}]"
        )
    return inputs[0].name, shape
