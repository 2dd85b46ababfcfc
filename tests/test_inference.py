"""OnnxClassifier on the real shipped ONNX files: loading, contract checks, predictions."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
from onnx import TensorProto, helper

from mnist_service.config import shipped_weights
from mnist_service.constants import ARCHITECTURES, Architecture
from mnist_service.engine.inference import OnnxClassifier, available_devices
from mnist_service.engine.preprocess import model_batch
from mnist_service.errors import ConfigError, ModelError

MnistSplit = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_shipped_models_load_and_classify_real_digits(
    architecture: Architecture, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    classifier = OnnxClassifier.load(shipped_weights(architecture), architecture=architecture)
    batch = model_batch(images[:500])

    probabilities = classifier.classify(batch)

    assert probabilities.shape == (500, 10)
    assert probabilities.dtype == np.float32
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    assert (probabilities.argmax(axis=1) == labels[:500]).mean() > 0.97
    info = classifier.info
    assert info.architecture == architecture
    assert info.input_shape == (-1, 1, 28, 28)
    assert info.execution_provider == "CPUExecutionProvider"
    assert len(info.weights_sha256) == 64
    assert info.metadata["architecture"] == architecture


def test_missing_file_is_a_model_error(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="not found"):
        OnnxClassifier.load(tmp_path / "absent.onnx", architecture="conv")


def test_corrupt_file_is_a_model_error(tmp_path: Path) -> None:
    corrupt = tmp_path / "corrupt.onnx"
    corrupt.write_bytes(shipped_weights("conv").read_bytes()[:1000])
    with pytest.raises(ModelError, match="not a loadable ONNX model"):
        OnnxClassifier.load(corrupt, architecture="conv")


def test_architecture_mismatch_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="holds a 'mlp' model"):
        OnnxClassifier.load(shipped_weights("mlp"), architecture="conv")


def _identity_model(path: Path, shape: list[int | str], output: str) -> Path:
    graph = helper.make_graph(
        [helper.make_node("Identity", ["image"], [output])],
        "wrong",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(output, TensorProto.FLOAT, shape)],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    onnx.save(model, path)
    return path


@pytest.mark.parametrize(
    ("shape", "output", "fragment"),
    [
        (["N", 1, 28, 28], "probabilities", "output 'probabilities'"),
        (["N", 784], "probabilities", "input shape"),
        (["N", 10], "scores", "input shape"),
    ],
    ids=["image-in-image-out", "flat-input", "wrong-names"],
)
def test_models_breaking_the_contract_are_refused(
    tmp_path: Path, shape: list[int | str], output: str, fragment: str
) -> None:
    path = _identity_model(tmp_path / "wrong.onnx", shape, output)
    with pytest.raises(ModelError, match=fragment):
        OnnxClassifier.load(path, architecture="conv")


@pytest.mark.skipif("cuda" in available_devices(), reason="this onnxruntime has CUDA")
def test_cuda_without_the_provider_is_a_clear_error() -> None:
    with pytest.raises(ConfigError, match="no CUDA execution provider"):
        OnnxClassifier.load(shipped_weights("conv"), architecture="conv", device="cuda")
