"""The benchmark harness in bench/ works: servers start, grpc-status checks pass, tables fill,
and the payload kinds are the files they claim to be.

Correctness only, never timings. The tests that run servers need h2load (Debian/Ubuntu package
nghttp2-client), which pip cannot install: without it they are skipped, unless
MNIST_REQUIRE_H2LOAD=1 (set by .ci/run, which installs it) makes its absence a failure.
"""

from __future__ import annotations

import importlib
import io
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from mnist_service.engine.preprocess import is_mnist_format

ROOT = Path(__file__).resolve().parent.parent
USER_KINDS = ("noisy-28", "inverted-28", "canvas-280", "photo-1024")
needs_h2load = pytest.mark.usefixtures("h2load")


@pytest.fixture(scope="module")
def h2load() -> str:
    """h2load's path; without it the harness cannot run (a failure where it is required)."""
    path = shutil.which("h2load")
    if path is None:
        reason = "h2load not found: install nghttp2-client (apt-get install nghttp2-client)"
        if os.environ.get("MNIST_REQUIRE_H2LOAD") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture
def bench() -> ModuleType:
    """bench.run, the harness's module (which imports the rest of the package)."""
    return importlib.import_module("bench.run")


@needs_h2load
def test_smoke_run_measures_the_service_and_a_baseline_with_ok_grpc_checks(
    tmp_path: Path,
) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.run", "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())["rows"]
    results = json.loads(output.read_text())
    rows = results["rows"]
    assert [(row["server"], row["rpc"], row["payload"], row["in_flight"]) for row in rows] == [
        ("mnist-service", "Predict", "raw", 8),
        ("grpcio thread pool", "Predict", "raw", 8),
        ("mnist-service", "ModelInfer", "raw", 8),
        ("mnist-service", "Predict", "photo-1024", 8),
        ("grpcio thread pool", "Predict", "photo-1024", 8),
    ]
    for row in rows:
        assert (row["errors"], row["problem"]) == (0, "")
        assert row["checked_calls"] == 6  # three calls before the timed run, three after
        assert row["req_per_s"] is not None
        assert row["p99_ms"] is not None
        if row["server"] == "mnist-service":
            assert row["wrong_labels"] == 0  # demanded: a wrong one would be an error
    assert "| Predict raw, 8 in flight | mnist-service |" in done.stdout
    assert "| Predict raw, 8 in flight | grpcio thread pool |" in done.stdout
    assert "| ModelInfer (OIP) raw, 8 in flight | mnist-service |" in done.stdout
    assert "| Predict photo-1024, 8 in flight | grpcio thread pool |" in done.stdout
    assert "The baselines preprocess naively" in done.stdout
    cpu = results["machine"]["cpu"]
    assert cpu not in ("", "unknown")
    assert f"### conv model, on {cpu}" in done.stdout
    assert results["settings"]["kinds"].keys() == {"raw", "photo-1024"}


@needs_h2load
def test_a_failing_grpc_status_is_reported_as_errors_not_raised(
    bench: ModuleType, tmp_path: Path
) -> None:
    """The baselines have no PredictBatch: the row says UNIMPLEMENTED and has no numbers."""
    with bench.ServerPool() as pool:
        baseline = pool.baseline(bench.THREADPOOL, "conv", None)
        harness = bench.Bench(bench.SMOKE, bench.Cores(None, None), tmp_path)
        batch = bench.Batch.write(("raw",), tmp_path)
        row = bench.Row("conv", "raw", "PredictBatch", 4, bench.PINNED, bench.THREADPOOL, "batch")
        harness.attempt(row, baseline, harness.batch, batch)

    assert row.errors == 3
    assert row.problem.startswith("UNIMPLEMENTED")
    assert row.images_per_s is None
    assert "| batch | grpcio thread pool | - | - | - | - | - | 3 (UNIMPLEMENTED" in (
        bench.report.table([row], "conv")
    )


@needs_h2load
def test_latency_rows_run_in_alternating_rounds_and_report_the_median(
    bench: ModuleType, tmp_path: Path
) -> None:
    """One call in flight: each server is measured `latency_rounds` times, taking turns."""
    plan = bench.replace(bench.SMOKE, in_flight=(1,), seconds=2, warmup_s=0.2, latency_rounds=2)
    assert plan.round_seconds == 1
    order: list[str] = []
    with bench.ServerPool() as pool:
        service = pool.service("conv", None, workers=1, flags=bench.service_flags(), extra=[])
        baseline = pool.baseline(bench.THREADPOOL, "conv", None)
        harness = bench.Bench(plan, bench.Cores(None, None), tmp_path)
        payload = bench.Payload.write("raw", tmp_path)
        rows = [
            bench.Row("conv", "raw", "Predict", 1, bench.PINNED, name, f"latency {name}")
            for name in (bench.SERVICE, bench.THREADPOOL)
        ]
        for _ in range(plan.latency_rounds):
            for row, server in zip(rows, (service, baseline), strict=True):
                harness.attempt(row, server, harness.predict, payload, 1, 1)
                order.append(row.server)

    assert order == [bench.SERVICE, bench.THREADPOOL] * 2
    assert harness.rows == rows  # each row once, however many rounds it had
    for row in rows:
        assert (row.errors, row.problem) == (0, "")
        assert row.checked_calls == 12  # two rounds, each with three checks before and after
        runs = harness._runs[id(row)]
        assert len(runs) == 2
        assert row.p99_ms == pytest.approx(sum(run.percentile(99) for run in runs) / 2)
        assert row.req_per_s == pytest.approx(sum(run.rate for run in runs) / 2)


def _decoded(data: bytes) -> Image.Image:
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


@pytest.mark.parametrize("kind", ["mnist-png", *USER_KINDS])
def test_every_file_kind_is_a_deterministic_file_pillow_decodes(
    bench: ModuleType, kind: str
) -> None:
    pixels, _ = bench._digits()
    data = bench.payloads.render(kind, pixels[0], 0)

    assert bench.payloads.render(kind, pixels[0], 0) == data
    assert bench.payloads.render(kind, pixels[1], 1) != data
    assert bench.payloads.problems(kind, data) == []
    assert _decoded(data).format in ("PNG", "JPEG")


def test_the_user_kinds_are_what_users_send_and_not_mnist_format(bench: ModuleType) -> None:
    pixels, _ = bench._digits()
    digit = pixels[0]
    noisy, inverted, canvas, photo = (
        _decoded(bench.payloads.render(kind, digit, 0)) for kind in USER_KINDS
    )

    assert (noisy.mode, noisy.size, is_mnist_format(noisy)) == ("L", (28, 28), False)
    noise = np.asarray(noisy)[digit == 0]
    assert (noise.min(), noise.max()) == (1, 12)  # faint, and nothing left at black
    assert (np.asarray(noisy)[digit > 0] == digit[digit > 0]).all()  # the digit itself intact

    assert (inverted.mode, inverted.size, is_mnist_format(inverted)) == ("L", (28, 28), False)
    assert (np.asarray(inverted) == 255 - digit).all()

    assert (canvas.format, canvas.mode, canvas.size) == ("PNG", "RGBA", (280, 280))
    rgba = np.asarray(canvas)
    assert not rgba[..., :3].any()  # black strokes...
    alpha = rgba[..., 3]
    assert alpha.max() == 255  # ...only in alpha...
    assert np.mean(alpha == 0) > 0.5  # ...on a transparent canvas

    assert (photo.format, photo.mode) == ("JPEG", "RGB")
    width, height = photo.size
    assert width >= 1024
    assert height >= 768
    grey = np.asarray(photo.convert("L"))
    assert np.median(grey) > 150  # light paper...
    assert grey.min() < 80  # ...with dark ink


def test_a_file_that_does_not_match_its_kind_is_refused(bench: ModuleType) -> None:
    """A noisy-28 file that turned into MNIST format would measure the wrong path."""
    pixels, _ = bench._digits()
    plain = bench.payloads.render("mnist-png", pixels[0], 0)

    with pytest.raises(ValueError, match="is_mnist_format"):
        bench.payloads.verify("noisy-28", plain)
    with pytest.raises(ValueError, match="format, mode, size"):
        bench.payloads.verify("photo-1024", plain)


def test_a_mixed_batch_is_compared_with_the_baselines_rate_on_the_same_mix(
    bench: ModuleType,
) -> None:
    """One image of each of two kinds takes the baseline 1/100 s + 1/300 s: 150 images/s."""

    def row(server: str, rpc: str, payload: str, images_per_s: float, **extra: object) -> object:
        return bench.Row("conv", payload, rpc, 64, bench.PINNED, server, f"{rpc} {payload}",
                         images_per_s=images_per_s, **extra)  # fmt: skip

    rows = [
        row(bench.THREADPOOL, "Predict", "noisy-28", 100.0),
        row(bench.THREADPOOL, "Predict", "photo-1024", 300.0),
        row(bench.SERVICE, "PredictBatch", "mixed", 300.0, mix=["noisy-28", "photo-1024"]),
        row(bench.SERVICE, "PredictBatch", "mixed", 300.0, mix=["noisy-28", "canvas-280"]),
    ]

    lines = bench.report.table(rows, "conv").splitlines()
    assert "| 2.00x | - |" in lines[4]
    assert "| - | - |" in lines[5]  # canvas-280 was not measured on the baseline: no ratio
