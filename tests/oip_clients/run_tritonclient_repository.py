"""Drive a server's model repository with unmodified tritonclient.grpc, in its own virtualenv.

    python run_tritonclient_repository.py ADDRESS IMAGES.npy RESULTS.json

Run by tests/test_model_repository.py with the interpreter of the tritonclient virtualenv.
It records what the client returned (index, readiness, metadata, the version that answered,
the errors raised); the test asserts on it.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
from tritonclient.utils import InferenceServerException

CONV = "mnist_convnet"


def infer(client: grpcclient.InferenceServerClient, images: np.ndarray) -> dict[str, Any]:
    tensor = grpcclient.InferInput("image", list(images.shape), "FP32")
    tensor.set_data_from_numpy(images)
    result = client.infer(CONV, [tensor])
    return {
        "version": result.get_response().model_version,
        "probabilities": result.as_numpy("probabilities").tolist(),
    }


def refusal(call: Any) -> dict[str, str] | None:
    try:
        call()
    except InferenceServerException as exc:
        return {"status": str(exc.status()), "message": str(exc.message())}
    return None


def main(address: str, images_path: str, output: str) -> None:
    images = np.load(images_path)
    client = grpcclient.InferenceServerClient(address)
    facts: dict[str, Any] = {"index_before": client.get_model_repository_index(as_json=True)}
    facts["first"] = infer(client, images)
    client.load_model(CONV, config=json.dumps({"version_policy": {"specific": {"versions": [2]}}}))
    facts["ready_2"] = client.is_model_ready(CONV, "2")
    facts["ready_1"] = client.is_model_ready(CONV, "1")
    facts["metadata_versions"] = list(client.get_model_metadata(CONV, as_json=True)["versions"])
    facts["after_load"] = infer(client, images)
    facts["index_after_load"] = client.get_model_repository_index(as_json=True)
    facts["missing_version"] = refusal(
        lambda: client.load_model(
            CONV, config=json.dumps({"version_policy": {"specific": {"versions": [7]}}})
        )
    )
    facts["still_serving"] = infer(client, images)["version"]
    client.unload_model(CONV)
    facts["ready_after_unload"] = client.is_model_ready(CONV)
    facts["infer_after_unload"] = refusal(lambda: infer(client, images))
    facts["index_after_unload"] = client.get_model_repository_index(as_json=True)
    client.load_model(CONV)
    facts["after_reload"] = infer(client, images)["version"]
    Path(output).write_text(json.dumps(facts))


if __name__ == "__main__":
    main(*sys.argv[1:4])
