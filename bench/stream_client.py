"""Load client for PredictStream: one bidirectional stream, run as its own pinned process.

    taskset -c 0 python -m bench.stream_client --address [::1]:PORT --payload raw --seconds 4

Sends real MNIST test digits over one grpcio stream for a bounded time and count, checks every
answer (grpc status of the call, one valid prediction per image) and prints one JSON object:
images answered, seconds, images/s, the client's own CPU use, errors, the first problem seen.
"""

from __future__ import annotations

import itertools
import json
import threading
import time
from collections.abc import Iterator
from typing import Annotated, Any

import grpc
import typer

from . import stubs
from .payloads import render

mnist_pb2, mnist_pb2_grpc = stubs.load()

DISTINCT_IMAGES = 256
WARMUP_IMAGES = 200
WINDOW = 64
MAX_IMAGES = 500_000
CALL_SLACK_S = 30.0


class Window:
    """At most WINDOW images unanswered: grpcio would otherwise queue requests far ahead of the
    server, and the stream would run on long after its deadline."""

    def __init__(self) -> None:
        self.answered = 0
        self._changed = threading.Condition()

    def wait_below(self, sent: int, deadline: float) -> None:
        with self._changed:
            self._changed.wait_for(
                lambda: sent - self.answered < WINDOW, max(0.0, deadline - time.perf_counter())
            )

    def add_answer(self) -> None:
        with self._changed:
            self.answered += 1
            self._changed.notify()


def requests(images: list[bytes], count: int, deadline: float, window: Window) -> Iterator[Any]:
    """Cycle through `images` until `count` are sent or `deadline` passes."""
    for sent, data in enumerate(itertools.islice(itertools.cycle(images), count)):
        window.wait_below(sent, deadline)
        if time.perf_counter() > deadline:
            return
        yield mnist_pb2.MnistImage(data=data)


def one_stream(
    stub: Any, images: list[bytes], count: int, seconds: float
) -> tuple[int, int, float, float, str]:
    """(answered, errors, wall seconds, CPU seconds of this client, first problem)."""
    answered = errors = 0
    problem = ""
    window = Window()
    started, cpu_started = time.perf_counter(), time.process_time()
    try:
        replies = stub.PredictStream(
            requests(images, count, started + seconds, window), timeout=seconds + CALL_SLACK_S
        )
        for index, reply in enumerate(replies):
            answered += 1
            window.add_answer()
            prediction = reply.prediction
            if reply.index != index or not reply.HasField("prediction") or prediction.label > 9:
                errors += 1
                problem = problem or f"bad item {index}: {reply}".replace("\n", " ")
    except grpc.RpcError as exc:
        errors += 1
        problem = problem or f"{exc.code().name}: {exc.details()}"
    return (
        answered,
        errors,
        time.perf_counter() - started,
        time.process_time() - cpu_started,
        problem,
    )


def main(
    address: Annotated[str, typer.Option(help="Server HOST:PORT.")],
    payload: Annotated[str, typer.Option(help="A kind of bench/payloads.py.")] = "raw",
    seconds: Annotated[float, typer.Option(help="Time limit of the timed stream.")] = 4.0,
) -> None:
    """Warm up, then time one stream; print the result as JSON."""
    from training.data import load_mnist

    pixels, _ = load_mnist("test")
    images = [render(payload, image, i) for i, image in enumerate(pixels[:DISTINCT_IMAGES])]
    with grpc.insecure_channel(address) as channel:
        stub = mnist_pb2_grpc.MnistStub(channel)
        one_stream(stub, images, WARMUP_IMAGES, seconds)
        answered, errors, wall, cpu, problem = one_stream(stub, images, MAX_IMAGES, seconds)
    # client_cpu near 1.0 means this client, not the server, set the pace.
    print(json.dumps({"images": answered, "seconds": wall, "images_per_s": answered / wall,
                      "client_cpu": cpu / wall, "errors": errors, "problem": problem}))  # fmt: skip


if __name__ == "__main__":
    typer.run(main)
