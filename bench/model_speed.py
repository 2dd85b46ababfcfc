"""The model's own speed: onnxruntime images/s on one thread, no gRPC, run as a pinned process.

    taskset -c 1 python -m bench.model_speed --model weights/mnist_convnet.onnx --seconds 2

The ceiling any server on that core can approach: batch 1 is what per-call inference gets,
batch 64 what batching could get. Prints one JSON object {"batch_1": images/s, ...}.
"""

from __future__ import annotations

import json
import time
from typing import Annotated

import numpy as np
import onnxruntime as ort
import typer

BATCH_SIZES = (1, 64)
MAX_RUNS = 1_000_000


def images_per_second(session: ort.InferenceSession, images: np.ndarray, seconds: float) -> float:
    """Run batches of `len(images)` for `seconds` (after one warm-up run); images/s."""
    session.run(["probabilities"], {"image": images})
    runs = 0
    started = time.perf_counter()
    deadline = started + seconds
    while runs < MAX_RUNS and time.perf_counter() < deadline:
        session.run(["probabilities"], {"image": images})
        runs += 1
    return runs * len(images) / (time.perf_counter() - started)


def main(
    model: Annotated[str, typer.Option(help="ONNX model file.")],
    seconds: Annotated[float, typer.Option(help="Time per batch size.")] = 2.0,
) -> None:
    """Measure each batch size; print JSON."""
    from training.data import load_mnist

    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.inter_op_num_threads = 1
    session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    pixels, _ = load_mnist("test")
    inputs = (pixels.astype(np.float32) / 255.0)[:, None, :, :]
    result = {f"batch_{size}": images_per_second(session, inputs[:size], seconds)
              for size in BATCH_SIZES}  # fmt: skip
    print(json.dumps(result))


if __name__ == "__main__":
    typer.run(main)
