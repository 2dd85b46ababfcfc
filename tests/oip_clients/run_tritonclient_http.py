"""Drive a server's Open Inference Protocol REST API with unmodified tritonclient.http.

    python run_tritonclient_http.py URL INPUTS.npz RESULTS.npz

Run by tests/test_oip_rest.py with the interpreter of a virtualenv that holds only
`tritonclient[http]`. Like run_tritonclient.py it records what the client returned (JSON and
binary tensors, classification) for the test to compare with Predict.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import numpy as np
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

CONV = "mnist_convnet"
MLP = "mnist_mlp"


def make_input(datatype: str, images: np.ndarray, files: list[bytes], n: int, binary: bool) -> Any:
    if datatype == "FP32":
        data = (images[:n].astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28)
        name = "image"
    elif datatype == "UINT8":
        data, name = images[:n], "pixels"
    else:
        data, name = np.array(files[:n], dtype=np.object_), "image_file"
    tensor = httpclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


def main(url: str, inputs: str, output: str) -> None:
    loaded = np.load(inputs)
    images = loaded["images"]
    blob = loaded["file_blob"].tobytes()
    ends = np.cumsum(loaded["file_lengths"])
    files = [blob[start:end] for start, end in zip(np.r_[0, ends[:-1]], ends, strict=True)]
    client = httpclient.InferenceServerClient(url)
    results: dict[str, Any] = {}
    facts: dict[str, Any] = {
        "is_server_live": client.is_server_live(),
        "is_server_ready": client.is_server_ready(),
        "is_model_ready": {
            "mnist_convnet": client.is_model_ready(CONV),
            "mnist_mlp": client.is_model_ready(MLP),
            "mnist_convnet@1": client.is_model_ready(CONV, "1"),
            "mnist_convnet@2": client.is_model_ready(CONV, "2"),
            "resnet50": client.is_model_ready("resnet50"),
        },
        "server_metadata": client.get_server_metadata(),
        "model_metadata": client.get_model_metadata(CONV),
    }
    for datatype in ("FP32", "UINT8", "BYTES"):
        for binary in (True, False):
            if datatype == "BYTES" and not binary:
                continue  # files are not UTF-8 strings: BYTES images go as binary data
            for n in (1, 7, 64):
                for count in (0, 3):
                    key = f"infer/{datatype}/{n}/{count}/{'binary' if binary else 'json'}"
                    outputs = [
                        httpclient.InferRequestedOutput(
                            "probabilities", binary_data=binary, class_count=count
                        ),
                        httpclient.InferRequestedOutput("label", binary_data=binary),
                    ]
                    result = client.infer(
                        CONV,
                        [make_input(datatype, images, files, n, binary)],
                        outputs=outputs,
                        request_id=key,
                    )
                    for name in ("probabilities", "label"):
                        value = result.as_numpy(name)
                        if value.dtype == np.object_:
                            value = np.char.decode(value.astype(np.bytes_))
                        results[f"{key}/{name}"] = value
                    results[f"{key}/id"] = np.array(result.get_response()["id"])
    mlp = client.infer(MLP, [make_input("FP32", images, files, 7, True)])
    results["infer-mlp/FP32/7/0/binary/probabilities"] = mlp.as_numpy("probabilities")
    try:
        client.infer("resnet50", [make_input("FP32", images, files, 1, True)])
    except InferenceServerException as exc:
        facts["unknown_model_error"] = {"status": exc.status(), "message": exc.message()}
    try:
        bad = httpclient.InferInput("image", [1, 28, 28], "FP32")
        bad.set_data_from_numpy(np.zeros((1, 28, 28), np.float32))
        client.infer(CONV, [bad])
    except InferenceServerException as exc:
        facts["bad_shape_error"] = {"status": exc.status(), "message": exc.message()}
    client.close()
    np.savez(output, facts=np.array(json.dumps(facts)), **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
