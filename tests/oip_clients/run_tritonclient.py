"""Drive a server with unmodified tritonclient (grpc and grpc.aio), in its own virtualenv.

    python run_tritonclient.py ADDRESS INPUTS.npz RESULTS.npz

Run by tests/test_oip_clients.py with the interpreter of a virtualenv that holds only
`tritonclient[grpc]` (it pins its own protobuf). It asserts nothing about the numbers: it
records what the client returned, and the test compares that with Predict's answers. Any
exception tritonclient raises ends it with a traceback and a non-zero exit.
"""

from __future__ import annotations

import asyncio
import json
import queue
import sys
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import tritonclient.grpc as grpcclient
import tritonclient.grpc.aio as aioclient
from tritonclient.utils import InferenceServerException

CONV = "mnist_convnet"
MLP = "mnist_mlp"
BATCH_SIZES = (1, 7, 64)
CLASS_COUNTS = (0, 3)
DATATYPES = ("FP32", "UINT8", "BYTES")
STREAM_TIMEOUT_S = 60


def make_input(datatype: str, images: np.ndarray, files: list[bytes], n: int) -> Any:
    """One of the three inputs ModelMetadata declares, holding the first n images."""
    if datatype == "FP32":
        data = (images[:n].astype(np.float32) / np.float32(255)).reshape(n, 1, 28, 28)
        name = "image"
    elif datatype == "UINT8":
        data, name = images[:n], "pixels"
    else:
        data, name = np.array(files[:n], dtype=np.object_), "image_file"
    tensor = grpcclient.InferInput(name, list(data.shape), datatype)
    tensor.set_data_from_numpy(data)
    return tensor


def record(results: dict[str, Any], key: str, result: Any) -> None:
    for name in ("probabilities", "label"):
        value = result.as_numpy(name)
        if value is not None:
            results[f"{key}/{name}"] = value.astype(str) if value.dtype == np.object_ else value
    results[f"{key}/id"] = np.array(result.get_response().id)


def run_sync(address: str, images: np.ndarray, files: list[bytes], results: dict[str, Any]) -> dict:
    client = grpcclient.InferenceServerClient(address)
    facts: dict[str, Any] = {
        "is_server_live": client.is_server_live(),
        "is_server_ready": client.is_server_ready(),
        "is_model_ready": {
            CONV: client.is_model_ready(CONV),
            MLP: client.is_model_ready(MLP),
            f"{CONV}@1": client.is_model_ready(CONV, "1"),
            f"{CONV}@2": client.is_model_ready(CONV, "2"),
            "resnet50": client.is_model_ready("resnet50"),
        },
        "server_metadata": client.get_server_metadata(as_json=True),
        "model_metadata": client.get_model_metadata(CONV, as_json=True),
    }
    for datatype in DATATYPES:
        for n in BATCH_SIZES:
            for count in CLASS_COUNTS:
                outputs = None
                if count:
                    outputs = [
                        grpcclient.InferRequestedOutput("probabilities", class_count=count),
                        grpcclient.InferRequestedOutput("label"),
                    ]
                key = f"{datatype}/{n}/{count}"
                result = client.infer(
                    CONV,
                    [make_input(datatype, images, files, n)],
                    outputs=outputs,
                    request_id=key,
                )
                record(results, f"infer/{key}", result)
    result = client.infer(MLP, [make_input("FP32", images, files, 7)], model_version="1")
    record(results, "infer-mlp/FP32/7/0", result)
    try:
        client.infer("resnet50", [make_input("FP32", images, files, 1)])
    except InferenceServerException as exc:
        facts["unknown_model_error"] = {"status": exc.status(), "message": exc.message()}

    answers: queue.Queue[tuple[Any, Any]] = queue.Queue()
    client.start_stream(callback=lambda result, error: answers.put((result, error)))
    sent = [f"stream/{datatype}/7/0" for datatype in DATATYPES]
    for key, datatype in zip(sent, DATATYPES, strict=True):
        client.async_stream_infer(CONV, [make_input(datatype, images, files, 7)], request_id=key)
    client.async_stream_infer(CONV, [make_input("FP32", images, files, 1)], model_version="9")
    stream_errors = []
    for _ in range(len(sent) + 1):
        result, error = answers.get(timeout=STREAM_TIMEOUT_S)
        if error is not None:
            stream_errors.append(error.message())
        else:
            record(results, result.get_response().id, result)
    client.stop_stream()
    client.close()
    facts["stream_errors"] = stream_errors
    facts["stream_ids"] = sent
    return facts


async def run_aio(address: str, images: np.ndarray, files: list[bytes], results: dict) -> dict:
    async with aioclient.InferenceServerClient(address) as client:
        facts = {
            "is_server_live": await client.is_server_live(),
            "is_server_ready": await client.is_server_ready(),
            "is_model_ready": await client.is_model_ready(MLP),
            "model_metadata": await client.get_model_metadata(MLP, as_json=True),
        }
        result = await client.infer(
            CONV,
            [make_input("UINT8", images, files, 64)],
            outputs=[aioclient.InferRequestedOutput("probabilities", class_count=3)],
        )
        record(results, "aio-infer/UINT8/64/3", result)

        async def requests() -> AsyncIterator[dict[str, Any]]:
            for datatype in DATATYPES:
                yield {
                    "model_name": CONV,
                    "inputs": [make_input(datatype, images, files, 7)],
                    "request_id": f"aio-stream/{datatype}/7/0",
                }

        async for result, error in client.stream_infer(requests()):
            if error is not None:
                raise error
            record(results, result.get_response().id, result)
    return facts


def main(address: str, inputs: str, output: str) -> None:
    data = np.load(inputs)
    images = data["images"]
    ends = np.cumsum(data["file_lengths"])
    blob = data["file_blob"].tobytes()
    files = [
        blob[end - length : end] for end, length in zip(ends, data["file_lengths"], strict=True)
    ]
    results: dict[str, Any] = {}
    facts = {
        "grpc": run_sync(address, images, files, results),
        "aio": asyncio.run(run_aio(address, images, files, results)),
    }
    results["facts"] = np.array(json.dumps(facts))
    np.savez(output, **results)


if __name__ == "__main__":
    main(*sys.argv[1:])
