"""Models, augmentation and a short real training run through the ``python -m training`` CLI."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
from typer.testing import CliRunner

from export.evaluate import to_model_input
from export.onnx_export import ParityError, check_parity, load_network, to_onnx
from mnist_service.constants import (
    META_ARCHITECTURE,
    META_SOURCE_SHA256,
    META_TEST_ACCURACY,
    WEIGHT_FILES,
)
from training.__main__ import app
from training.augment import NO_AUGMENTATION, AugmentConfig, augment
from training.models import MLP, ConvNet, build_model

MnistSplit = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]

EXPECTED_PARAMETERS = {
    "mlp": {
        "fc1.weight": (128, 784),
        "fc1.bias": (128,),
        "fc2.weight": (64, 128),
        "fc2.bias": (64,),
        "fc3.weight": (10, 64),
        "fc3.bias": (10,),
    },
    "conv": {
        "conv2d_1.weight": (32, 1, 3, 3),
        "conv2d_1.bias": (32,),
        "conv2d_2.weight": (64, 32, 3, 3),
        "conv2d_2.bias": (64,),
        "linear_1.weight": (128, 3136),
        "linear_1.bias": (128,),
        "linear_2.weight": (10, 128),
        "linear_2.bias": (10,),
    },
}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_parameter_names_and_shapes(arch: str) -> None:
    model = build_model(arch)  # type: ignore[arg-type]
    shapes = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    assert shapes == EXPECTED_PARAMETERS[arch]
    logits = model(torch.zeros(5, 1, 28, 28))
    assert logits.shape == (5, 10)


def test_models_return_logits_not_probabilities() -> None:
    torch.manual_seed(0)
    logits = ConvNet()(torch.randn(4, 1, 28, 28) * 3)
    # Softmax rows would be non-negative and sum to one; logits are neither in general.
    assert not torch.allclose(logits.sum(dim=1), torch.ones(4))


def test_augment_keeps_range_and_perturbs(mnist_test_set: MnistSplit) -> None:
    images = torch.from_numpy(to_model_input(mnist_test_set[0][:256]))
    first = augment(images.clone(), AugmentConfig(), torch.Generator().manual_seed(1))
    again = augment(images.clone(), AugmentConfig(), torch.Generator().manual_seed(1))
    assert first.shape == images.shape
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0
    torch.testing.assert_close(first, again)  # seeded: reproducible
    changed = (first - images).abs().flatten(1).amax(dim=1) > 0.1
    assert changed.float().mean() > 0.9
    # Light: the ink mass stays of the same order (no digit erased or flooded); thin digits
    # such as ones may triple their ink when dilated.
    ratio = first.flatten(1).sum(1) / images.flatten(1).sum(1)
    assert float(ratio.min()) > 0.3
    assert float(ratio.max()) < 4.0
    torch.testing.assert_close(
        augment(images.clone(), NO_AUGMENTATION, torch.Generator().manual_seed(1)), images
    )


@pytest.mark.slow
def test_training_cli_dry_run_trains_saves_and_exports(tmp_path: Path, mnist_dir: Path) -> None:
    """One short epoch per architecture on real data -> checkpoint -> ONNX with parity check."""
    result = CliRunner().invoke(
        app,
        [
            "--arch=all",
            "--dry-run",
            "--no-progress",
            f"--output-dir={tmp_path / 'weights'}",
            f"--checkpoint-dir={tmp_path / 'checkpoints'}",
            f"--data-dir={mnist_dir}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("parity max abs diff") == 2
    for arch, file_name in WEIGHT_FILES.items():
        checkpoint = tmp_path / "checkpoints" / f"mnist_{arch}.pt"
        state = torch.load(checkpoint, weights_only=True)
        assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_PARAMETERS[arch]
        model = onnx.load(str(tmp_path / "weights" / file_name))
        onnx.checker.check_model(model, full_check=True)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert metadata[META_ARCHITECTURE] == arch
        # Even one epoch on 2,048 images learns something real.
        assert float(metadata[META_TEST_ACCURACY]) > 0.5
        assert len(metadata[META_SOURCE_SHA256]) == 64


def test_parity_check_fails_loudly_on_mismatch(tmp_path: Path, mnist_test_set: MnistSplit) -> None:
    net = MLP().eval()
    model_bytes = to_onnx(net).SerializeToString()
    images = to_model_input(mnist_test_set[0][:1000])
    report = check_parity(model_bytes, net, images)
    assert report.max_abs_diff < 1e-5
    assert report.argmax_mismatches == 0
    with torch.no_grad():
        net.fc3.bias[3] += 0.5  # PyTorch now disagrees with the exported graph
    with pytest.raises(ParityError, match="disagree"):
        check_parity(model_bytes, net, images)
    with pytest.raises(ParityError, match="at least 1000"):
        check_parity(model_bytes, net, images[:10])


def test_checkpoint_of_other_architecture_is_rejected(tmp_path: Path) -> None:
    from export.onnx_export import CheckpointError

    path = tmp_path / "mlp.pt"
    torch.save(build_model("mlp").state_dict(), path)
    with pytest.raises(CheckpointError, match=r"conv2d_1\.weight"):
        load_network(path, "conv")
