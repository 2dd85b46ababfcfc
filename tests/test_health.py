"""Probes: `python -m mnist_service health` for exec probes and HEALTHCHECK, and the standard
health service as a Kubernetes kubelet's native gRPC probe calls it."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import grpc
import pytest
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from .conftest import ROOT, ServerProcess


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    process = ServerProcess("--workers", "1", "--log-level", "info")
    yield process
    assert process.stop() == 0


def health(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "mnist_service", "health", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, check=False,
    )  # fmt: skip


@pytest.mark.parametrize("service", ["", "mnist.Mnist"])
def test_health_exits_0_when_serving(server: ServerProcess, service: str) -> None:
    done = health("--address", server.address, "--service", service)

    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "SERVING"


def test_health_exits_1_for_an_unknown_service(server: ServerProcess) -> None:
    done = health("--address", server.address, "--service", "no.Such")

    assert done.returncode == 1
    assert "Traceback" not in done.stderr


def test_health_exits_1_promptly_when_nothing_listens() -> None:
    with socket.socket(socket.AF_INET6) as sock:  # a port nobody listens on
        sock.bind(("::1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    done = health("--address", f"[::1]:{port}", "--timeout", "3")

    assert done.returncode == 1
    assert time.monotonic() - started < 30
    assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    ("service", "expected"),
    [("", HealthCheckResponse.SERVING), ("mnist.Mnist", HealthCheckResponse.SERVING)],
)
def test_a_kubelet_grpc_probe_gets_serving(
    server: ServerProcess, service: str, expected: int
) -> None:
    # What the kubelet's native gRPC probe sends (k8s.io/kubernetes/pkg/probe/grpc): a plain
    # grpc.health.v1.Health/Check with the probe's `service`, user agent kube-probe, no TLS.
    with grpc.insecure_channel(
        server.address, options=[("grpc.primary_user_agent", "kube-probe/1.30")]
    ) as channel:
        check = channel.unary_unary(
            "/grpc.health.v1.Health/Check",
            request_serializer=HealthCheckRequest.SerializeToString,
            response_deserializer=HealthCheckResponse.FromString,
        )
        reply = check(HealthCheckRequest(service=service), timeout=5)

    assert reply.status == expected
