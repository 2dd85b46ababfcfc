"""The ConvNet behind KServe's Python model server, for the HTTP rows of the benchmark.

    bench/.venvs/kserve/bin/python bench/oip_kserve_model.py WEIGHTS HTTP_PORT GRPC_PORT

A small custom `kserve.Model` running onnxruntime (one intra-op thread) on the Open Inference
Protocol's FP32 `image` input, served by `kserve.ModelServer` with one worker. Run with the
interpreter of its own virtualenv (`python -m bench.http_rows` builds it); it imports nothing
of this repository.
"""

from __future__ import annotations

import sys

import kserve
import numpy as np
import onnxruntime as ort
from kserve import InferOutput, InferRequest, InferResponse


class Mnist(kserve.Model):
    def __init__(self, name: str, weights: str) -> None:
        super().__init__(name)
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(weights, options, providers=["CPUExecutionProvider"])
        self.ready = True

    async def predict(self, payload: InferRequest, headers=None, response_headers=None):  # type: ignore[no-untyped-def]
        images = payload.inputs[0].as_numpy().astype(np.float32, copy=False)
        (probabilities,) = self.session.run(["probabilities"], {"image": images})
        output = InferOutput("probabilities", list(probabilities.shape), "FP32")
        output.set_data_from_numpy(probabilities, binary_data=False)
        return InferResponse(
            model_name=self.name, infer_outputs=[output], response_id=payload.id or ""
        )


if __name__ == "__main__":
    weights, http_port, grpc_port = sys.argv[1:4]
    server = kserve.ModelServer(http_port=int(http_port), grpc_port=int(grpc_port), workers=1)
    server.start([Mnist("mnist_convnet", weights)])
