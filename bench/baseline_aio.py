"""Baseline: the same Predict-only server on grpc.aio, inference inline on the event loop.

    python -m bench.baseline_aio --model weights/mnist_convnet.onnx [--port 0]

One onnxruntime session, one inference per call, run inside the handler (so one call at a
time does any work). Prints `{"message": "serving", "port": N}` on stdout once it listens.
"""

from __future__ import annotations

import asyncio
import json
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

    async def Predict(self, request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:  # noqa: N802  # grpcio's name
        label, probabilities = predict(self.session, request.data)
        return mnist_pb2.MnistPrediction(label=label, probabilities=probabilities)


async def serve(model: str, port: int) -> None:
    session = load_session(model)
    server = grpc.aio.server()
    mnist_pb2_grpc.add_MnistServicer_to_server(Mnist(session), server)
    bound = server.add_insecure_port(f"[::1]:{port}")
    await server.start()
    print(json.dumps({"message": "serving", "port": bound}), flush=True)
    await server.wait_for_termination()


def main(
    model: Annotated[str, typer.Option(help="ONNX model file.")],
    port: Annotated[int, typer.Option(help="Port on [::1]; 0 picks a free one.")] = 0,
) -> None:
    """Serve Predict on [::1] until killed."""
    asyncio.run(serve(model, port))


if __name__ == "__main__":
    typer.run(main)
