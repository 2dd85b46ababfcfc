"""Where one call's CPU goes on the server's own path, per RPC kind, without sockets or a model.

    python -m bench.call_path                         # every kind, a table of us per call
    python -m bench.call_path --kind predict --profile 25    # and cProfile's top 25 (cumulative)

The server (`transport.server.Server` with the real `mnist.Mnist`, OIP and health services,
pipeline and batcher) is driven in-process: an h2 client connection writes the calls' frames,
they are fed to the server's protocol (`Server.protocol()`) 64 calls at a time (4 of the kinds of
64 images a call, which would otherwise pass the admission limit), as a busy
socket would deliver them, and the loop runs until every call has ended. The model is a stub
that answers at once (onnxruntime's own cost is in `python -m bench.model_speed`), so what is
timed is the call path: HTTP/2 (h2, hpack), the runner, the codec, the service, the
preprocessing of a 28x28 PNG and the batcher. Socket writes go to a list; the coalescing
transport still joins them. The client's own h2 work (making the requests, reading the
answers) is timed apart and taken out. Best of `--rounds`; not a test, nothing asserts on the
times.
"""

from __future__ import annotations

import asyncio
import cProfile
import io
import platform
import pstats
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any

import numpy as np
import typer
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1.health_pb2 import HealthCheckRequest
from h2.config import H2Configuration
from h2.connection import H2Connection
from h2.events import DataReceived, ResponseReceived, StreamEnded, TrailersReceived

from mnist_service._proto.inference import ModelInferRequest, ModelInferRequestInferInputTensor
from mnist_service._proto.mnist import (
    MnistImage,
    ModelInfoRequest,
    PredictBatchRequest,
    PredictBatchResponse,
    StreamPrediction,
)
from mnist_service.api.mnist import MnistService
from mnist_service.api.oip import InferenceService
from mnist_service.calls import Call
from mnist_service.config import Limits
from mnist_service.constants import NUM_CLASSES
from mnist_service.engine.batcher import Batcher
from mnist_service.engine.inference import FloatArray, ModelInfo
from mnist_service.engine.pipeline import Pipeline
from mnist_service.transport.codec import SizeLimitedCodec
from mnist_service.transport.server import Server
from training.data import load_mnist

from .payloads import render
from .report import cpu_model

app = typer.Typer(add_completion=False)

IN_FLIGHT = 64
X64_IN_FLIGHT = 4
"""The kinds of 64 images a call run 4 at a time, as `bench.run` runs PredictBatch: 64 of them
would queue 4,096 images, past the admission limit (`Limits.max_queue`, 2,048), and half of
the calls or items would be refused, which costs less than answering them."""


def in_flight(kind: str) -> int:
    """Calls a round of `kind` keeps in flight."""
    return X64_IN_FLIGHT if kind.endswith("-x64") else IN_FLIGHT


class StubClassifier:
    """Answers every image at once with the same probabilities: no model cost."""

    info = ModelInfo(
        architecture="conv",
        weights_path=__file__,  # type: ignore[arg-type]
        weights_sha256="0" * 64,
        input_name="image",
        input_shape=(-1, 1, 28, 28),
        execution_provider="CPUExecutionProvider",
        metadata={},
    )

    def classify(self, images: FloatArray) -> FloatArray:
        out = np.zeros((len(images), NUM_CLASSES), np.float32)
        out[:, 3] = 1.0
        return out


class Wire(asyncio.Transport):
    """The server's socket: keeps what is written for the client to read."""

    def __init__(self) -> None:
        super().__init__()
        self.written: list[bytes] = []

    def write(self, data: Any) -> None:
        self.written.append(bytes(data))

    def is_closing(self) -> bool:
        return False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("::1", 50000)}.get(name, default)


def _kinds(digit: np.ndarray[Any, Any]) -> dict[str, tuple[str, list[bytes]]]:
    png = render("mnist-png", digit, 0)
    # as tritonclient sends a file: BYTES [1], the bytes length-prefixed in raw_input_contents
    tensor = ModelInferRequest(
        model_name="mnist_convnet",
        inputs=[ModelInferRequestInferInputTensor(name="image_file", datatype="BYTES", shape=[1])],
        raw_input_contents=[len(png).to_bytes(4, "little") + png],
    )
    image = bytes(MnistImage(data=png))
    return {
        "predict": ("/mnist.Mnist/Predict", [image]),
        "predict-raw": ("/mnist.Mnist/Predict", [bytes(MnistImage(data=digit.tobytes()))]),
        "predict-noisy": (
            "/mnist.Mnist/Predict",
            [bytes(MnistImage(data=render("noisy-28", digit, 0)))],
        ),
        "batch-x64": (
            "/mnist.Mnist/PredictBatch",
            [bytes(PredictBatchRequest(images=[MnistImage(data=png)] * 64))],
        ),
        "stream-x64": ("/mnist.Mnist/PredictStream", [image] * 64),
        "model-infer": ("/inference.GRPCInferenceService/ModelInfer", [bytes(tensor)]),
        "model-info": ("/mnist.Mnist/GetModelInfo", [bytes(ModelInfoRequest())]),
        "health": ("/grpc.health.v1.Health/Check", [HealthCheckRequest().SerializeToString()]),
    }


class Bench:
    """One server and one client connection, in memory."""

    def __init__(self) -> None:
        self.calls = 0
        self.client_s = 0.0
        limits = Limits()
        self.executor = ThreadPoolExecutor(2)
        pipeline = Pipeline(
            Batcher(StubClassifier()),
            max_image_pixels=limits.max_image_pixels,
            executor=self.executor,
        )
        status = ServiceStatus()
        status.set(True)
        mnist = MnistService(pipeline, limits=limits)
        inference = InferenceService({"conv": pipeline}, limits=limits)
        inference.ready = True
        self.server = Server(
            [mnist, inference, Health({mnist: [status]})],
            codec=SizeLimitedCodec(limits.max_message_bytes),
            observer=self._observe,
        )
        self.wire = Wire()
        self.protocol = self.server.protocol()
        self.protocol.connection_made(self.wire)
        self.client = H2Connection(H2Configuration(client_side=True, header_encoding="utf-8"))
        self.client.initiate_connection()
        self.client.update_settings({0x4: 2**24})  # a wide window: flow control is not timed
        self.client.increment_flow_control_window(2**24)
        self._exchange()

    def _observe(self, call: Call) -> None:
        self.calls += 1  # counted, not kept: a list of every call would grow all run long

    def _exchange(self) -> list[Any]:
        """Deliver what each side wrote to the other; the client's events."""
        events: list[Any] = []
        started = time.perf_counter()
        outgoing = self.client.data_to_send()
        self.client_s += time.perf_counter() - started
        if outgoing:
            self.protocol.data_received(outgoing)
        if self.wire.written:
            started = time.perf_counter()
            events = self.client.receive_data(b"".join(self.wire.written))
            self.wire.written.clear()
            for event in events:  # the answers' flow-control credit back, as a client gives it
                if isinstance(event, DataReceived):
                    self.client.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
            self.client_s += time.perf_counter() - started
        return events

    async def round(
        self, path: str, messages: list[bytes], calls: int, in_flight: int = IN_FLIGHT
    ) -> tuple[float, int]:
        """`calls` calls, `in_flight` at a time; seconds taken and the calls that failed (a
        grpc-status other than 0)."""
        seconds, failed, _ = await self._round(path, messages, calls, in_flight, keep=False)
        return seconds, failed

    async def answers(
        self, path: str, messages: list[bytes], calls: int, in_flight: int = IN_FLIGHT
    ) -> tuple[list[str], list[bytes]]:
        """`calls` calls (untimed): each one's grpc-status, and the bytes of its answer."""
        _, _, kept = await self._round(path, messages, calls, in_flight, keep=True)
        return [status for status, _ in kept], [body for _, body in kept]

    async def _round(
        self, path: str, messages: list[bytes], calls: int, in_flight: int, *, keep: bool
    ) -> tuple[float, int, list[tuple[str, bytes]]]:
        frame = b"".join(b"\0" + len(body).to_bytes(4, "big") + body for body in messages)
        headers = [(":method", "POST"), (":scheme", "http"), (":path", path),
                   (":authority", "bench"), ("content-type", "application/grpc"),
                   ("te", "trailers")]  # fmt: skip
        failed = 0
        kept: list[tuple[str, bytes]] = []
        self.client_s = 0.0
        start = time.perf_counter()
        for _ in range(0, calls, in_flight):
            open_streams: set[int] = set()
            bodies: dict[int, list[bytes]] = {}
            sending = time.perf_counter()
            for _ in range(in_flight):
                stream_id = self.client.get_next_available_stream_id()
                self.client.send_headers(stream_id, headers)
                at = 0
                while at < len(frame):
                    size = min(
                        self.client.max_outbound_frame_size,
                        self.client.local_flow_control_window(stream_id),
                    )
                    if size <= 0:  # the server's window updates come with its answers
                        self.client_s += time.perf_counter() - sending
                        self._exchange()
                        await asyncio.sleep(0)
                        sending = time.perf_counter()
                        continue
                    last = at + size >= len(frame)
                    self.client.send_data(stream_id, frame[at : at + size], end_stream=last)
                    at += size
                open_streams.add(stream_id)
            self.client_s += time.perf_counter() - sending
            while open_streams:
                for event in self._exchange():
                    if keep and isinstance(event, DataReceived):
                        bodies.setdefault(event.stream_id, []).append(event.data)
                    # The status is in the trailers, or in the headers of a Trailers-Only
                    # answer (an error); header_encoding="utf-8": names and values are str.
                    status: str | None = None
                    if isinstance(event, (ResponseReceived, TrailersReceived)):
                        received: dict[Any, Any] = dict(event.headers or [])
                        status = received.get("grpc-status")
                    if status is not None:
                        failed += status != "0"
                        if keep:
                            kept.append((status, b"".join(bodies.pop(event.stream_id, []))))
                    if isinstance(event, StreamEnded):
                        open_streams.discard(event.stream_id)
                if open_streams:
                    await asyncio.sleep(0)
        # The client's own HTTP/2 work is not the server's: it is taken out.
        return time.perf_counter() - start - self.client_s, failed, kept


def _item_errors(kind: str, body: bytes) -> int:
    """Items of a PredictBatch or PredictStream answer (gRPC frames) that carry an error."""
    errors = 0
    while body:
        size = int.from_bytes(body[1:5], "big")
        message, body = body[5 : 5 + size], body[5 + size :]
        if kind.startswith("batch"):
            answer = PredictBatchResponse.parse(message)
            errors += sum(item.error is not None for item in answer.results)
        elif kind.startswith("stream"):
            errors += StreamPrediction.parse(message).error is not None
    return errors


@app.command()
def main(
    kind: Annotated[list[str] | None, typer.Option(help="RPC kinds (default: all).")] = None,
    calls: Annotated[
        int,
        typer.Option(
            min=IN_FLIGHT,
            help="Calls per round (a 64-image kind makes a 16th of them, as many images).",
        ),
    ] = 6_400,
    rounds: Annotated[int, typer.Option(min=1, help="Rounds; the best counts.")] = 5,
    profile: Annotated[int, typer.Option(help="Print cProfile's top N functions.")] = 0,
) -> None:
    """Print the server's CPU per call on its own path, per RPC kind."""
    digit = load_mnist("test")[0][0]
    kinds = _kinds(digit)
    chosen = kind or list(kinds)
    print(f"{cpu_model()}; Python {platform.python_version()}; model stubbed")
    print("\n| RPC kind | in flight | us per call | failed |\n|---|--:|--:|--:|")
    print("(batch-x64 and stream-x64 carry 64 images a call)")

    async def run() -> None:
        for name in chosen:
            bench = Bench()  # a fresh server and connection per kind
            path, messages = kinds[name]
            made, width = _calls_of(name, calls), in_flight(name)
            # Warm up, and check that the answers are answers: a refusal costs less.
            statuses, bodies = await bench.answers(path, messages, width * 4, width)
            refused = sum(status != "0" for status in statuses)
            refused += sum(_item_errors(name, body) for body in bodies)
            if refused:
                raise SystemExit(f"{name}: {refused} calls or items failed; nothing timed")
            timed = [await bench.round(path, messages, made, width) for _ in range(rounds)]
            best, failed = min(timed)
            print(f"| {name} | {width} | {best / made * 1e6:,.1f} | {failed} |")
            if profile:
                profiler = cProfile.Profile()
                profiler.enable()
                await bench.round(path, messages, made, width)
                profiler.disable()
                out = io.StringIO()
                stats = pstats.Stats(profiler, stream=out)
                stats.sort_stats("cumulative").print_stats(profile)
                print(f"\n```\n{name}: cProfile, {made} calls\n{_trim(out.getvalue())}```\n")
            bench.executor.shutdown()

    asyncio.run(run())


def _calls_of(kind: str, calls: int) -> int:
    """The calls a round of `kind` makes, in whole sets of `IN_FLIGHT`: a 16th of `calls` for
    the kinds of 64 images a call (still four times the images of a unary kind's round)."""
    if kind.endswith("-x64"):
        calls //= 16
    return max(IN_FLIGHT, calls - calls % IN_FLIGHT)


def _trim(text: str) -> str:
    lines = text.splitlines()
    start = next((i for i, line in enumerate(lines) if "ncalls" in line), 0)
    return "\n".join(lines[start:]) + "\n"


if __name__ == "__main__":
    app()
