"""Server processes under test: mnist-service and the two baselines, pinned or not.

Each server is a child process in its own session, on a free [::1] port, announced by a JSON
line with "serving" and "port". `ServerPool` stops every process it started, even on failure.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import IO, Self

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 10.0
WEIGHTS = {
    "conv": ROOT / "weights" / "mnist_convnet.onnx",
    "mlp": ROOT / "weights" / "mnist_mlp.onnx",
}

SERVICE = "mnist-service"
THREADPOOL = "grpcio thread pool"
AIO = "grpc.aio"


def pinned(core: int | None, command: Sequence[str]) -> list[str]:
    """`command` under `taskset -c core`, or unchanged when `core` is None."""
    return ["taskset", "-c", str(core), *command] if core is not None else list(command)


def service_flags(root: Path = ROOT) -> set[str]:
    """The long options `mnist-service serve` accepts in the checkout at `root` (the CLI is
    still growing, and an older checkout may lack some)."""
    help_text = subprocess.run(
        [sys.executable, "-m", "mnist_service", "serve", "--help"],
        capture_output=True, text=True, timeout=60, cwd=root, check=True,
        env={**os.environ, "COLUMNS": "200", "TERM": "dumb", "NO_COLOR": "1"},
    ).stdout  # fmt: skip
    return {word.strip("│,[]") for word in help_text.split() if word.startswith("--")}


@dataclass
class Server:
    """One running server process; `logs` keeps every line it printed on `stream`."""

    name: str
    process: subprocess.Popen[str]
    stream: IO[str]
    logs: list[str] = field(default_factory=list)
    port: int | None = None
    _started: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        # Drain the pipe for the process's whole life: a full pipe would block the server.
        threading.Thread(target=self._read, daemon=True).start()
        if not self._started.wait(STARTUP_TIMEOUT_S) or self.port is None:
            self.stop()
            raise RuntimeError(f"{self.name} did not start: {''.join(self.logs[-20:])}")

    def _read(self) -> None:
        for line in self.stream:
            self.logs.append(line)
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                continue
            if self.port is None and str(entry.get("message", "")).startswith("serving"):
                self.port = int(entry["port"])
                self._started.set()
        self._started.set()

    @property
    def address(self) -> str:
        return f"[::1]:{self.port}"

    def stop(self) -> None:
        """SIGTERM the process group (multi-process servers have children), then SIGKILL."""
        if self.process.poll() is None:
            _signal_group(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                _signal_group(self.process.pid, signal.SIGKILL)
                self.process.wait(STOP_TIMEOUT_S)
        # Children of a multi-process server may outlive their parent for a moment.
        _signal_group(self.process.pid, signal.SIGKILL)
        self.stream.close()


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):  # already gone
        os.killpg(pgid, sig)


def _spawn(name: str, command: list[str], *, announce_on_stdout: bool) -> Server:
    process = subprocess.Popen(
        command,
        stdout=subprocess.PIPE if announce_on_stdout else subprocess.DEVNULL,
        stderr=subprocess.STDOUT if announce_on_stdout else subprocess.PIPE,
        text=True,
        cwd=ROOT,
        start_new_session=True,  # its own process group, so stop() reaches worker processes
    )
    stream = process.stdout if announce_on_stdout else process.stderr
    assert stream is not None
    return Server(name, process, stream)


class ServerPool:
    """Starts servers and stops all of them on exit, whatever happened in between."""

    def __init__(self) -> None:
        self._servers: list[Server] = []

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop_all()

    def stop_all(self) -> None:
        """Stop every server started so far."""
        while self._servers:
            self._servers.pop().stop()

    def service(
        self, model: str, core: int | None, *, workers: int, flags: set[str], extra: Sequence[str]
    ) -> Server:
        """`python -m mnist_service serve` with `workers` and one onnxruntime thread each."""
        command = [sys.executable, "-m", "mnist_service", "serve", "--address", "[::1]:0",
                   "--model-architecture", model, "--log-format", "json", "--log-level", "info",
                   "--grace-period", "2", "--workers", str(workers)]  # fmt: skip
        if "--intra-op-threads" in flags:
            command += ["--intra-op-threads", "1"]
        if "--http-address" in flags:
            command += ["--http-address", "off"]  # gRPC is benchmarked; 8080 may be taken
        if "--no-access-log" in flags:
            # The baselines log nothing per call; the request log's own cost (about 20 us of
            # CPU a call) is measured apart, in docs/operations.md.
            command += ["--no-access-log"]
        return self._add(
            _spawn(SERVICE, pinned(core, [*command, *extra]), announce_on_stdout=False)
        )

    def baseline(self, name: str, model: str, core: int | None) -> Server:
        """One of the baselines in bench/, in its natural configuration."""
        module = {THREADPOOL: "bench.baseline_threadpool", AIO: "bench.baseline_aio"}[name]
        command = [sys.executable, "-m", module, "--model", str(WEIGHTS[model])]
        return self._add(_spawn(name, pinned(core, command), announce_on_stdout=True))

    def _add(self, server: Server) -> Server:
        self._servers.append(server)
        return server
