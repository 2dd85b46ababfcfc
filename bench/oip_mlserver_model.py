"""The ConvNet behind MLServer, for the HTTP rows of the benchmark.

`python -m bench.http_rows` writes a model-settings.json naming `OnnxMnist` and starts
`mlserver start` in a folder holding it, with the interpreter of MLServer's own virtualenv
(one process: parallel workers off). A small custom runtime running onnxruntime (one intra-op
thread) on the Open Inference Protocol's FP32 `image` input.
"""

from __future__ import annotations

import numpy as np
import onnxruntime as ort
from mlserver import MLModel
from mlserver.codecs import NumpyCodec
from mlserver.types import InferenceRequest, InferenceResponse


class OnnxMnist(MLModel):
    async def load(self) -> bool:
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(
            str(self.settings.parameters.uri), options, providers=["CPUExecutionProvider"]
        )
        return True

    async def predict(self, payload: InferenceRequest) -> InferenceResponse:
        images = NumpyCodec.decode_input(payload.inputs[0]).astype(np.float32, copy=False)
        (probabilities,) = self.session.run(["probabilities"], {"image": images})
        return InferenceResponse(
            model_name=self.name,
            id=payload.id,
            outputs=[NumpyCodec.encode_output("probabilities", probabilities)],
        )
