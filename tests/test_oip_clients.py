"""Triton's and KServe's own clients, unmodified, against a real server (issue 9).

tritonclient and kserve pin their own protobuf (and kserve a web stack), so each lives in a
virtualenv of its own under `~/.cache/mnist-service/venvs/` (override with
MNIST_CLIENT_VENVS), built on first use by pip from PyPI and reused while its requirement is
unchanged. The clients run as subprocess scripts (tests/oip_clients/) that record what the
client library returned; the assertions are here, against `Mnist/Predict` on the same images
(and offline onnxruntime for the MLP, which Predict does not serve here). Without PyPI, the
tests are skipped, saying why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import pytest

from mnist_service.client import MnistClient
from mnist_service.config import shipped_weights
from mnist_service.constants import INPUT_NAME, PROBABILITIES_NAME

from .conftest import MnistSplit, ServerProcess, png_bytes

CLIENTS = Path(__file__).resolve().parent / "oip_clients"
TRITONCLIENT = ("tritonclient[grpc]==2.73.0",)
KSERVE = ("kserve==0.21.0",)
IMAGES = 64
TOLERANCE = 1e-6
SCORE_TOLERANCE = TOLERANCE + 5e-7
"""Classification scores are printed with six decimals: half a unit of the last one more."""
INSTALL_TIMEOUT_S = 900
CLIENT_TIMEOUT_S = 300


def client_venv(name: str, requirements: tuple[str, ...]) -> Path:
    """The python of a virtualenv holding `requirements` (built once; skip if pip cannot)."""
    root = Path(os.environ.get("MNIST_CLIENT_VENVS", Path.home() / ".cache/mnist-service/venvs"))
    key = hashlib.sha256(f"{sys.version_info[:2]} {requirements}".encode()).hexdigest()[:12]
    venv = root / f"{name}-{key}"
    python = venv / "bin" / "python"
    if (venv / ".complete").exists():
        return python
    shutil.rmtree(venv, ignore_errors=True)
    venv.parent.mkdir(parents=True, exist_ok=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    try:
        install = subprocess.run(
            [str(python), "-m", "pip", "install", "--quiet", *requirements],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT_S,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.skip(f"pip could not install {' '.join(requirements)} within {INSTALL_TIMEOUT_S} s")
    if install.returncode != 0:
        last = (install.stderr.strip().splitlines() or ["(no output)"])[-1]
        pytest.skip(f"pip could not install {' '.join(requirements)} (no PyPI?): {last}")
    (venv / ".complete").touch()
    return python


@pytest.fixture(scope="module")
def oip_server() -> Iterator[ServerProcess]:
    """A real server with both models, one worker."""
    process = ServerProcess("--models", "conv,mlp", "--workers", "1")
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, mnist_test_set: MnistSplit) -> Path:
    """The first 64 MNIST test images, as pixels and as PNG files, for the client scripts."""
    images = mnist_test_set[0][:IMAGES]
    files = [png_bytes(image) for image in images]
    path = tmp_path_factory.mktemp("oip") / "inputs.npz"
    np.savez(
        path,
        images=images,
        file_lengths=np.array([len(f) for f in files]),
        file_blob=np.frombuffer(b"".join(files), dtype=np.uint8),
    )
    return path


@pytest.fixture(scope="module")
def predicted(oip_server: ServerProcess, mnist_test_set: MnistSplit) -> npt.NDArray[np.float32]:
    """`Mnist/Predict` on each of the images (PNG files), float32 [64, 10]."""

    async def predict_all() -> list[tuple[float, ...]]:
        async with MnistClient(oip_server.address, timeout=60) as client:
            return [
                (await client.predict(png_bytes(image))).probabilities
                for image in mnist_test_set[0][:IMAGES]
            ]

    return np.array(asyncio.run(predict_all()), dtype=np.float32)


def run_client(script: str, python: Path, address: str, inputs: Path) -> tuple[dict, Any]:
    """Run a client script; its facts (JSON) and results (an npz)."""
    output = inputs.parent / f"{script}.npz"
    done = subprocess.run(
        [str(python), str(CLIENTS / f"{script}.py"), address, str(inputs), str(output)],
        capture_output=True,
        text=True,
        timeout=CLIENT_TIMEOUT_S,
        check=False,
        cwd=inputs.parent,  # not the checkout: nothing of ours on its path
    )
    assert done.returncode == 0, done.stderr
    results = np.load(output)
    return json.loads(str(results["facts"])), results


def assert_like_predict(results: Any, key: str, expected: npt.NDArray[np.float32]) -> None:
    """Probabilities and labels equal Predict's within 1e-6 (or top-k classes, when asked)."""
    n = len(expected)
    probabilities = results[f"{key}/probabilities"]
    if probabilities.dtype.kind == "U":  # classification: "score:index", best first
        k = probabilities.shape[1]
        assert probabilities.shape == (n, k)
        kth_best = -np.sort(-expected, axis=1)[:, k - 1]
        for row, want, kth in zip(probabilities, expected, kth_best, strict=True):
            pairs = [item.split(":") for item in row]
            indices = [int(index) for _, index in pairs]
            scores = [float(score) for score, _ in pairs]
            assert len(set(indices)) == k
            assert scores == sorted(scores, reverse=True)
            np.testing.assert_allclose(scores, want[indices], rtol=0, atol=SCORE_TOLERANCE)
            assert min(want[indices]) >= kth - TOLERANCE  # these are the k best
    else:
        assert probabilities.dtype == np.float32
        np.testing.assert_allclose(probabilities, expected, rtol=0, atol=TOLERANCE)
    if f"{key}/label" in results:
        np.testing.assert_array_equal(results[f"{key}/label"], expected.argmax(axis=1))


def test_tritonclient_grpc_and_aio_match_predict(
    oip_server: ServerProcess, inputs: Path, predicted: npt.NDArray[np.float32]
) -> None:
    python = client_venv("tritonclient", TRITONCLIENT)
    facts, results = run_client("run_tritonclient", python, oip_server.address, inputs)

    sync = facts["grpc"]
    assert sync["is_server_live"] is True
    assert sync["is_server_ready"] is True
    assert sync["is_model_ready"] == {
        "mnist_convnet": True,
        "mnist_mlp": True,
        "mnist_convnet@1": True,
        "mnist_convnet@2": False,
        "resnet50": False,
    }
    assert sync["server_metadata"]["name"] == "mnist-service"
    assert sync["server_metadata"]["extensions"] == ["classification"]
    metadata = sync["model_metadata"]
    assert (metadata["name"], metadata["versions"], metadata["platform"]) == (
        "mnist_convnet",
        ["1"],
        "onnxruntime_onnx",
    )
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("image", "FP32", ["-1", "1", "28", "28"]),  # int64 is a string in protobuf's JSON
        ("pixels", "UINT8", ["-1", "28", "28"]),
        ("image_file", "BYTES", ["-1"]),
    ]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["outputs"]] == [
        ("probabilities", "FP32", ["-1", "10"]),
        ("label", "INT64", ["-1"]),
    ]
    assert sync["unknown_model_error"]["status"] == "StatusCode.NOT_FOUND"

    for datatype in ("FP32", "UINT8", "BYTES"):
        for n in (1, 7, 64):
            for count in (0, 3):
                key = f"infer/{datatype}/{n}/{count}"
                assert_like_predict(results, key, predicted[:n])
                assert str(results[f"{key}/id"]) == f"{datatype}/{n}/{count}"
    for key in sync["stream_ids"]:
        assert_like_predict(results, key, predicted[:7])
    assert sync["stream_errors"] == ["model 'mnist_convnet' has no version '9'; it has version 1"]

    aio = facts["aio"]
    assert (aio["is_server_live"], aio["is_server_ready"], aio["is_model_ready"]) == (True,) * 3
    assert aio["model_metadata"]["name"] == "mnist_mlp"
    assert_like_predict(results, "aio-infer/UINT8/64/3", predicted)
    for datatype in ("FP32", "UINT8", "BYTES"):
        assert_like_predict(results, f"aio-stream/{datatype}/7/0", predicted[:7])

    # The MLP, which Predict does not serve here: as offline onnxruntime gives it.
    session = ort.InferenceSession(str(shipped_weights("mlp")), providers=["CPUExecutionProvider"])
    images = np.load(inputs)["images"][:7].astype(np.float32)[:, np.newaxis] / np.float32(255)
    (offline,) = session.run([PROBABILITIES_NAME], {INPUT_NAME: images})
    assert_like_predict(results, "infer-mlp/FP32/7/0", offline)


def test_kserve_grpc_client_matches_predict(
    oip_server: ServerProcess, inputs: Path, predicted: npt.NDArray[np.float32]
) -> None:
    python = client_venv("kserve", KSERVE)
    facts, results = run_client("run_kserve", python, oip_server.address, inputs)

    assert facts == {"is_server_live": True, "is_server_ready": True, "is_model_ready": True}
    for datatype in ("FP32", "UINT8"):
        for encoding in ("contents", "raw"):  # typed contents, then raw_input_contents
            key = f"kserve/{datatype}/7/{encoding}"
            assert_like_predict(results, key, predicted[:7])
            assert str(results[f"{key}/id"]) == key
