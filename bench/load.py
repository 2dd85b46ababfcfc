"""Load and correctness: request bodies, h2load runs and their parsing, grpc-status checks.

h2load drives unary calls because it costs the client core far less than any Python client,
but it only sees HTTP statuses; gRPC puts errors in trailers. So each timed run is bracketed
by calls from a real gRPC client (grpcio) that check the status and the answer, and h2load's
received data is compared with the size of a good reply to catch errors in between.
"""

from __future__ import annotations

import re
import resource
import shutil
import struct
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import numpy as np

from mnist_service.loadgen.latency import percentile

from . import stubs
from .servers import pinned

mnist_pb2, mnist_pb2_grpc = stubs.load()
inference_pb2, inference_pb2_grpc = stubs.load_inference()

CHECK_CALLS = 3
CHECK_TIMEOUT_S = 10.0
H2LOAD_SLACK_S = 30.0
PREDICT = "/mnist.Mnist/Predict"
PREDICT_BATCH = "/mnist.Mnist/PredictBatch"
MODEL_INFER = "/inference.GRPCInferenceService/ModelInfer"
OIP_MODELS = {"conv": "mnist_convnet", "mlp": "mnist_mlp"}


def h2load_path() -> str:
    """h2load's path, or a clear failure: the benchmark cannot run without it."""
    path = shutil.which("h2load")
    if path is None:
        raise SystemExit(
            "h2load not found: install nghttp2-client (apt-get install nghttp2-client)"
        )
    return path


def grpc_frame(message: Any) -> bytes:
    """A gRPC length-prefixed message: uncompressed flag, big-endian length, protobuf."""
    serialized: bytes = message.SerializeToString()
    return struct.pack(">BI", 0, len(serialized)) + serialized


@dataclass(frozen=True)
class H2Result:
    """What one h2load run measured."""

    seconds: float
    client_cpu: float
    succeeded: int
    failed: int
    non_2xx: int
    data_bytes: int
    latencies_ms: list[float]
    """Of the calls that got HTTP 200, ascending."""

    @property
    def rate(self) -> float:
        return self.succeeded / self.seconds if self.seconds else 0.0

    def percentile(self, q: float) -> float | None:
        """The q-th percentile (0-100) of the latencies, None when no call succeeded."""
        return percentile(self.latencies_ms, q) if self.latencies_ms else None


def run_h2load(
    *,
    port: int,
    path: str,
    body: Path,
    connections: int,
    streams: int,
    seconds: int,
    warmup_s: float,
    core: int | None,
    log_file: Path,
) -> H2Result:
    """Drive `path` for `seconds` after `warmup_s`; `streams` in flight per connection."""
    log_file.unlink(missing_ok=True)  # h2load appends to an existing log
    command = [h2load_path(), "-D", str(seconds), "--warm-up-time", f"{int(warmup_s * 1000)}ms",
               "-c", str(connections), "-m", str(streams), "-t", "1", "-d", str(body),
               "-H", "content-type: application/grpc", "-H", "te: trailers",
               "--log-file", str(log_file), f"http://[::1]:{port}{path}"]  # fmt: skip
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        pinned(core, command), capture_output=True, text=True, check=False,
        timeout=seconds + warmup_s + H2LOAD_SLACK_S,
    )  # fmt: skip
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"h2load failed ({done.returncode}): {done.stderr or done.stdout}")
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return _parse(done.stdout, log_file, seconds, cpu / (seconds + warmup_s))


def _parse(output: str, log_file: Path, seconds: int, client_cpu: float) -> H2Result:
    requests = re.search(r"requests: .*?(\d+) succeeded, (\d+) failed, (\d+) errored", output)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    data = re.search(r"traffic: .*?\((\d+)\) data", output)
    if requests is None or codes is None or data is None:
        raise RuntimeError(f"cannot parse h2load output:\n{output}")
    succeeded, failed, errored = (int(group) for group in requests.groups())
    latencies = []
    # Columns: start (µs since epoch), HTTP status (-1: failed stream), duration (µs).
    for line in log_file.read_text().splitlines():
        _, status, duration_us = line.split("\t")[:3]
        if status == "200":
            latencies.append(int(duration_us) / 1000)
    return H2Result(
        seconds=float(seconds),
        client_cpu=client_cpu,
        succeeded=succeeded,
        failed=failed + errored,
        non_2xx=sum(int(group) for group in codes.groups()[1:]),
        data_bytes=int(data.group(1)),
        latencies_ms=sorted(latencies),
    )


@dataclass(frozen=True)
class Check:
    """The grpc-status checks around one run; `reply_bytes` is a good reply's framed size."""

    calls: int
    problems: list[str]
    reply_bytes: int
    wrong_labels: int = 0
    """Valid answers with another label than the digit's, where that is not a problem."""

    @property
    def ok(self) -> bool:
        return not self.problems


def _valid(prediction: Any) -> bool:
    return 0 <= prediction.label <= 9 and len(prediction.probabilities) == 10


def _check(
    address: str,
    call: Callable[[grpc.Channel], Any],
    problem: Callable[[Any], str | None],
    wrong: Callable[[Any], bool] = lambda reply: False,
) -> Check:
    """Make `call` CHECK_CALLS times on one channel: each must end OK, and `problem` must find
    nothing wrong with its reply; `wrong` counts the replies with a tolerated wrong label."""
    problems: list[str] = []
    reply_bytes = wrong_labels = 0
    with grpc.insecure_channel(address) as channel:
        for _ in range(CHECK_CALLS):
            try:
                reply = call(channel)
            except grpc.RpcError as exc:
                problems.append(f"{exc.code().name}: {exc.details()}")
                continue
            reply_bytes = len(grpc_frame(reply))
            found = problem(reply)
            if found is not None:
                problems.append(found)
            wrong_labels += found is None and wrong(reply)
    return Check(CHECK_CALLS, problems, reply_bytes, wrong_labels)


def check_predict(address: str, data: bytes, label: int, *, demand_label: bool = True) -> Check:
    """Send `data` to Predict a few times; every call must be OK with a valid answer, and with
    the right label unless `demand_label` is False (then a wrong label is only counted)."""
    request = mnist_pb2.MnistImage(data=data)

    def problem(reply: Any) -> str | None:
        if _valid(reply) and (reply.label == label or not demand_label):
            return None
        return f"wrong answer: label {reply.label}, expected {label}"

    return _check(
        address,
        lambda channel: mnist_pb2_grpc.MnistStub(channel).Predict(request, timeout=CHECK_TIMEOUT_S),
        problem,
        lambda reply: bool(reply.label != label),
    )


def check_batch(address: str, images: list[bytes]) -> Check:
    """Send the batch to PredictBatch a few times; every call OK, every item a valid label."""
    request = mnist_pb2.PredictBatchRequest(images=[mnist_pb2.MnistImage(data=i) for i in images])

    def problem(reply: Any) -> str | None:
        good = sum(r.HasField("prediction") and _valid(r.prediction) for r in reply.results)
        if len(reply.results) == len(images) and good == len(images):
            return None
        return f"{good} good results of {len(reply.results)}, sent {len(images)}"

    return _check(
        address,
        lambda channel: mnist_pb2_grpc.MnistStub(channel).PredictBatch(
            request, timeout=CHECK_TIMEOUT_S
        ),
        problem,
    )


def model_infer_request(model: str, data: bytes, payload: str) -> Any:
    """The Open Inference Protocol's ModelInfer for one image, sent as tritonclient sends it
    (raw_input_contents): "raw" pixels as UINT8 [1,28,28], a "png" file as BYTES [1]."""
    if payload == "raw":
        name, datatype, shape, raw = "pixels", "UINT8", [1, 28, 28], data
    else:
        name, datatype, shape = "image_file", "BYTES", [1]
        raw = struct.pack("<I", len(data)) + data
    tensor = inference_pb2.ModelInferRequest.InferInputTensor(
        name=name, datatype=datatype, shape=shape
    )
    return inference_pb2.ModelInferRequest(
        model_name=OIP_MODELS[model], inputs=[tensor], raw_input_contents=[raw]
    )


def check_model_infer(address: str, request: Any, label: int) -> Check:
    """Send `request` to ModelInfer a few times; every call must be OK with the right label."""

    def problem(reply: Any) -> str | None:
        names = [output.name for output in reply.outputs]
        got = np.frombuffer(reply.raw_output_contents[names.index("label")], "<i8")
        if got.tolist() == [label]:
            return None
        return f"wrong answer: label {got.tolist()}, expected [{label}]"

    return _check(
        address,
        lambda channel: inference_pb2_grpc.GRPCInferenceServiceStub(channel).ModelInfer(
            request, timeout=CHECK_TIMEOUT_S
        ),
        problem,
    )


def short_replies(result: H2Result, reply_bytes: int) -> int:
    """How many replies at least were missing their message (an error in the trailers)."""
    if reply_bytes == 0 or result.succeeded == 0:
        return 0
    # Every good reply carries at least `reply_bytes` of DATA; an error reply carries none.
    return max(0, result.succeeded - result.data_bytes // reply_bytes)
