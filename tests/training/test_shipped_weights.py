"""The ONNX models shipped in ``weights/``: contract, metadata, provenance and accuracy."""

from __future__ import annotations

import hashlib
from datetime import datetime
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import pytest

from export.evaluate import evaluate_session
from mnist_service.constants import (
    INPUT_NAME,
    LOGITS_NAME,
    META_ARCHITECTURE,
    META_CREATED,
    META_OPSET,
    META_SOURCE_SHA256,
    META_TEST_ACCURACY,
    PROBABILITIES_NAME,
    WEIGHT_FILES,
)
from mnist_service.engine.preprocess import model_batch

THRESHOLDS = {"conv": 0.995, "mlp": 0.987}
"""The floors the shipped models must meet on the MNIST test set (weights/README.md)."""
MAX_MODEL_BYTES = 4 * 1024 * 1024
MIN_OPSET = 17

pytestmark = pytest.mark.parametrize("arch", ["mlp", "conv"])


@pytest.fixture
def path(arch: str, weights_dir: Path) -> Path:
    """The shipped ONNX model of the architecture under test."""
    return weights_dir / WEIGHT_FILES[arch]  # type: ignore[index]


def _dims(value_info: onnx.ValueInfoProto) -> list[str | int]:
    return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]


def test_graph_contract(arch: str, path: Path) -> None:
    assert path.stat().st_size < MAX_MODEL_BYTES
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    # Self-contained: every weight is inside the file.
    assert all(t.data_location == onnx.TensorProto.DEFAULT for t in model.graph.initializer)
    assert not list(path.parent.glob(f"{path.name}.data"))
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    assert opset >= MIN_OPSET
    (image,) = model.graph.input
    assert image.name == INPUT_NAME
    assert image.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    batch, *rest = _dims(image)
    assert isinstance(batch, str)
    assert batch  # symbolic: dynamic batch
    assert rest == [1, 28, 28]
    assert [o.name for o in model.graph.output] == [PROBABILITIES_NAME, LOGITS_NAME]
    for output in model.graph.output:
        assert output.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        assert _dims(output) == [batch, 10]
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata[META_ARCHITECTURE] == arch
    assert int(metadata[META_OPSET]) == opset
    assert len(metadata[META_SOURCE_SHA256]) == 64
    int(metadata[META_SOURCE_SHA256], 16)
    assert datetime.fromisoformat(metadata[META_CREATED]).tzinfo is not None
    assert float(metadata[META_TEST_ACCURACY]) >= THRESHOLDS[arch]


def test_dynamic_batch_and_probabilities(
    path: Path, mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]
) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, labels = mnist_test_set
    for size in (1, 7, 64):
        probabilities, logits = session.run(None, {INPUT_NAME: model_batch(images[:size])})
        assert probabilities.shape == (size, 10)
        assert logits.shape == (size, 10)
        np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
        np.testing.assert_array_equal(probabilities.argmax(1), logits.argmax(1))
    # The first test digits are easy ones: a trained model gets them all right.
    assert (probabilities.argmax(1) == labels[:64]).mean() > 0.95


@pytest.mark.slow
def test_full_test_set_accuracy(
    arch: str, path: Path, mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]
) -> None:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    evaluation = evaluate_session(session, *mnist_test_set)
    assert evaluation.accuracy >= THRESHOLDS[arch]
    assert evaluation.confusion.sum() == 10_000
    # The accuracy recorded in the metadata is the one measured here.
    metadata = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert float(metadata[META_TEST_ACCURACY]) == pytest.approx(evaluation.accuracy, abs=5e-5)


def test_readme_records_sha256(path: Path, weights_dir: Path) -> None:
    readme = (weights_dir / "README.md").read_text()
    assert hashlib.sha256(path.read_bytes()).hexdigest() in readme
    assert path.name in readme
