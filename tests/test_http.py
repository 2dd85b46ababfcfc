"""The HTTP API through a real server process and real clients (urllib, raw sockets), beside
gRPC on the same server: the same answers bit for bit, the same errors (as JSON with the
HTTP status of their code), the request log and metrics with `protocol=http`, shared batches,
the drain, `--workers 2` and TLS."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import socket
import ssl
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from grpclib.exceptions import GRPCError

from mnist_service.client import MnistClient

from .certificates import Authority
from .conftest import MnistSplit, ServerProcess, png_bytes
from .http_client import base_url, http_port, post_json, request
from .test_metrics import scrape, value
from .waiting import wait_until

IMAGES = 12


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        "--workers", "1", "--models", "conv,mlp", "--metrics-address", "[::1]:0",
        "--max-batch-images", "8",
    )  # fmt: skip
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def digits(mnist_test_set: MnistSplit) -> list[tuple[bytes, bytes]]:
    """(PNG file, 784 raw pixels) of the first test images."""
    images = mnist_test_set[0][:IMAGES]
    return [(png_bytes(image), image.tobytes()) for image in images]


def grpc_predictions(server: ServerProcess, images: list[bytes]) -> list[list[float]]:
    async def run() -> list[list[float]]:
        async with MnistClient(server.address, timeout=30) as client:
            return [list((await client.predict(data)).probabilities) for data in images]

    return asyncio.run(run())


def multipart(data: bytes, field: str = "image") -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="note"\r\n\r\nhello\r\n'
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="digit.png"\r\nContent-Type: image/png\r\n\r\n'
        ).encode()
        + data
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def test_predict_equals_grpc_bit_for_bit_in_every_body_form(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    url = base_url(server) + "/v1/predict"
    files = [png for png, _ in digits]
    expected = grpc_predictions(server, files)

    for (png, raw), want in zip(digits, expected, strict=True):
        form, form_type = multipart(png)
        answers = {
            "png": request(url, png, headers={"Content-Type": "image/png"}),
            "curl-default": request(url, png),  # application/x-www-form-urlencoded
            "raw-pixels": request(url, raw, headers={"Content-Type": "application/octet-stream"}),
            "multipart": request(url, form, headers={"Content-Type": form_type}),
            "json": post_json(url, {"data": base64.b64encode(png).decode()}),
        }
        for kind, answer in answers.items():
            assert answer.status == 200, (kind, answer.body)
            got = answer.json()
            assert got["probabilities"] == want, kind  # the same doubles: float32 bit for bit
            assert got["label"] == int(np.argmax(want))
            assert (got["model"], got["version"]) == ("mnist_convnet", "1")


def test_predict_can_choose_a_model_and_explain_what_the_model_saw(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    png, raw = digits[0]
    answer = request(
        base_url(server) + "/v1/predict?model=mnist_mlp&explain=1",
        png,
        headers={"Content-Type": "image/png"},
    )

    assert answer.status == 200
    got = answer.json()
    assert got["model"] == "mnist_mlp"
    prefix = "data:image/png;base64,"
    assert got["explain"]["input_png"].startswith(prefix)
    seen = base64.b64decode(got["explain"]["input_png"][len(prefix) :])
    assert seen == png_bytes(np.frombuffer(raw, np.uint8).reshape(28, 28))  # MNIST as is


def test_batch_answers_per_item_like_predict_batch(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    files = [png for png, _ in digits[:5]]
    items = [files[0], b"not an image", *files[1:]]

    answer = post_json(
        base_url(server) + "/v1/predict:batch",
        {"images": [base64.b64encode(item).decode() for item in items]},
    )

    async def grpc_batch() -> list[object]:
        async with MnistClient(server.address, timeout=30) as client:
            return list(await client.predict_batch(items))

    expected = asyncio.run(grpc_batch())
    assert answer.status == 200
    results = answer.json()["results"]
    assert [r["index"] for r in results] == list(range(len(items)))
    for result, want in zip(results, expected, strict=True):
        if "error" in result:
            assert result["error"]["code"] == want.status.name  # type: ignore[attr-defined]
            assert result["error"]["message"] == want.message  # type: ignore[attr-defined]
        else:
            assert result["probabilities"] == list(want.probabilities)  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("method", "path", "headers", "body", "status", "code", "fragment"),
    [
        ("POST", "/v1/predict", {"Content-Type": "text/plain"}, b"4", 415, "INVALID_ARGUMENT",
         "content type 'text/plain'"),
        ("POST", "/v1/predict", {"Content-Type": "application/json"}, b"{", 400,
         "INVALID_ARGUMENT", "not valid JSON"),
        ("POST", "/v1/predict", {"Content-Type": "application/json"}, b'{"image": 1}', 400,
         "INVALID_ARGUMENT", '{"data": "<base64>"}'),
        ("POST", "/v1/predict", {"Content-Type": "application/json"}, b'{"data": "@@"}', 400,
         "INVALID_ARGUMENT", "not valid base64"),
        ("POST", "/v1/predict", {"Content-Type": "image/png"}, b"", 400, "INVALID_ARGUMENT",
         "image is empty"),
        ("POST", "/v1/predict", {"Content-Type": "image/png"}, b"\x89PNG junk", 400,
         "INVALID_ARGUMENT", "not a readable"),
        ("POST", "/v1/predict?model=resnet50", {}, b"x", 404, "NOT_FOUND",
         "unknown model 'resnet50'"),
        ("POST", "/v1/predict", {"X-Request-Timeout": "soon"}, b"x", 400, "INVALID_ARGUMENT",
         "X-Request-Timeout"),
        ("POST", "/v1/predict", {"grpc-timeout": "1x"}, b"x", 400, "INVALID_ARGUMENT",
         "grpc-timeout"),
        ("POST", "/v1/predict:batch", {"Content-Type": "application/json"},
         json.dumps({"images": ["AAAA"] * 9}).encode(), 400, "INVALID_ARGUMENT",
         "the limit is 8 per call"),
        ("GET", "/v1/predict", {}, None, 405, "UNIMPLEMENTED", "does not take GET"),
        ("GET", "/v1/nothing", {}, None, 404, "NOT_FOUND", "no such path: /v1/nothing"),
        ("GET", "/static/..%2f..%2fconfig.py", {}, None, 404, "NOT_FOUND", "no such"),
    ],
    ids=[
        "wrong-content-type", "bad-json", "json-without-data", "bad-base64", "empty-image",
        "undecodable", "unknown-model", "bad-timeout", "bad-grpc-timeout", "batch-too-big",
        "wrong-method", "unknown-path", "path-traversal",
    ],
)  # fmt: skip
def test_errors_are_json_with_the_http_status_of_their_code(
    server: ServerProcess,
    method: str,
    path: str,
    headers: dict[str, str],
    body: bytes | None,
    status: int,
    code: str,
    fragment: str,
) -> None:
    answer = request(base_url(server) + path, body, method=method, headers=headers)

    assert answer.status == status, answer.body
    assert answer.headers["content-type"].startswith("application/json")
    error = answer.json()["error"]
    assert error["code"] == code
    assert fragment in error["message"]
    assert "Traceback" not in error["message"]


def test_an_expired_deadline_is_504(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    answer = request(
        base_url(server) + "/v1/predict",
        digits[0][0],
        headers={"Content-Type": "image/png", "X-Request-Timeout": "0.000001"},
    )

    assert answer.status == 504
    assert answer.json()["error"]["code"] == "DEADLINE_EXCEEDED"


def test_a_body_over_the_size_cap_is_refused_from_its_content_length(
    server: ServerProcess,
) -> None:
    """5 MiB announced against the 4 MiB cap: 413 before the body is sent at all."""
    with socket.create_connection(("::1", http_port(server)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Content-Length: 5242880\r\n\r\n"
        )
        head = read_head(sock)

    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"request body is 5242880 bytes; the limit is 4194304 bytes" in head


def test_a_chunked_body_is_counted_as_it_arrives(server: ServerProcess) -> None:
    chunk = b"x" * 65536
    with socket.create_connection(("::1", http_port(server)), timeout=30) as sock:
        sock.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        try:
            for _ in range(80):  # 5 MiB, if the server let it
                sock.sendall(b"10000\r\n" + chunk + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # it stopped reading: the answer is waiting
        head = read_head(sock)

    assert head.startswith(b"HTTP/1.1 413 ")
    assert b"more than 4194304 bytes" in head


def read_head(sock: socket.socket) -> bytes:
    """What the server sent until it closed (or the first 64 KiB)."""
    data = b""
    try:
        while len(data) < 65536 and (chunk := sock.recv(65536)):
            data += chunk
    except ConnectionResetError:
        pass
    return data


def test_each_call_has_a_request_log_line_and_echoes_its_request_id(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    answer = request(
        base_url(server) + "/v1/predict",
        digits[0][0],
        headers={"Content-Type": "image/png", "x-request-id": "order-42/item-7"},
    )

    assert answer.headers["x-request-id"] == "order-42/item-7"
    timing = answer.headers["server-timing"]
    assert [part.split(";")[0] for part in timing.split(", ")] == [
        "preprocess", "queue", "inference", "total",
    ]  # fmt: skip
    line = server.log_entry(request_id="order-42/item-7")
    assert line["method"] == "POST /v1/predict"
    assert line["protocol"] == "http"
    assert line["status"] == "OK"
    assert line["label"] == answer.json()["label"]
    assert line["batch"] >= 1


def test_metrics_count_http_calls_under_a_protocol_label(
    server: ServerProcess, digits: list[tuple[bytes, bytes]]
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for png, _ in digits[:3]:
        request(base_url(server) + "/v1/predict", png, headers={"Content-Type": "image/png"})
    request(base_url(server) + "/v1/predict", b"", headers={"Content-Type": "image/png"})
    grpc_predictions(server, [digits[0][0]])
    serving = next(e for e in server.logs if str(e.get("message", "")).startswith("serving"))

    def scrape() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        url = f"http://[::1]:{serving['metrics_port']}/metrics"
        with urllib.request.urlopen(url, timeout=10) as response:
            text = response.read().decode()
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text)
            for s in family.samples
        }

    def counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float] | None:
        samples = scrape()
        key = ("mnist_request_failure_total",
               (("code", "INVALID_ARGUMENT"), ("method", "POST /v1/predict"),
                ("protocol", "http")))  # fmt: skip
        return samples if samples.get(key, 0) >= 1 else None

    samples = wait_until(counted, "the HTTP call's failure in the metrics")
    ok = (("method", "POST /v1/predict"), ("protocol", "http"))
    assert samples[("mnist_request_success_total", ok)] >= 3
    grpc = (("method", "/mnist.Mnist/Predict"), ("protocol", "grpc"))
    assert samples[("mnist_request_success_total", grpc)] >= 1


def test_http_and_grpc_calls_share_model_runs(mnist_test_set: MnistSplit) -> None:
    """A burst of 6 HTTP and 6 gRPC calls on a server that waits up to 0.5 s to fill a batch:
    HTTP calls ride in model runs bigger than the HTTP calls could fill alone."""
    process = ServerProcess("--workers", "1", "--max-batch-delay", "500000")
    try:
        files = [png_bytes(image) for image in mnist_test_set[0][20:26]]
        url = base_url(process) + "/v1/predict"
        ids = [f"burst-{i}" for i in range(len(files))]

        async def burst() -> None:
            loop = asyncio.get_running_loop()
            async with MnistClient(process.address, timeout=30) as client:
                http = [
                    loop.run_in_executor(
                        None,
                        lambda d=data, i=rid: request(  # type: ignore[misc]
                            url, d, headers={"Content-Type": "image/png", "x-request-id": i}
                        ),
                    )
                    for data, rid in zip(files, ids, strict=True)
                ]
                grpc = [client.predict(data) for data in files]
                await asyncio.gather(*http, *grpc)

        asyncio.run(burst())
        batches = [process.log_entry(request_id=rid)["batch"] for rid in ids]
        assert max(batches) > len(files), batches
    finally:
        assert process.stop() == 0


def test_the_drain_finishes_a_call_in_flight_with_connection_close(
    digits: list[tuple[bytes, bytes]],
) -> None:
    process = ServerProcess("--workers", "1")
    png = digits[0][0]
    port = http_port(process)
    idle = socket.create_connection(("::1", port), timeout=30)
    busy = socket.create_connection(("::1", port), timeout=30)
    try:
        keep_alive = b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
        idle.sendall(keep_alive + f"Content-Length: {len(png)}\r\n\r\n".encode() + png)
        first = idle.recv(65536)
        assert first.startswith(b"HTTP/1.1 200 ")
        # A call in flight: its headers and half its body sent when the drain starts.
        busy.sendall(keep_alive + f"Content-Length: {len(png)}\r\n\r\n".encode())
        busy.sendall(png[: len(png) // 2])
        process.log_entry(method="POST /v1/predict", status="OK")  # the first one logged
        process.process.send_signal(signal.SIGTERM)
        process.log_entry(message="draining")

        busy.sendall(png[len(png) // 2 :])
        answer = read_head(busy)  # to the server's close
        assert answer.startswith(b"HTTP/1.1 200 ")
        assert b"Connection: close" in answer
        assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["label"] == 7
        assert read_head(idle) == b""  # the idle keep-alive connection was closed
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("::1", port), timeout=30).close()
        assert process.wait() == 0
    finally:
        idle.close()
        busy.close()
        process.stop()


def test_every_worker_serves_http(digits: list[tuple[bytes, bytes]]) -> None:
    process = ServerProcess("--workers", "2")
    try:
        url = base_url(process) + "/v1/predict"
        for i in range(24):  # a new connection each: SO_REUSEPORT spreads them
            answer = request(url, digits[0][0], headers={"x-request-id": f"w-{i}"})
            assert answer.status == 200
        pids = {process.log_entry(request_id=f"w-{i}")["pid"] for i in range(24)}
        assert len(pids) == 2
    finally:
        assert process.stop() == 0


def test_https_with_the_grpc_certificate(tmp_path: Path, digits: list[tuple[bytes, bytes]]) -> None:
    ca = Authority.create(tmp_path, "ca")
    issued = ca.issue("server", server=True)
    process = ServerProcess(
        "--workers", "1", "--tls-cert", str(issued.cert), "--tls-key", str(issued.key)
    )
    try:
        context = ssl.create_default_context(cafile=str(ca.cert))
        req = urllib.request.Request(
            f"https://localhost:{http_port(process)}/v1/predict".replace("localhost", "[::1]"),
            data=digits[0][0],
            headers={"Content-Type": "image/png"},
        )
        with urllib.request.urlopen(req, timeout=30, context=context) as response:
            assert response.status == 200
            assert json.loads(response.read())["label"] == 7
        with pytest.raises((urllib.error.URLError, ConnectionError)):  # plaintext to TLS
            urllib.request.urlopen(
                f"http://[::1]:{http_port(process)}/v2/health/live", timeout=30
            ).close()
    finally:
        assert process.stop() == 0


def test_the_http_listener_can_be_turned_off() -> None:
    process = ServerProcess("--workers", "1", "--http-address", "")
    try:
        serving = next(e for e in process.logs if str(e.get("message", "")).startswith("serving"))
        assert "http_port" not in serving
    finally:
        assert process.stop() == 0


def test_grpc_is_unchanged_beside_http(server: ServerProcess) -> None:
    async def run() -> None:
        async with MnistClient(server.address, timeout=30) as client:
            with pytest.raises(GRPCError):
                await client.predict(b"")

    asyncio.run(run())


def test_a_client_that_leaves_cancels_its_request(digits: list[tuple[bytes, bytes]]) -> None:
    """A client that disconnects while its image waits for a batch cancels the request, as a
    gRPC client's reset cancels its call: the image leaves the queue, and the request log says
    CANCELLED at once, not OK once the batch would have run (the server waits up to 30 s to
    fill one)."""
    process = ServerProcess(
        "--workers", "1", "--max-batch-delay", "30000000", "--metrics-address", "[::1]:0"
    )  # fmt: skip
    png = digits[0][0]
    client = socket.create_connection(("::1", http_port(process)), timeout=30)
    try:
        client.sendall(
            b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
            + f"Content-Length: {len(png)}\r\nx-request-id: leaving\r\n\r\n".encode()
            + png
        )
        wait_until(
            lambda: value(scrape(process), "mnist_inference_queue_images") == 1,
            "the image in the queue",
        )
        client.close()
        line = process.log_entry(request_id="leaving")
        assert line["status"] == "CANCELLED"
        assert line["protocol"] == "http"
        wait_until(
            lambda: value(scrape(process), "mnist_inference_queue_images") == 0,
            "the queue emptied",
        )
    finally:
        client.close()
        assert process.stop() == 0
