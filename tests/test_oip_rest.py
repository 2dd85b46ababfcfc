"""The Open Inference Protocol's REST API (KServe v2) through a real server: urllib for the
protocol's JSON and binary forms and its errors, then unmodified tritonclient.http and
kserve.InferenceRESTClient, each in its own virtualenv (as tests/test_oip_clients.py runs the
gRPC clients). Answers are compared with `Mnist/Predict` on the same images."""

from __future__ import annotations

import asyncio
import base64
import json
import struct
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest

from mnist_service.client import MnistClient

from .conftest import MnistSplit, ServerProcess, png_bytes
from .http_client import base_url, http_port, post_json, request
from .test_oip_clients import (
    IMAGES,
    KSERVE,
    assert_like_predict,
    client_venv,
    run_client,
)

TRITONCLIENT_HTTP = ("tritonclient[http]==2.73.0",)
INFER = "/v2/models/mnist_convnet/infer"


@pytest.fixture(scope="module")
def oip_server() -> Iterator[ServerProcess]:
    # IPv4 loopback: tritonclient.http takes HOST:PORT, and resolves localhost to it.
    process = ServerProcess(
        "--models", "conv,mlp", "--workers", "1", "--http-address", "127.0.0.1:0"
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def images(mnist_test_set: MnistSplit) -> npt.NDArray[np.uint8]:
    return mnist_test_set[0][:IMAGES]


@pytest.fixture(scope="module")
def predicted(oip_server: ServerProcess, images: npt.NDArray[np.uint8]) -> npt.NDArray[np.float32]:
    """`Mnist/Predict` on each image's PNG file, float32 [64, 10]."""

    async def predict_all() -> list[tuple[float, ...]]:
        async with MnistClient(oip_server.address, timeout=60) as client:
            return [(await client.predict(png_bytes(image))).probabilities for image in images]

    return np.array(asyncio.run(predict_all()), dtype=np.float32)


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory, images: npt.NDArray[np.uint8]) -> Path:
    files = [png_bytes(image) for image in images]
    path = tmp_path_factory.mktemp("oip-rest") / "inputs.npz"
    np.savez(
        path,
        images=images,
        file_lengths=np.array([len(f) for f in files]),
        file_blob=np.frombuffer(b"".join(files), dtype=np.uint8),
    )
    return path


def infer_json(server: ServerProcess, document: object) -> dict:
    answer = post_json(base_url(server) + INFER, document)
    assert answer.status == 200, answer.body
    result: dict = answer.json()
    return result


def probabilities_of(result: dict) -> npt.NDArray[np.float32]:
    (out,) = [o for o in result["outputs"] if o["name"] == "probabilities"]
    return np.array(out["data"], dtype=np.float32).reshape(out["shape"])


def test_json_tensors_equal_predict_bit_for_bit(
    oip_server: ServerProcess, images: npt.NDArray[np.uint8], predicted: npt.NDArray[np.float32]
) -> None:
    n = 7
    pixels = infer_json(
        oip_server,
        {"id": "px", "inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [n, 28, 28],
                                 "data": images[:n].tolist()}]},
    )  # fmt: skip
    assert pixels["id"] == "px"
    assert (pixels["model_name"], pixels["model_version"]) == ("mnist_convnet", "1")
    # Raw pixels and their PNG files take the same preprocessing: the same float32 values.
    np.testing.assert_array_equal(probabilities_of(pixels), predicted[:n])
    labels = next(o for o in pixels["outputs"] if o["name"] == "label")
    assert labels["datatype"] == "INT64"
    assert labels["data"] == predicted[:n].argmax(axis=1).tolist()

    floats = (images[:n].astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28)
    fp32 = infer_json(
        oip_server,
        {"inputs": [{"name": "image", "datatype": "FP32", "shape": [n, 1, 28, 28],
                     "data": floats.ravel().tolist()}]},
    )  # fmt: skip
    np.testing.assert_allclose(probabilities_of(fp32), predicted[:n], rtol=0, atol=1e-6)


def test_binary_tensor_data_in_and_out(
    oip_server: ServerProcess, images: npt.NDArray[np.uint8], predicted: npt.NDArray[np.float32]
) -> None:
    files = [png_bytes(image) for image in images[:5]]
    raw = b"".join(struct.pack("<I", len(f)) + f for f in files)
    head = json.dumps(
        {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [5],
                     "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                     {"name": "probabilities", "parameters": {"classification": 2}}]}
    ).encode()  # fmt: skip

    answer = request(
        base_url(oip_server) + INFER,
        head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )

    assert answer.status == 400  # the same output twice
    assert answer.json() == {"error": "output 'probabilities' is requested twice"}

    head = json.dumps(
        {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [5],
                     "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}},
                     {"name": "label"}]}
    ).encode()  # fmt: skip
    answer = request(
        base_url(oip_server) + INFER,
        head + raw,
        headers={"Inference-Header-Content-Length": str(len(head))},
    )
    assert answer.status == 200, answer.body
    length = int(answer.headers["inference-header-content-length"])
    document = json.loads(answer.body[:length])
    probabilities, label = document["outputs"]
    assert probabilities["parameters"]["binary_data_size"] == 5 * 10 * 4
    values = np.frombuffer(answer.body[length:], dtype="<f4").reshape(5, 10)
    np.testing.assert_array_equal(values, predicted[:5])
    assert label["data"] == predicted[:5].argmax(axis=1).tolist()


@pytest.mark.parametrize(
    ("path", "document", "status", "fragment"),
    [
        ("/v2/models/resnet50/infer", {"inputs": []}, 404, "unknown model 'resnet50'"),
        ("/v2/models/mnist_convnet/versions/2/infer", {"inputs": []}, 404, "no version '2'"),
        (INFER, {"inputs": []}, 400, "takes exactly one input"),
        (INFER, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 28, 28],
                             "data": [0.0] * 784}]}, 400, "has shape [-1,1,28,28], got [1,28,28]"),
        (INFER, {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28],
                             "data": [300] * 784}]}, 400, "must be 0-255"),
        (INFER, {"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],
                             "data": [2.0] * 784}]}, 400, "takes values in [0, 1]"),
        (INFER, {"inputs": [{"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28],
                             "data": [1] * 783}]}, 400, "needs 784 values"),
        (INFER, [1, 2], 400, "must be a JSON object"),
    ],
    ids=["unknown-model", "unknown-version", "no-input", "wrong-shape", "uint8-range",
         "fp32-range", "value-count", "not-an-object"],
)  # fmt: skip
def test_errors_are_the_protocols_json(
    oip_server: ServerProcess, path: str, document: object, status: int, fragment: str
) -> None:
    answer = post_json(base_url(oip_server) + path, document)

    assert answer.status == status
    error = answer.json()["error"]
    assert isinstance(error, str)
    assert fragment in error


def test_health_and_metadata(oip_server: ServerProcess) -> None:
    url = base_url(oip_server)
    assert request(url + "/v2/health/live").json() == {"live": True}
    assert request(url + "/v2/health/ready").json() == {"ready": True}
    assert request(url + "/v2/models/mnist_mlp/ready").status == 200
    assert request(url + "/v2/models/nope/ready").status == 404
    metadata = request(url + "/v2").json()
    assert metadata["name"] == "mnist-service"
    assert "binary_tensor_data" in metadata["extensions"]


def test_tritonclient_http_matches_predict(
    oip_server: ServerProcess, inputs: Path, predicted: npt.NDArray[np.float32]
) -> None:
    python = client_venv("tritonclient-http", TRITONCLIENT_HTTP)
    facts, results = run_client(
        "run_tritonclient_http", python, f"127.0.0.1:{http_port(oip_server)}", inputs
    )

    assert facts["is_server_live"] is True
    assert facts["is_server_ready"] is True
    assert facts["is_model_ready"] == {
        "mnist_convnet": True,
        "mnist_mlp": True,
        "mnist_convnet@1": True,
        "mnist_convnet@2": False,
        "resnet50": False,
    }
    assert facts["server_metadata"]["name"] == "mnist-service"
    metadata = facts["model_metadata"]
    assert [(t["name"], t["datatype"], t["shape"]) for t in metadata["inputs"]] == [
        ("image", "FP32", [-1, 1, 28, 28]),
        ("pixels", "UINT8", [-1, 28, 28]),
        ("image_file", "BYTES", [-1]),
    ]
    assert facts["unknown_model_error"]["status"] == "404"
    assert "unknown model 'resnet50'" in facts["unknown_model_error"]["message"]
    assert facts["bad_shape_error"]["status"] == "400"
    for datatype, forms in (("FP32", ("binary", "json")), ("UINT8", ("binary", "json")),
                            ("BYTES", ("binary",))):  # fmt: skip
        for form in forms:
            for n in (1, 7, 64):
                for count in (0, 3):
                    key = f"infer/{datatype}/{n}/{count}/{form}"
                    assert_like_predict(results, key, predicted[:n])
                    assert str(results[f"{key}/id"]) == key
    assert results["infer-mlp/FP32/7/0/binary/probabilities"].shape == (7, 10)


def test_kserve_rest_client_matches_predict(
    oip_server: ServerProcess, inputs: Path, predicted: npt.NDArray[np.float32]
) -> None:
    python = client_venv("kserve", KSERVE)
    facts, results = run_client("run_kserve_rest", python, base_url(oip_server), inputs)

    assert facts == {"is_server_live": True, "is_server_ready": True, "is_model_ready": True}
    for datatype in ("FP32", "UINT8"):
        for form in ("json", "binary"):
            key = f"kserve-rest/{datatype}/7/{form}"
            assert_like_predict(results, key, predicted[:7])
            assert str(results[f"{key}/id"]) == key


def test_a_bytes_item_in_json_is_a_string_not_a_file(oip_server: ServerProcess) -> None:
    """A BYTES item in JSON is a UTF-8 string, so image files need binary data: a base64
    string is not a file, and says so."""
    document = {"inputs": [{"name": "image_file", "datatype": "BYTES", "shape": [1],
                            "data": [base64.b64encode(b"png").decode()]}]}  # fmt: skip
    answer = post_json(base_url(oip_server) + INFER, document)
    assert answer.status == 400
    assert "not a readable" in answer.json()["error"]
