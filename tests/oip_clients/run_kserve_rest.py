"""Drive a server's Open Inference Protocol REST API with unmodified kserve.InferenceRESTClient.

    python run_kserve_rest.py URL INPUTS.npz RESULTS.npz

Run by tests/test_oip_rest.py with the interpreter of the virtualenv that holds `kserve`.
"""

from __future__ import annotations

import asyncio
import json
import sys
from typing import Any

import numpy as np
from kserve import InferenceRESTClient, InferInput, InferRequest, RESTConfig

CONV = "mnist_convnet"


async def run(url: str, images: np.ndarray, results: dict[str, Any]) -> dict[str, Any]:
    client = InferenceRESTClient(RESTConfig(protocol="v2", timeout=60))
    try:
        facts = {
            "is_server_live": await client.is_server_live(url),
            "is_server_ready": await client.is_server_ready(url),
            "is_model_ready": await client.is_model_ready(url, CONV),
        }
        for datatype in ("FP32", "UINT8"):
            for binary in (False, True):
                n = 7
                if datatype == "FP32":
                    data = (images[:n].astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28)
                    name = "image"
                else:
                    data, name = images[:n], "pixels"
                tensor = InferInput(name, list(data.shape), datatype)
                tensor.set_data_from_numpy(data, binary_data=binary)
                key = f"kserve-rest/{datatype}/{n}/{'binary' if binary else 'json'}"
                response = await client.infer(
                    url, InferRequest(model_name=CONV, infer_inputs=[tensor], request_id=key),
                    model_name=CONV,
                )  # fmt: skip
                for output in response.outputs:
                    results[f"{key}/{output.name}"] = output.as_numpy()
                results[f"{key}/id"] = np.array(response.id)
        return facts
    finally:
        await client.close()


def main(url: str, inputs: str, output: str) -> None:
    images = np.load(inputs)["images"]
    results: dict[str, Any] = {}
    facts = asyncio.run(run(url, images, results))
    np.savez(output, facts=np.array(json.dumps(facts)), **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
