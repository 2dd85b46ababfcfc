"""Models, augmentation and a short real training run through the ``python -m training`` CLI."""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnx
import pytest
import torch
from typer.testing import CliRunner

from export.__main__ import app as export_app
from export.onnx_export import ParityError, check_parity, load_network, to_onnx
from mnist_service.constants import (
    META_ARCHITECTURE,
    META_SOURCE_SHA256,
    META_TEST_ACCURACY,
    WEIGHT_FILES,
)
from mnist_service.engine.preprocess import model_batch
from training import train as train_module
from training.__main__ import app
from training.augment import (
    NO_AUGMENTATION,
    AugmentConfig,
    augment,
    elastic_field,
    random_affine,
    random_faintness,
)
from training.data import load_mnist
from training.models import MLP, ConvNet, build_model
from training.train import TrainConfig, to_tensors, train, usable_cores

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
    images = torch.from_numpy(model_batch(mnist_test_set[0][:256]))
    first = augment(images.clone(), AugmentConfig(), torch.Generator().manual_seed(1))
    again = augment(images.clone(), AugmentConfig(), torch.Generator().manual_seed(1))
    assert first.shape == images.shape
    assert float(first.min()) >= 0.0
    assert float(first.max()) <= 1.0
    torch.testing.assert_close(first, again)  # seeded: reproducible
    changed = (first - images).abs().flatten(1).amax(dim=1) > 0.1
    untouched = (first == images).flatten(1).all(dim=1)
    # A quarter are left as MNIST has them; practically every other one is perturbed.
    assert 0.15 < float(untouched.float().mean()) < 0.35
    assert float((changed | untouched).float().mean()) > 0.97
    # Light: the ink mass stays of the same order (no digit erased or flooded); thin digits
    # such as ones may triple their ink when dilated.
    ratio = first.flatten(1).sum(1) / images.flatten(1).sum(1)
    assert float(ratio.min()) > 0.3
    assert float(ratio.max()) < 4.0
    torch.testing.assert_close(
        augment(images.clone(), NO_AUGMENTATION, torch.Generator().manual_seed(1)), images
    )


def test_elastic_field_is_small_and_smooth() -> None:
    pixel = 2.0 / 28
    field = elastic_field(64, 1.2 * pixel, torch.Generator().manual_seed(0))
    assert field.shape == (64, 28, 28, 2)
    assert float(field.abs().max()) <= 1.2 * pixel + 1e-6
    assert float(field.abs().max()) > 0.5 * pixel
    # Neighbouring pixels move almost together (a distortion, not noise, whose steps would
    # reach twice the amplitude, 2.4 px).
    step = (field[:, 1:] - field[:, :-1]).abs().max()
    assert float(step) < 0.5 * pixel


def test_shear_slants_a_vertical_bar() -> None:
    bar = torch.zeros(1, 1, 28, 28)
    bar[..., 4:24, 13:15] = 1.0
    only_shear = replace(NO_AUGMENTATION, max_shear=0.3)
    slanted = random_affine(bar, only_shear, torch.Generator().manual_seed(3))
    top, bottom = slanted[0, 0, 6].argmax(), slanted[0, 0, 21].argmax()
    assert int(top) != int(bottom)  # the bar leans
    assert abs(float(slanted.sum() - bar.sum())) < 0.05 * float(bar.sum())


def test_faintness_dims_only_some_images(mnist_test_set: MnistSplit) -> None:
    images = torch.from_numpy(model_batch(mnist_test_set[0][:200]))
    dimmed = random_faintness(images, 0.5, torch.Generator().manual_seed(0))
    peak = dimmed.flatten(1).amax(dim=1)
    assert 0.2 < float((peak < 0.999).float().mean()) < 0.8
    assert float(peak.min()) >= 0.69


def test_usable_cores_without_sched_getaffinity(monkeypatch: pytest.MonkeyPatch) -> None:
    """macOS and Windows have no os.sched_getaffinity: fall back to the CPU count."""
    monkeypatch.delattr(os, "sched_getaffinity", raising=False)
    assert usable_cores() == (os.cpu_count() or 1)


@pytest.mark.slow
def test_training_cli_dry_run_saves_checkpoints_that_export_makes_onnx_of(
    tmp_path: Path, mnist_dir: Path
) -> None:
    """One short epoch per architecture on real data -> checkpoint (python -m training) -> ONNX
    with parity check (python -m export onnx), the two steps of `nox -s train`."""
    result = CliRunner().invoke(
        app,
        [
            "--arch=all",
            "--dry-run",
            "--no-progress",
            f"--checkpoint-dir={tmp_path / 'checkpoints'}",
            f"--data-dir={mnist_dir}",
        ],
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("to ONNX: python -m export onnx") == 2
    for arch, file_name in WEIGHT_FILES.items():
        checkpoint = tmp_path / "checkpoints" / f"mnist_{arch}.pt"
        state = torch.load(checkpoint, weights_only=True)
        assert {k: tuple(v.shape) for k, v in state.items()} == EXPECTED_PARAMETERS[arch]
        exported = CliRunner().invoke(
            export_app,
            ["onnx", str(checkpoint), f"--arch={arch}", f"--data-dir={mnist_dir}",
             f"--output={tmp_path / 'weights' / file_name}"],
        )  # fmt: skip
        assert exported.exit_code == 0, exported.output
        assert "parity max abs diff" in exported.output
        model = onnx.load(str(tmp_path / "weights" / file_name))
        onnx.checker.check_model(model, full_check=True)
        metadata = {p.key: p.value for p in model.metadata_props}
        assert metadata[META_ARCHITECTURE] == arch
        # Even one epoch on 2,048 images learns something real.
        assert float(metadata[META_TEST_ACCURACY]) > 0.5
        assert len(metadata[META_SOURCE_SHA256]) == 64


def test_holdout_trains_without_the_last_digits(
    monkeypatch: pytest.MonkeyPatch, mnist_dir: Path
) -> None:
    seen: list[npt.NDArray[np.uint8]] = []

    def recording(
        images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        seen.append(images)
        return to_tensors(images, labels)

    monkeypatch.setattr(train_module, "to_tensors", recording)
    config = TrainConfig(
        epochs=1, batch_size=256, lr=1e-3, weight_decay=0.0, augment=NO_AUGMENTATION
    )
    train("mlp", replace(config, train_holdout=59_000), mnist_dir, show_progress=False)
    everything = load_mnist("train", mnist_dir)[0]
    # The first conversion is the training digits' (the second, the test set's).
    np.testing.assert_array_equal(seen[0], everything[:1000])
    with pytest.raises(ValueError, match="cannot hold out 60000 of 60000 training digits"):
        train("mlp", replace(config, train_holdout=60_000), mnist_dir, show_progress=False)


def test_a_holdout_run_does_not_write_the_shipped_weights() -> None:
    result = CliRunner().invoke(app, ["--holdout", "10000"], env={"COLUMNS": "200"})
    assert result.exit_code != 0
    assert "does not make shipped weights" in result.output


def test_parity_check_fails_loudly_on_mismatch(tmp_path: Path, mnist_test_set: MnistSplit) -> None:
    net = MLP().eval()
    model_bytes = to_onnx(net).SerializeToString()
    images = model_batch(mnist_test_set[0][:1000])
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
