"""The command line: help texts, the public API, and `predict`/`info` against a real server."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import numpy.typing as npt
from PIL import Image
from typer.testing import CliRunner

import mnist_service
from mnist_service.cli import app

from .conftest import ServerProcess

runner = CliRunner()
MnistSplit = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]


def test_public_api_is_small_and_sorted() -> None:
    assert mnist_service.__all__ == sorted(mnist_service.__all__)
    assert set(mnist_service.__all__) == {
        "ClientTls",
        "ItemFailure",
        "MnistClient",
        "ModelInfo",
        "Prediction",
        "__version__",
    }


def test_serve_help_documents_every_option() -> None:
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "200"})

    assert result.exit_code == 0
    for option in (
        "--model-architecture",
        "--model-weights",
        "--address",
        "--device",
        "--workers",
        "--grace-period",
        "--max-message-bytes",
        "--max-image-pixels",
        "--tls-cert",
        "--tls-key",
        "--tls-client-ca",
        "--log-level",
        "--log-format",
    ):
        assert option in result.output
    assert "[::1]:50051" in result.output


def test_python_dash_m_runs_the_cli() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "mnist_service", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    assert result.stdout.strip() == mnist_service.__version__


def digit_files(images: npt.NDArray[np.uint8], folder: Path) -> list[str]:
    """The images as PNG files in `folder`; their paths."""
    paths = []
    for i, pixels in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(pixels).save(path)
        paths.append(str(path))
    return paths


def test_predict_and_info_commands(
    server: ServerProcess, mnist_test_set: MnistSplit, tmp_path: Path
) -> None:
    images, labels = mnist_test_set
    paths = digit_files(images[:3], tmp_path)

    table = runner.invoke(app, ["predict", *paths, "--address", server.address])
    as_json = runner.invoke(app, ["predict", *paths, "--address", server.address, "--json"])
    info = runner.invoke(app, ["info", "--address", server.address])

    assert table.exit_code == 0, table.output
    assert f"label={labels[0]}" in table.output.splitlines()[0]
    assert as_json.exit_code == 0, as_json.output
    lines = [json.loads(line) for line in as_json.output.splitlines()]
    assert [line["label"] for line in lines] == list(labels[:3])
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["architecture"] == "conv"


def test_predict_batch_sends_one_call_and_reports_bad_items(
    server: ServerProcess, mnist_test_set: MnistSplit, tmp_path: Path
) -> None:
    images, labels = mnist_test_set
    paths = digit_files(images[:3], tmp_path)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    args = ["predict", "--batch", "--json", paths[0], str(bad), *paths[1:]]

    result = runner.invoke(app, [*args, "--address", server.address])

    assert result.exit_code == 1  # one image failed
    lines = [json.loads(line) for line in result.stdout.splitlines()]
    assert [line["label"] for line in lines] == list(labels[:3])
    assert [line["image"] for line in lines] == paths
    assert "bad.png: error:" in result.stderr


def test_predict_reports_bad_files_and_exits_non_zero(
    server: ServerProcess, tmp_path: Path
) -> None:
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")

    result = runner.invoke(app, ["predict", str(bad), "--address", server.address])

    assert result.exit_code == 1
    assert "bad.png: error:" in result.output


def test_predict_without_a_server_is_one_clear_line() -> None:
    result = runner.invoke(app, ["predict", __file__, "--address", "[::1]:1"])

    assert result.exit_code == 1
    assert "error" in result.output
