"""HTTP rows of the benchmark: mnist-service's HTTP API beside KServe's Python model server and
MLServer serving the same ONNX ConvNet.

    python -m bench.http_rows [--seconds 10] [--json bench-results/http.json]

Each server runs one process pinned to core 1 (onnxruntime with one intra-op thread); h2load
speaks HTTP/1.1 (`--h1`) from core 0, one request in flight per connection, 1 and 64
connections. Rows: `POST /v1/predict` with a PNG (ours), and the Open Inference Protocol's
`POST /v2/models/mnist_convnet/infer` with one FP32 image as JSON (all three) and as binary
tensor data (ours and KServe's; MLServer has no binary extension). KServe and MLServer come
from PyPI into their own virtualenvs under `~/.cache/mnist-service/bench-venvs/`
(`MNIST_BENCH_VENVS` moves them; built on first use), with the small
custom model classes in `bench/oip_kserve_model.py` and `bench/oip_mlserver_model.py`.
Latency percentiles follow `mnist_service.loadgen.latency`, the one definition. Numbers, not
assertions: tests/test_bench_http.py only checks that the harness runs.
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

from mnist_service.loadgen import generated_digits
from mnist_service.loadgen.latency import percentile

from .load import h2load_path
from .servers import ROOT, WEIGHTS, pinned

VENVS = Path(
    os.environ.get("MNIST_BENCH_VENVS", Path.home() / ".cache" / "mnist-service" / "bench-venvs")
)
"""Outside the checkout: the tool-import rules read every module under bench/."""
KSERVE = ("kserve==0.21.0", "onnxruntime")
MLSERVER = ("mlserver==1.7.1", "onnxruntime")
INFER = "/v2/models/mnist_convnet/infer"
SERVER_CORE, CLIENT_CORE = 1, 0
STARTUP_S = 120.0
WARMUP_S = 2.0


@dataclass(frozen=True)
class Row:
    server: str
    request: str
    in_flight: int
    rate: float
    p50_ms: float | None
    p99_ms: float | None
    failed: int
    client_cpu: float


def venv(name: str, requirements: Sequence[str]) -> Path:
    """The python of the virtualenv `<name>` under `VENVS`, built with pip on first use."""
    root = VENVS / name
    python = root / "bin" / "python"
    marker = root / ".complete"
    if marker.exists() and marker.read_text() == " ".join(requirements):
        return python
    shutil.rmtree(root, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True)
    subprocess.run([str(python), "-m", "pip", "install", "-q", *requirements], check=True)
    marker.write_text(" ".join(requirements))
    return python


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextmanager
def running(command: list[str], port: int, cwd: Path | None = None) -> Iterator[None]:
    """A server process until the block ends; ready when `GET /v2/health/ready` says 200."""
    with tempfile.TemporaryFile("w+") as log:
        process = subprocess.Popen(
            pinned(SERVER_CORE, command), stdout=log, stderr=subprocess.STDOUT, cwd=cwd,
            start_new_session=True,
        )  # fmt: skip
        try:
            deadline = time.monotonic() + STARTUP_S
            while not _ready(port):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    raise RuntimeError(f"{command[:3]} did not start:\n{log.read()[-3000:]}")
                time.sleep(0.2)
            yield
        finally:
            os.killpg(process.pid, 15)
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, 9)
                process.wait()


def _ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v2/health/ready", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, ConnectionError, OSError):
        return False


def h1load(
    port: int, path: str, body: Path, headers: Sequence[str], in_flight: int, seconds: int
) -> tuple[float, list[float], int, float]:
    """(requests/s, latencies in ms of the 2xx answers, failures, client CPU share)."""
    with tempfile.TemporaryDirectory() as folder:
        log_file = Path(folder) / "h2load.log"
        command = [h2load_path(), "--h1", "-D", str(seconds),
                   "--warm-up-time", f"{int(WARMUP_S * 1000)}ms", "-c", str(in_flight),
                   "-m", "1", "-t", "1", "-d", str(body), "--log-file", str(log_file),
                   *(f"-H{header}" for header in headers),
                   f"http://127.0.0.1:{port}{path}"]  # fmt: skip
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        done = subprocess.run(
            pinned(CLIENT_CORE, command), capture_output=True, text=True, check=False,
            timeout=seconds + WARMUP_S + 60,
        )  # fmt: skip
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if done.returncode != 0:
            raise RuntimeError(f"h2load failed: {done.stderr or done.stdout}")
        latencies = []
        for line in log_file.read_text().splitlines():
            _, status, duration_us = line.split("\t")[:3]
            if status.startswith("2"):
                latencies.append(int(duration_us) / 1000)
        counts = re.search(r"(\d+) failed, (\d+) errored", done.stdout)
        codes = re.search(r"(\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", done.stdout)
        if counts is None or codes is None:
            raise RuntimeError(f"cannot parse h2load output:\n{done.stdout}")
        failed = sum(map(int, counts.groups())) + sum(map(int, codes.groups()[1:]))
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return len(latencies) / seconds, sorted(latencies), failed, cpu / (seconds + WARMUP_S)


def bodies(folder: Path) -> dict[str, tuple[Path, list[str]]]:
    """Request bodies and headers: a PNG, FP32 JSON and FP32 binary of the digit 4."""
    four = next(p for p in generated_digits(raw=True) if p.expected == 4)
    png = next(p for p in generated_digits() if p.expected == 4)
    floats = np.frombuffer(four.data, np.uint8).astype(np.float32) / np.float32(255)
    tensor = {"name": "image", "datatype": "FP32", "shape": [1, 1, 28, 28]}
    as_json = {"inputs": [{**tensor, "data": floats.tolist()}]}
    raw = floats.astype("<f4").tobytes()
    head = json.dumps(
        {"inputs": [{**tensor, "parameters": {"binary_data_size": len(raw)}}],
         "outputs": [{"name": "probabilities", "parameters": {"binary_data": True}}]}
    ).encode()  # fmt: skip
    files = {"png": png.data, "fp32-json": json.dumps(as_json).encode(), "fp32-binary": head + raw}
    for name, data in files.items():
        (folder / name).write_bytes(data)
    json_type = ["content-type: application/json"]
    return {
        "png": (folder / "png", ["content-type: image/png"]),
        "fp32-json": (folder / "fp32-json", json_type),
        "fp32-binary": (
            folder / "fp32-binary",
            [
                "content-type: application/octet-stream",
                f"inference-header-content-length: {len(head)}",
            ],
        ),
    }


def main(
    seconds: Annotated[int, typer.Option(help="Seconds per run, after a 2 s warm-up.")] = 10,
    in_flight: Annotated[list[int] | None, typer.Option(help="Connections (repeatable).")] = None,
    servers: Annotated[
        list[str] | None, typer.Option(help="mnist-service, kserve, mlserver (repeatable).")
    ] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the rows here.")] = None,
) -> None:
    """Run the HTTP rows and print them as a table."""
    levels = in_flight or [1, 64]
    chosen = servers or ["mnist-service", "kserve", "mlserver"]
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        requests = bodies(folder)
        for name in chosen:
            port = free_port()
            command, cwd, kinds = _server(name, port, folder)
            with running(command, port, cwd):
                for kind in kinds:
                    body, headers = requests[kind]
                    path = "/v1/predict" if kind == "png" else INFER
                    for level in levels:
                        rate, latencies, failed, cpu = h1load(
                            port, path, body, headers, level, seconds
                        )
                        row = Row(
                            name, f"{'POST /v1/predict' if kind == 'png' else 'infer'} {kind}",
                            level, round(rate, 1),
                            round(percentile(latencies, 50), 3) if latencies else None,
                            round(percentile(latencies, 99), 3) if latencies else None,
                            failed, round(cpu, 2),
                        )  # fmt: skip
                        rows.append(row)
                        typer.echo(_line(row))
    if json_out is not None:
        json_out.parent.mkdir(parents=True, exist_ok=True)
        json_out.write_text(json.dumps([asdict(row) for row in rows], indent=2))


def _server(name: str, port: int, folder: Path) -> tuple[list[str], Path | None, list[str]]:
    weights = str(WEIGHTS["conv"])
    if name == "mnist-service":
        command = [sys.executable, "-m", "mnist_service", "serve", "--workers", "1",
                   "--address", "[::1]:0", "--http-address", f"127.0.0.1:{port}",
                   "--log-format", "json"]  # fmt: skip
        return command, ROOT, ["png", "fp32-json", "fp32-binary"]
    if name == "kserve":
        python = venv("kserve", KSERVE)
        script = str(Path(__file__).resolve().parent / "oip_kserve_model.py")
        return [str(python), script, weights, str(port), str(free_port())], folder, [
            "fp32-json", "fp32-binary",
        ]  # fmt: skip
    if name == "mlserver":
        python = venv("mlserver", MLSERVER)
        model = folder / "mlserver" / "mnist_convnet"
        model.mkdir(parents=True, exist_ok=True)
        shutil.copy(Path(__file__).resolve().parent / "oip_mlserver_model.py", model)
        (model / "model-settings.json").write_text(json.dumps(
            {"name": "mnist_convnet", "implementation": "oip_mlserver_model.OnnxMnist",
             "parameters": {"uri": weights}}
        ))  # fmt: skip
        (model.parent / "settings.json").write_text(json.dumps(
            {"http_port": port, "grpc_port": free_port(), "parallel_workers": 0,
             "metrics_endpoint": None, "debug": False}
        ))  # fmt: skip
        start = "from mlserver.cli.main import main; main()"
        return [str(python), "-c", start, "start", str(model.parent)], model.parent, ["fp32-json"]
    raise typer.BadParameter(f"unknown server {name!r}")


def _line(row: Row) -> str:
    p50 = f"{row.p50_ms:.2f}" if row.p50_ms is not None else "-"
    p99 = f"{row.p99_ms:.2f}" if row.p99_ms is not None else "-"
    return (
        f"{row.server:14} {row.request:28} {row.in_flight:3} in flight  {row.rate:9.1f} req/s"
        f"  p50 {p50:>7} ms  p99 {p99:>7} ms  failed {row.failed}  client cpu {row.client_cpu}"
    )


if __name__ == "__main__":
    typer.run(main)
