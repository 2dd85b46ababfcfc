"""Hostile HTTP: named cases sent over raw sockets to a real server, and memory bounds.

Each case pins the exact HTTP status (and, where a handler answers, the JSON error code), a
message with no traceback, a server log that never carries the payload's marker, and a valid
request right after that succeeds. The memory cases watch the server's RSS (as
tests/test_memory.py does for gRPC) while a client announces a gigabyte, streams 100 MB in
chunks, uploads a huge multipart form, or holds many connections with headers that never end.
Admission (`--max-queue`) is checked in process, with a model that answers when told.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import numpy as np
import pytest

from mnist_service.calls import Call
from mnist_service.config import Limits
from mnist_service.engine.inference import FloatArray, ModelInfo
from mnist_service.engine.pipeline import Pipeline
from mnist_service.engine.versions import ModelRegistry, VersionedModel
from mnist_service.http import HttpServer
from mnist_service.http.api import Models

from .conftest import MnistSplit, ServerProcess, png_bytes
from .http_client import http_port, request
from .test_memory import MB, PeakRss

MARKER = b"HOSTILE-HTTP-5e1d"
HEADER_S = 1.0
BOUND = 50 * MB


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        "--workers", "1", "--max-message-seconds", str(HEADER_S), "--max-connections", "64"
    )
    yield process
    assert process.stop() == 0


def exchange(port: int, data: bytes | Callable[[socket.socket], None]) -> bytes:
    """Send `data` (or run it on the socket) and read until the server closes (or 64 KiB)."""
    with socket.create_connection(("::1", port), timeout=30) as sock:
        try:
            if callable(data):
                data(sock)
            else:
                sock.sendall(data)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered and closed before we were done: read its answer
        received = b""
        try:
            while len(received) < 65536 and (chunk := sock.recv(65536)):
                received += chunk
                if b"\r\n\r\n" in received and _complete(received):
                    break
        except (ConnectionResetError, TimeoutError):
            pass
        return received


def _complete(received: bytes) -> bool:
    head, _, body = received.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False


def post(path: str, headers: str, body: bytes = b"") -> bytes:
    return f"POST {path} HTTP/1.1\r\nHost: x\r\n{headers}\r\n".encode() + body


def post_body(path: str, content_type: str, body: bytes) -> bytes:
    """A POST whose Content-Length is its body's."""
    return post(path, f"Content-Type: {content_type}\r\nContent-Length: {len(body)}\r\n", body)


def trickle(sock: socket.socket) -> None:
    """A slow-loris client: a request line, then a header byte now and then, never done."""
    sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-")
    sock.settimeout(HEADER_S * 10)


def huge_multipart(total: int) -> Callable[[socket.socket], None]:
    def send(sock: socket.socket) -> None:
        boundary = "b0undary"
        sock.sendall(
            post(
                "/v1/predict",
                f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                "Transfer-Encoding: chunked\r\n",
            )
        )
        head = (
            f'--{boundary}\r\nContent-Disposition: form-data; name="image"; '
            'filename="x.png"\r\n\r\n'
        ).encode() + MARKER
        sock.sendall(b"%x\r\n%s\r\n" % (len(head), head))
        chunk = MARKER * (65536 // len(MARKER))
        for _ in range(total // len(chunk)):
            sock.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))

    return send


@dataclass(frozen=True)
class Case:
    send: bytes | Callable[[socket.socket], None]
    status: int
    code: str | None  # the JSON error's code; None where aiohttp answers in plain text
    fragment: str


CASES: dict[str, Case] = {
    "slow-loris-headers": Case(trickle, 408, "RESOURCE_EXHAUSTED", "headers did not arrive"),
    "header-line-too-long": Case(
        post("/v1/predict", "X-Big: " + "a" * 9000 + "\r\n"), 400, None, "Got more than"
    ),
    "too-many-headers": Case(
        post("/v1/predict", "".join(f"X-{i}: {i}\r\n" for i in range(100))), 400, None, ""
    ),
    "bad-json": Case(
        post_body("/v1/predict", "application/json", b'{"data": "\x00\xff'),
        400,
        "INVALID_ARGUMENT",
        "not valid JSON",
    ),
    "json-too-deep": Case(
        post_body("/v1/predict:batch", "application/json", b"[" * 100000 + b"]" * 100000),
        400,
        "INVALID_ARGUMENT",
        "not valid JSON",
    ),
    "oip-nan-values": Case(  # RFC 8259 has no NaN; a lenient parser would hand it to the model
        post_body(
            "/v2/models/mnist_convnet/infer",
            "application/json",
            b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28],'
            b' "data": [NaN' + b", 0.0" * 783 + b"]}]}",
        ),
        400,
        None,
        "not valid JSON",
    ),
    "oip-json-not-utf8": Case(
        post_body("/v2/models/mnist_convnet/infer", "application/json", b'{"id": "\xff\xfe"}'),
        400,
        None,
        "not valid JSON",
    ),
    "wrong-content-type": Case(
        post_body("/v1/predict", "text/html", MARKER),
        415,
        "INVALID_ARGUMENT",
        "content type 'text/html'",
    ),
    "announced-gigabyte": Case(
        post("/v1/predict", "Content-Type: image/png\r\nContent-Length: 1073741824\r\n"),
        413,
        "RESOURCE_EXHAUSTED",
        "request body is 1073741824 bytes",
    ),
    "huge-multipart": Case(huge_multipart(8 * MB), 413, "RESOURCE_EXHAUSTED", "more than"),
    "multipart-without-a-file": Case(
        post_body(
            "/v1/predict",
            "multipart/form-data; boundary=x",
            b'--x\r\nContent-Disposition: form-data; name="a"\r\n\r\nhello\r\n--x--\r\n',
        ),
        400,
        "INVALID_ARGUMENT",
        "has no file",
    ),
    "body-shorter-than-announced": Case(
        lambda sock: sock.sendall(
            post("/v1/predict", "Content-Type: image/png\r\nContent-Length: 1000\r\n", MARKER)
        ),
        408,
        "RESOURCE_EXHAUSTED",
        "did not arrive within",
    ),
    "path-traversal": Case(
        b"GET /static/../../pyproject.toml HTTP/1.1\r\nHost: x\r\n\r\n", 404, "NOT_FOUND", ""
    ),
    "encoded-path-traversal": Case(
        b"GET /static/..%2f..%2fpyproject.toml HTTP/1.1\r\nHost: x\r\n\r\n",
        404,
        "NOT_FOUND",
        "no such file",
    ),
    "oip-header-length-beyond-body": Case(
        post(
            "/v2/models/mnist_convnet/infer",
            "Inference-Header-Content-Length: 99999\r\nContent-Length: 2\r\n",
            b"{}",
        ),
        400,
        None,
        "the body has 2",
    ),
    "not-http": Case(b"\x16\x03\x01\x02\x00\x01\xfc\x03\x03\r\n\r\n", 400, None, ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_each_hostile_request_gets_a_precise_4xx(
    server: ServerProcess, mnist_test_set: MnistSplit, name: str
) -> None:
    case = CASES[name]
    port = http_port(server)
    logged = len(server.logs)

    answer = exchange(port, case.send)

    status_line = answer.split(b"\r\n", 1)[0]
    assert status_line.split(b" ")[1] == str(case.status).encode(), answer[:300]
    body = answer.partition(b"\r\n\r\n")[2].decode(errors="replace")
    assert "Traceback" not in body
    if case.code is not None:
        error = json.loads(body)["error"]
        assert error["code"] == case.code
        assert case.fragment in error["message"]
    elif case.status == 400 and name.startswith("oip"):
        assert case.fragment in json.loads(body)["error"]
    else:
        assert case.fragment in body
    if case.code is not None:  # aiohttp's own 400s quote the line they could not parse
        assert MARKER.decode() not in body
    after = request(
        f"http://[::1]:{port}/v1/predict",
        png_bytes(mnist_test_set[0][0]),
        headers={"Content-Type": "image/png"},
    )
    assert after.status == 200
    assert not any(MARKER.decode() in json.dumps(entry) for entry in server.logs[logged:])


def test_a_worker_turns_away_http_connections_past_its_limit(mnist_test_set: MnistSplit) -> None:
    process = ServerProcess("--workers", "1", "--max-connections", "2")
    try:
        port = http_port(process)
        held = [socket.create_connection(("::1", port), timeout=30) for _ in range(2)]
        try:
            for sock in held:  # each connection counted in: a request answered on it
                sock.sendall(b"GET /v2/health/live HTTP/1.1\r\nHost: x\r\n\r\n")
                assert sock.recv(65536).startswith(b"HTTP/1.1 200 ")
            third = exchange(port, b"")
            assert third.startswith(b"HTTP/1.1 503 ")
            assert b"too many connections" in third
        finally:
            for sock in held:
                sock.close()
    finally:
        assert process.stop() == 0


# -- memory -------------------------------------------------------------------------------------


def many_slow_loris(count: int) -> Callable[[int], None]:
    def run(port: int) -> None:
        sockets = [socket.create_connection(("::1", port), timeout=30) for _ in range(count)]
        try:
            for sock in sockets:
                sock.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * 8000)
            for sock in sockets:  # each gets its 408, or the connection limit's 503
                assert sock.recv(65536)[:12] in (b"HTTP/1.1 408", b"HTTP/1.1 503")
        finally:
            for sock in sockets:
                sock.close()

    return run


def chunked_hundred_megabytes(port: int) -> None:
    def send(sock: socket.socket) -> None:
        sock.sendall(
            post("/v1/predict", "Content-Type: image/png\r\nTransfer-Encoding: chunked\r\n")
        )
        chunk = b"\x00" * 65536
        for _ in range(100 * MB // len(chunk)):
            sock.sendall(b"10000\r\n" + chunk + b"\r\n")

    assert exchange(port, send).startswith(b"HTTP/1.1 413 ")


def announced_gigabytes(port: int) -> None:
    for _ in range(20):
        assert exchange(port, CASES["announced-gigabyte"].send).startswith(b"HTTP/1.1 413 ")


def huge_multipart_uploads(port: int) -> None:
    for _ in range(3):
        assert exchange(port, huge_multipart(32 * MB)).startswith(b"HTTP/1.1 413 ")


MEMORY_CASES: dict[str, Callable[[int], None]] = {
    "announced-gigabytes": announced_gigabytes,
    "chunked-100-megabytes": chunked_hundred_megabytes,
    "huge-multipart-uploads": huge_multipart_uploads,
    "64-slow-loris-connections": many_slow_loris(64),
}


@pytest.mark.parametrize("case", list(MEMORY_CASES))
def test_hostile_http_sizes_leave_rss_bounded(server: ServerProcess, case: str) -> None:
    with PeakRss(server.process.pid) as rss:
        MEMORY_CASES[case](http_port(server))

    assert rss.growth < BOUND, f"RSS grew {rss.growth / MB:.0f} MB"


# -- admission, in process ------------------------------------------------------------------------


class HeldModel:
    """A predictor whose model runs end only when `release` is called."""

    def __init__(self) -> None:
        self.waiting: list[asyncio.Future[FloatArray]] = []

    @property
    def info(self) -> ModelInfo:
        return ModelInfo(
            architecture="conv",
            weights_path=Path("held.onnx"),
            weights_sha256="0" * 64,
            input_name="image",
            input_shape=(-1, 1, 28, 28),
            execution_provider="none",
        )

    def submit(self, batch: FloatArray, expires_at: float | None = None, on_batch=None):
        future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
        self.waiting.append(future)
        return future

    async def predict(self, batch: FloatArray, expires_at: float | None = None, on_batch=None):
        return await self.submit(batch)

    def release(self) -> None:
        for future in self.waiting:
            future.set_result(np.full((1, 10), 0.1, np.float32))


async def test_a_full_queue_is_503_with_retry_after(mnist_test_set: MnistSplit) -> None:
    model = HeldModel()
    limits = Limits(max_queue=1, max_batch_images=1)
    calls: list[Call] = []
    with ThreadPoolExecutor(1) as executor:
        pipeline = Pipeline(
            model, max_image_pixels=limits.max_image_pixels, executor=executor, max_queue=1
        )
        server = HttpServer(
            Models(ModelRegistry([VersionedModel.single("conv", pipeline)], "mnist_convnet")),
            limits=limits,
            executor=executor,
            observer=calls.append,
            ready=lambda: True,
        )
        sock = socket.create_server(("::1", 0), family=socket.AF_INET6)
        await server.start(sock, None)
        url = f"http://[::1]:{server.port}/v1/predict"
        raw = mnist_test_set[0][0].tobytes()
        try:
            async with aiohttp.ClientSession() as session:
                first = asyncio.ensure_future(session.post(url, data=raw))
                while not model.waiting:  # the first image is queued for the model
                    await asyncio.sleep(0.005)
                async with session.post(url, data=raw) as refused:
                    assert refused.status == 503
                    assert refused.headers["Retry-After"] == "1"
                    error = (await refused.json())["error"]
                    assert error["code"] == "RESOURCE_EXHAUSTED"
                    assert "takes at most 1" in error["message"]
                model.release()
                async with await first as answered:
                    assert answered.status == 200
        finally:
            await server.close()
    assert [c.status.name for c in calls] == ["RESOURCE_EXHAUSTED", "OK"]
