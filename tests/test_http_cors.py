"""CORS for pages on other origins (`--cors-allow-origin`), and the headers browsers read:
`Server-Timing` and `x-request-id` on every answer, errors included."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .conftest import MnistSplit, ServerProcess, png_bytes
from .http_client import base_url, request

APP = "https://app.example.com"


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess(
        "--workers", "1", "--cors-allow-origin", f"{APP},http://localhost:3000"
    )  # fmt: skip
    yield process
    assert process.stop() == 0


def test_a_preflight_from_an_allowed_origin_is_answered(server: ServerProcess) -> None:
    answer = request(
        base_url(server) + "/v1/predict",
        method="OPTIONS",
        headers={
            "Origin": APP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type, x-request-id",
        },
    )

    assert answer.status == 204
    assert answer.headers["access-control-allow-origin"] == APP
    assert "POST" in answer.headers["access-control-allow-methods"]
    assert "x-request-id" in answer.headers["access-control-allow-headers"]
    assert answer.headers["vary"] == "Origin"


def test_a_preflight_from_another_origin_is_refused(server: ServerProcess) -> None:
    answer = request(
        base_url(server) + "/v1/predict",
        method="OPTIONS",
        headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
    )

    assert answer.status == 403
    assert answer.json()["error"]["code"] == "PERMISSION_DENIED"
    assert "access-control-allow-origin" not in answer.headers


def test_answers_to_an_allowed_origin_expose_timing_and_request_id(
    server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    png = png_bytes(mnist_test_set[0][0])
    answer = request(
        base_url(server) + "/v1/predict",
        png,
        headers={"Origin": "http://localhost:3000", "Content-Type": "image/png"},
    )

    assert answer.status == 200
    assert answer.headers["access-control-allow-origin"] == "http://localhost:3000"
    exposed = answer.headers["access-control-expose-headers"]
    assert "server-timing" in exposed
    assert "x-request-id" in exposed
    assert answer.headers["timing-allow-origin"] == "http://localhost:3000"


def test_errors_carry_timing_and_request_id_too(server: ServerProcess) -> None:
    answer = request(
        base_url(server) + "/v1/predict",
        b"",
        headers={"Content-Type": "image/png", "x-request-id": "empty-1", "Origin": APP},
    )

    assert answer.status == 400
    assert answer.headers["x-request-id"] == "empty-1"
    assert "total;dur=" in answer.headers["server-timing"]
    assert answer.headers["access-control-allow-origin"] == APP


def test_no_cors_headers_without_an_origin_or_for_others(server: ServerProcess) -> None:
    plain = request(base_url(server) + "/v2/health/live")
    other = request(base_url(server) + "/v2/health/live", headers={"Origin": "https://x.example"})

    assert "access-control-allow-origin" not in plain.headers
    assert "access-control-allow-origin" not in other.headers
    assert other.status == 200  # the browser, not the server, keeps the answer from the page
