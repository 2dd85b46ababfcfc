"""Drive a server with unmodified kserve.InferenceGRPCClient, in its own virtualenv.

    python run_kserve.py ADDRESS INPUTS.npz RESULTS.npz

Run by tests/test_oip_clients.py with the interpreter of a virtualenv that holds only
`kserve`. Like run_tritonclient.py it records what the client returned for the test to
compare with Predict. kserve sends typed `contents` when asked (`binary_data=False`) and
`raw_input_contents` otherwise, so both encodings are driven.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceGRPCClient, InferInput, InferRequest

CONV = "mnist_convnet"


def make_input(datatype: str, images: np.ndarray, n: int, *, binary: bool) -> InferInput:
    """FP32 or UINT8 input holding the first n images."""
    if datatype == "FP32":
        data = (images[:n].astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28)
        name = "image"
    else:
        data, name = images[:n], "pixels"
    tensor = InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data, binary_data=binary)
    return tensor


async def run(address: str, images: np.ndarray, results: dict[str, Any]) -> dict[str, Any]:
    client = InferenceGRPCClient(address, timeout=60)
    try:
        facts = {
            "is_server_live": await client.is_server_live(),
            "is_server_ready": await client.is_server_ready(),
            "is_model_ready": await client.is_model_ready(CONV),
        }
        for datatype in ("FP32", "UINT8"):
            for binary in (False, True):
                key = f"kserve/{datatype}/7/{'raw' if binary else 'contents'}"
                request = InferRequest(
                    CONV, [make_input(datatype, images, 7, binary=binary)], request_id=key
                )
                response = await client.infer(request)
                outputs = {output.name: output.as_numpy() for output in response.outputs}
                results[f"{key}/probabilities"] = outputs["probabilities"]
                results[f"{key}/label"] = outputs["label"]
                results[f"{key}/id"] = np.array(response.id)
    finally:
        await client.close()
    return facts


def main(address: str, inputs: str, output: str) -> None:
    images = np.load(inputs)["images"]
    results: dict[str, Any] = {}
    facts = asyncio.run(run(address, images, results))
    results["facts"] = np.array(json.dumps(facts))
    np.savez(output, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
