"""``python -m export``: .safetensors checkpoints with the Rust names, evaluation and its table."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file
from typer.testing import CliRunner

from export.__main__ import app
from export.evaluate import Evaluation, confusion_matrix, format_confusion
from export.onnx_export import CheckpointError, load_network
from mnist_service.constants import (
    INPUT_NAME,
    LOGITS_NAME,
    META_ARCHITECTURE,
    META_SOURCE_SHA256,
    PROBABILITIES_NAME,
)
from training.models import build_model


def _rust_style_safetensors(arch: str, path: Path) -> dict[str, torch.Tensor]:
    """Write a freshly initialised network as the Rust project's train.py would: flat names."""
    torch.manual_seed(7)
    state = {k: v.contiguous() for k, v in build_model(arch).state_dict().items()}  # type: ignore[arg-type]
    save_file(state, str(path))
    return state


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_safetensors_checkpoint_loads_and_exports(
    arch: str, tmp_path: Path, mnist_dir: Path
) -> None:
    checkpoint = tmp_path / f"{arch}.safetensors"
    state = _rust_style_safetensors(arch, checkpoint)
    net = load_network(checkpoint, arch)  # type: ignore[arg-type]
    for name, tensor in net.state_dict().items():
        torch.testing.assert_close(tensor, state[name])

    output = tmp_path / f"{arch}.onnx"
    result = CliRunner().invoke(
        app,
        [
            "onnx",
            str(checkpoint),
            f"--arch={arch}",
            f"--output={output}",
            f"--data-dir={mnist_dir}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert "parity max abs diff" in result.output
    model = onnx.load(str(output))
    metadata = {p.key: p.value for p in model.metadata_props}
    assert metadata[META_ARCHITECTURE] == arch
    assert metadata[META_SOURCE_SHA256] == hashlib.sha256(checkpoint.read_bytes()).hexdigest()
    session = ort.InferenceSession(str(output), providers=["CPUExecutionProvider"])
    assert [i.name for i in session.get_inputs()] == [INPUT_NAME]
    assert [o.name for o in session.get_outputs()] == [PROBABILITIES_NAME, LOGITS_NAME]
    # The graph computes exactly what the loaded PyTorch network does.
    images = np.random.default_rng(0).random((3, 1, 28, 28), dtype=np.float32)
    probabilities, logits = session.run(None, {INPUT_NAME: images})
    with torch.no_grad():
        expected = net((torch.from_numpy(images) - 0.1307) / 0.3081).numpy()
    np.testing.assert_allclose(logits, expected, atol=1e-4)
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-6)


def test_safetensors_with_wrong_names_is_rejected(tmp_path: Path) -> None:
    checkpoint = tmp_path / "renamed.safetensors"
    state = build_model("mlp").state_dict()
    save_file({k.replace("fc1", "layer1"): v for k, v in state.items()}, str(checkpoint))
    with pytest.raises(CheckpointError, match=r"missing \['fc1.bias', 'fc1.weight'\]"):
        load_network(checkpoint, "mlp")


def test_export_cli_rejects_unknown_arch(tmp_path: Path) -> None:
    checkpoint = tmp_path / "mlp.safetensors"
    _rust_style_safetensors("mlp", checkpoint)
    result = CliRunner().invoke(app, ["onnx", str(checkpoint), "--arch=resnet"])
    assert result.exit_code != 0
    assert "expected mlp or conv" in result.output


def test_confusion_matrix_counts() -> None:
    labels = np.array([0, 0, 1, 2, 2, 2], dtype=np.uint8)
    predicted = np.array([0, 1, 1, 2, 2, 0])
    matrix = confusion_matrix(labels, predicted)
    assert matrix[0, 0] == 1
    assert matrix[0, 1] == 1
    assert matrix[2, 0] == 1
    assert matrix[2, 2] == 2
    assert matrix.sum() == labels.size
    table = format_confusion(Evaluation(accuracy=4 / 6, confusion=matrix))
    assert table.splitlines()[0].startswith("true\\pred")
    assert len(table.splitlines()) == 12


def test_evaluate_cli_prints_accuracy_and_confusion(
    tmp_path: Path, mnist_dir: Path, shipped_mlp: Path
) -> None:
    png = tmp_path / "confusion.png"
    result = CliRunner().invoke(
        app, ["evaluate", str(shipped_mlp), f"--data-dir={mnist_dir}", f"--png={png}"]
    )
    assert result.exit_code == 0, result.output
    assert "on 10000 test images" in result.output
    rows = [line for line in result.output.splitlines() if line.strip()[:1].isdigit()]
    # Ten matrix rows whose counts add up to the whole test set.
    counts = [[int(v) for v in row.split()[1:11]] for row in rows[-10:]]
    assert sum(map(sum, counts)) == 10_000
    with Image.open(png) as image:
        assert image.format == "PNG"
