"""Baseline: the grpcio thread-pool server a developer would write first, Predict only.

    python -m bench.baseline_threadpool --model weights/mnist_convnet.onnx [--port 0]

One onnxruntime session shared by the pool's threads, one inference per call, no batching.
Prints `{"message": "serving", "port": N}` on stdout once it listens.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import grpc
import onnxruntime as ort
import typer

from . import stubs
from .baseline_model import load_session, predict

mnist_pb2, mnist_pb2_grpc = stubs.load()


class Mnist(mnist_pb2_grpc.MnistServicer):  # type: ignore[misc, name-defined]
    def __init__(self, session: ort.InferenceSession) -> None:
        self.session = session

    def Predict(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802  # grpcio's name
        label, probabilities = predict(self.session, request.data)
        return mnist_pb2.MnistPrediction(label=label, probabilities=probabilities)


def main(
    model: Annotated[str, typer.Option(help="ONNX model file.")],
    port: Annotated[int, typer.Option(help="Port on [::1]; 0 picks a free one.")] = 0,
    threads: Annotated[int, typer.Option(help="Thread-pool size (grpcio's examples use 10).")] = 10,
) -> None:
    """Serve Predict on [::1] until killed."""
    session = load_session(model)
    server = grpc.server(ThreadPoolExecutor(max_workers=threads))
    mnist_pb2_grpc.add_MnistServicer_to_server(Mnist(session), server)
    bound = server.add_insecure_port(f"[::1]:{port}")
    server.start()
    print(json.dumps({"message": "serving", "port": bound}), flush=True)
    server.wait_for_termination()


if __name__ == "__main__":
    typer.run(main)
