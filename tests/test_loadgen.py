"""`mnist-service load` and mnist_service.loadgen: payloads, the report, and real runs.

Runs last about a second against a real server and assert on correctness only (counts, error
statuses, the report's shape), never on timings.
"""

from __future__ import annotations

import asyncio
import io
import json
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from mnist_service import loadgen
from mnist_service.cli import app
from mnist_service.errors import ConfigError
from mnist_service.loadgen import (
    LatencySummary,
    LoadConfig,
    LoadReport,
    Payload,
    Progress,
    generated_digits,
    load_images,
    run_load,
)
from mnist_service.loadgen import format_report as format_load_report

from .conftest import ServerProcess

runner = CliRunner()
MODES = ["unary", "batch", "stream"]
RUN_TIMEOUT_S = 60


def load(address: str, *args: str, command: str = "load") -> dict[str, Any]:
    """`load --json` for about a second; the parsed report."""
    result = runner.invoke(
        app,
        [command, "--address", address, "--duration", "1", "--concurrency", "4", "--json", *args],
    )
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


# --- pure parts ---------------------------------------------------------------------------------


def test_the_public_names_are_the_packages_api() -> None:
    """Each name of `__all__` is there once, public, and what the CLI uses is among them."""
    assert len(set(loadgen.__all__)) == len(loadgen.__all__)
    assert all(hasattr(loadgen, name) for name in loadgen.__all__)
    assert {"LoadConfig", "run", "format_report", "percentile"} <= set(loadgen.__all__)
    assert not any(name.startswith("_") for name in loadgen.__all__)


def test_generated_digits_are_mnist_form_png_or_raw() -> None:
    pngs = generated_digits()
    raws = generated_digits(raw=True)

    assert [p.expected for p in pngs] == list(range(10))
    image = Image.open(io.BytesIO(pngs[3].data))
    assert (image.format, image.size, image.mode) == ("PNG", (28, 28), "L")
    assert all(len(p.data) == 784 for p in raws)
    pixels = np.frombuffer(raws[8].data, dtype=np.uint8).reshape(28, 28)
    assert pixels[0].max() == 0  # white ink on black, inside the 20x20 box
    assert pixels.max() > 200


def test_load_images_reads_files_and_directories(tmp_path: Path) -> None:
    (tmp_path / "b.png").write_bytes(b"B")
    (tmp_path / "a.png").write_bytes(b"A")
    (tmp_path / ".hidden").write_bytes(b"H")
    single = tmp_path / "single.bin"
    single.write_bytes(b"S")

    payloads = load_images([tmp_path / "a.png", tmp_path])

    assert [p.data for p in payloads] == [b"A", b"A", b"B", b"S"]
    with pytest.raises(ConfigError, match="no such file"):
        load_images([tmp_path / "missing.png"])


@pytest.mark.parametrize(
    "changes",
    [
        pytest.param({"mode": "sideways"}, id="mode"),
        pytest.param({"concurrency": 0}, id="concurrency"),
        pytest.param({"duration_s": 0}, id="duration"),
        pytest.param({"duration_s": float("inf")}, id="infinite-duration"),
        pytest.param({"connections": 0}, id="connections"),
        pytest.param({"payloads": ()}, id="no-payloads"),
        pytest.param({"address": "nowhere"}, id="address"),
    ],
)
def test_load_config_refuses_bad_settings(changes: dict[str, Any]) -> None:
    settings: dict[str, Any] = {"address": "[::1]:1", "payloads": (Payload(b"x", "x"),)}
    with pytest.raises(ConfigError):
        LoadConfig(**{**settings, **changes})


def test_connections_never_outnumber_callers() -> None:
    payloads = (Payload(b"x", "x"),)

    assert LoadConfig(address="[::1]:1", payloads=payloads, concurrency=3).connection_count == 3
    assert LoadConfig(address="[::1]:1", payloads=payloads, concurrency=64).connection_count == 16
    many = LoadConfig(address="[::1]:1", payloads=payloads, concurrency=64, connections=40)
    assert many.connection_count == 40


def test_a_cpu_bound_client_is_called_out() -> None:
    report = LoadReport(
        mode="unary",
        address="[::1]:1",
        concurrency=1,
        connections=1,
        batch_size=None,
        payloads=1,
        duration_s=1.0,
        elapsed_s=1.0,
        interrupted=False,
        requests=10,
        images=10,
        classified=10,
        latency=LatencySummary(
            of="call", count=10, mean_ms=1, p50_ms=1, p90_ms=1, p99_ms=1, max_ms=1
        ),
        errors={},
        item_errors={},
        server=None,
        model_check=None,
        client_cpu_s=0.97,
        event_loop="asyncio",
    )

    assert report.cpu_bound
    assert report.to_json()["client"]["cpu_bound"] is True
    assert "WARNING: the client was CPU-bound" in format_load_report(report)


# --- against a real server ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_load_classifies_every_generated_digit(server: ServerProcess, mode: str) -> None:
    report = load(server.address, "--mode", mode, "--batch-size", "8", "--model-check")

    assert report["mode"] == mode
    assert report["requests"] > 0
    assert report["images"] >= report["requests"]
    assert report["classified"] == report["images"]
    assert report["errors"] == {}
    assert report["item_errors"] == {}
    assert report["interrupted"] is False
    assert report["latency_ms"]["of"] == ("image" if mode == "stream" else "call")
    assert report["latency_ms"]["count"] == report["requests"]
    assert 0 <= report["latency_ms"]["p50"] <= report["latency_ms"]["p99"]
    assert report["latency_ms"]["p99"] <= report["latency_ms"]["max"]
    assert report["batch_size"] == (8 if mode == "batch" else None)
    assert report["connections"] == 4
    assert report["server"]["architecture"] == "conv"
    assert report["model_check"]["references"] == 10
    assert report["model_check"]["mismatched"] == 0
    assert set(report["client"]) == {"cpu_s", "busy", "cpu_bound", "event_loop"}


def test_bench_is_the_former_name_of_load_unlisted(server: ServerProcess) -> None:
    """Scripts that call `mnist-service bench` keep working; `--help` lists `load` only."""
    report = load(server.address, "--mode", "batch", "--batch-size", "8", command="bench")

    assert report["mode"] == "batch"
    assert report["requests"] > 0
    assert report["classified"] == report["images"]
    assert report["errors"] == {}
    listed = runner.invoke(app, ["--help"], env={"COLUMNS": "200"}).stdout
    assert " load " in listed
    assert " bench " not in listed


@pytest.mark.parametrize("mode", MODES)
def test_load_counts_invalid_images_by_status(
    server: ServerProcess, mode: str, tmp_path: Path
) -> None:
    junk = tmp_path / "notes.txt"
    junk.write_text("this is not an image")

    report = load(server.address, "--mode", mode, "--batch-size", "4", "--images", str(junk))

    assert report["requests"] > 0
    assert report["classified"] == 0
    if mode == "unary":  # the call fails
        assert report["errors"] == {"INVALID_ARGUMENT": report["requests"]}
        assert report["item_errors"] == {}
    else:  # the call succeeds, its items fail
        assert report["errors"] == {}
        assert report["item_errors"] == {"INVALID_ARGUMENT": report["images"]}


def test_load_sends_raw_pixels_and_prints_a_readable_report(server: ServerProcess) -> None:
    result = runner.invoke(
        app, ["load", "-a", server.address, "-d", "1", "-c", "2", "--raw", "--connections", "1"]
    )

    assert result.exit_code == 0, result.output
    assert "unary: 2 callers (Predict) on 1 connection(s)" in result.stdout
    for label in ("requests", "images", "latency ms  p50", "errors      none", "client CPU"):
        assert label in result.stdout


def test_load_without_a_server_fails_in_one_line() -> None:
    with socket.socket(socket.AF_INET6) as probe:  # a port nobody listens on
        probe.bind(("::1", 0))
        port = probe.getsockname()[1]

    result = runner.invoke(app, ["load", "-a", f"[::1]:{port}", "-d", "1", "--timeout", "5"])

    assert result.exit_code == 1
    assert result.output.startswith(f"mnist-service: error: cannot load [::1]:{port}:")


def test_load_refuses_raw_with_image_files(tmp_path: Path) -> None:
    result = runner.invoke(app, ["load", "--raw", "--images", str(tmp_path)])

    assert result.exit_code == 1
    assert "--raw" in result.output


async def test_stopping_a_run_returns_the_partial_report(server: ServerProcess) -> None:
    stop = asyncio.Event()
    seen: list[Progress] = []

    def progress(snapshot: Progress) -> None:
        seen.append(snapshot)
        if snapshot.requests > 0:
            stop.set()

    config = LoadConfig(
        address=server.address, payloads=generated_digits(), concurrency=2, duration_s=60
    )
    report = await asyncio.wait_for(
        run_load(config, on_progress=progress, progress_interval_s=0.05, stop=stop),
        RUN_TIMEOUT_S,
    )

    assert report.interrupted
    assert seen
    assert report.requests >= seen[-1].requests > 0
    assert report.errors == {}


def test_ctrl_c_prints_the_partial_report(server: ServerProcess) -> None:
    command = [sys.executable, "-m", "mnist_service", "load", "-a", server.address]
    command += ["--duration", "60", "--concurrency", "2", "--json"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert process.stderr is not None
        first_progress = process.stderr.readline()  # every 5 s when stderr is not a terminal
        assert "requests" in first_progress, first_progress
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 130, stderr
    report = json.loads(stdout)
    assert report["interrupted"] is True
    assert report["requests"] > 0
    assert report["errors"] == {}
