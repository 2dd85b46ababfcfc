"""PyTorch checkpoint -> self-contained ONNX model with in-graph normalisation and softmax.

The exported graph takes ``image`` float32 [N, 1, 28, 28] in [0, 1] (white ink on black),
normalises it with the MNIST mean/std, runs the network and returns ``probabilities``
(softmax) and ``logits``, both [N, 10]. Export is checked three ways before the file is
written: the ONNX checker, a parity check of onnxruntime against PyTorch on real test
images, and the full 10k test-set accuracy (stored in the metadata).
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from export.evaluate import (
    Evaluation,
    evaluate_probabilities,
    onnx_probabilities,
    open_session,
)
from mnist_service.constants import (
    IMAGE_SIZE,
    INPUT_NAME,
    LOGITS_NAME,
    META_ARCHITECTURE,
    META_CREATED,
    META_OPSET,
    META_SOURCE_SHA256,
    META_TEST_ACCURACY,
    PROBABILITIES_NAME,
    Architecture,
)
from mnist_service.engine.preprocess import model_batch
from training.data import load_mnist
from training.models import build_model, normalize

logger = logging.getLogger(__name__)

OPSET = 18
PARITY_MIN_IMAGES = 1000
PARITY_TOLERANCE = 1e-5
_TRACE_BATCH = 2


# Loggers of the exporter's internals: at INFO they narrate every optimisation pass, and they
# warn that torchvision (which we do not use) is missing. Our CLIs keep them at WARNING/ERROR.
_NOISY_LOGGERS = {
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,
}


def quiet_exporter_logs() -> None:
    """Silence the ONNX exporter's step-by-step logging (called by the command lines)."""
    for name, level in _NOISY_LOGGERS.items():
        logging.getLogger(name).setLevel(level)


class ExportError(Exception):
    """Export failed: unreadable checkpoint, invalid graph or failed parity check."""


class CheckpointError(ExportError):
    """A checkpoint cannot be read or does not match the architecture's parameter names."""


class ParityError(ExportError):
    """onnxruntime and PyTorch disagree on the exported model's outputs."""


class WithPreprocessing(nn.Module):
    """The exported model: [0, 1] pixels -> normalise -> network -> (probabilities, logits)."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return softmax probabilities and logits, both [N, 10]."""
        logits = self.net(normalize(image))
        return torch.softmax(logits, dim=1), logits


def sha256_file(path: Path) -> str:
    """Return the hex sha256 of a file."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Read a ``.pt``/``.pth`` state dict or a ``.safetensors`` file into CPU tensors."""
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            return load_file(str(path), device="cpu")
        # weights_only: a checkpoint is data, never code to unpickle.
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise CheckpointError(f"cannot read checkpoint {path}: {exc}") from exc
    if isinstance(loaded, dict) and isinstance(loaded.get("state_dict"), dict):
        loaded = loaded["state_dict"]
    if not isinstance(loaded, dict) or not all(
        isinstance(v, torch.Tensor) for v in loaded.values()
    ):
        raise CheckpointError(f"{path} is not a state dict of tensors")
    return loaded


def load_network(path: Path, arch: Architecture) -> nn.Module:
    """Build the architecture and load a checkpoint with its exact parameter names and shapes."""
    state = load_state_dict(path)
    net = build_model(arch)
    expected = net.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not hold a {arch!r} network: missing {missing}, unexpected {unexpected}"
        )
    wrong = [
        f"{name} {tuple(state[name].shape)} != {tuple(t.shape)}"
        for name, t in expected.items()
        if state[name].shape != t.shape
    ]
    if wrong:
        raise CheckpointError(f"{path}: shape mismatch for {arch!r}: {', '.join(wrong)}")
    net.load_state_dict({k: v.to(torch.float32) for k, v in state.items()})
    return net.eval()


def to_onnx(net: nn.Module, opset: int = OPSET) -> onnx.ModelProto:
    """Export the network with preprocessing and softmax; dynamic batch, no external data."""
    wrapper = WithPreprocessing(net).eval()
    example = torch.zeros(_TRACE_BATCH, 1, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():
        # torch 2.13's own exporter code calls a pytree API it has deprecated; nothing we pass
        # triggers it, and the exported graph is unaffected.
        warnings.filterwarnings(
            "ignore",
            message=r"`isinstance\(treespec, LeafSpec\)` is deprecated",
            category=FutureWarning,
        )
        program = torch.onnx.export(
            wrapper,
            (example,),
            input_names=[INPUT_NAME],
            output_names=[PROBABILITIES_NAME, LOGITS_NAME],
            dynamic_shapes={"image": {0: torch.export.Dim("N")}},
            opset_version=opset,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    if program is None:  # pragma: no cover - the dynamo exporter always returns a program
        raise ExportError("torch.onnx.export returned no program")
    model = program.model_proto
    onnx.checker.check_model(model, full_check=True)
    return model


@dataclass(frozen=True)
class ParityReport:
    """Result of comparing onnxruntime with PyTorch on the same images."""

    images: int
    max_abs_diff: float
    argmax_mismatches: int


def check_parity(
    model_bytes: bytes, net: nn.Module, images: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> ParityReport:
    """Compare onnxruntime with PyTorch probabilities on model inputs; raise ParityError if off."""
    onnx_probs = onnx_probabilities(open_session(model_bytes), images)
    return compare_probabilities(onnx_probs, torch_probabilities(net, images), tolerance)


def torch_probabilities(net: nn.Module, images: np.ndarray) -> np.ndarray:
    """PyTorch's probabilities for model inputs, through the same wrapper that is exported."""
    with torch.no_grad():
        probabilities: np.ndarray = (
            WithPreprocessing(net).eval()(torch.from_numpy(images))[0].numpy()
        )
    return probabilities


def compare_probabilities(
    onnx_probs: np.ndarray, torch_probs: np.ndarray, tolerance: float = PARITY_TOLERANCE
) -> ParityReport:
    """Check onnxruntime's probabilities against PyTorch's; raise ParityError if off."""
    if onnx_probs.shape[0] < PARITY_MIN_IMAGES:
        raise ParityError(
            f"parity needs at least {PARITY_MIN_IMAGES} images, got {onnx_probs.shape[0]}"
        )
    report = ParityReport(
        images=onnx_probs.shape[0],
        max_abs_diff=float(np.abs(onnx_probs - torch_probs).max()),
        argmax_mismatches=int((onnx_probs.argmax(1) != torch_probs.argmax(1)).sum()),
    )
    if not report.max_abs_diff < tolerance or report.argmax_mismatches:
        raise ParityError(
            f"onnxruntime and PyTorch disagree on {report.images} test images: max abs "
            f"probability difference {report.max_abs_diff:.3g} (tolerance {tolerance:g}), "
            f"{report.argmax_mismatches} different predicted digits"
        )
    logger.info(
        "Parity OK on %d images: max abs probability difference %.3g",
        report.images,
        report.max_abs_diff,
    )
    return report


@dataclass(frozen=True)
class ExportReport:
    """What an export wrote and measured."""

    output: Path
    sha256: str
    parity: ParityReport
    evaluation: Evaluation


def export_checkpoint(
    checkpoint: Path,
    arch: Architecture,
    output: Path,
    data_dir: Path | None = None,
    opset: int = OPSET,
) -> ExportReport:
    """Export a checkpoint to ONNX with metadata, after checker, parity and accuracy checks."""
    net = load_network(checkpoint, arch)
    model = to_onnx(net, opset)
    test_images, test_labels = load_mnist("test", data_dir)
    inputs = model_batch(test_images)
    # One onnxruntime pass over the test set serves both the parity check and the accuracy.
    onnx_probs = onnx_probabilities(open_session(model.SerializeToString()), inputs)
    parity = compare_probabilities(onnx_probs, torch_probabilities(net, inputs))
    evaluation = evaluate_probabilities(onnx_probs, test_labels)
    onnx.helper.set_model_props(
        model,
        {
            META_ARCHITECTURE: arch,
            META_TEST_ACCURACY: f"{evaluation.accuracy:.4f}",
            META_OPSET: str(opset),
            META_SOURCE_SHA256: sha256_file(checkpoint),
            META_CREATED: datetime.now(UTC).isoformat(timespec="seconds"),
        },
    )
    onnx.checker.check_model(model, full_check=True)
    output.parent.mkdir(parents=True, exist_ok=True)
    serialized = model.SerializeToString()
    temporary = output.with_name(f".{output.name}.tmp")
    temporary.write_bytes(serialized)
    temporary.replace(output)
    logger.info(
        "Wrote %s (%s): test accuracy %.2f%% with onnxruntime",
        output,
        arch,
        100 * evaluation.accuracy,
    )
    return ExportReport(
        output=output,
        sha256=hashlib.sha256(serialized).hexdigest(),
        parity=parity,
        evaluation=evaluation,
    )
