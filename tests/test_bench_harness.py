"""The benchmark harness in bench/ works: servers start, grpc-status checks pass, tables fill.

Correctness only, never timings. Needs h2load (Debian/Ubuntu package nghttp2-client), which
pip cannot install: without it these tests are skipped, unless MNIST_REQUIRE_H2LOAD=1 (set by
.ci/run, which installs it) makes its absence a failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
BENCH_MODULES = ("run", "load", "report", "servers", "stubs", "mnist_pb2", "mnist_pb2_grpc")


@pytest.fixture(scope="module", autouse=True)
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
def bench() -> Iterator[ModuleType]:
    """bench/run.py imported as the script sees its siblings; removed again afterwards."""
    sys.path.insert(0, str(BENCH))
    try:
        import run  # type: ignore[import-not-found]

        yield run
    finally:
        sys.path.remove(str(BENCH))
        for name in BENCH_MODULES:
            sys.modules.pop(name, None)


def test_smoke_run_measures_the_service_and_a_baseline_with_ok_grpc_checks(
    tmp_path: Path,
) -> None:
    output = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, str(BENCH / "run.py"), "--smoke", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
        check=False,
    )

    assert done.returncode == 0, done.stderr
    rows = json.loads(output.read_text())["rows"]
    assert [(row["server"], row["rpc"], row["payload"], row["in_flight"]) for row in rows] == [
        ("mnist-service", "Predict", "raw", 8),
        ("grpcio thread pool", "Predict", "raw", 8),
        ("mnist-service", "ModelInfer", "raw", 8),
    ]
    for row in rows:
        assert (row["errors"], row["problem"]) == (0, "")
        assert row["checked_calls"] == 6  # three calls before the timed run, three after
        assert row["req_per_s"] is not None
        assert row["p99_ms"] is not None
    assert "| Predict raw, 8 in flight | mnist-service |" in done.stdout
    assert "| Predict raw, 8 in flight | grpcio thread pool |" in done.stdout
    assert "| ModelInfer (OIP) raw, 8 in flight | mnist-service |" in done.stdout


def test_a_failing_grpc_status_is_reported_as_errors_not_raised(
    bench: ModuleType, tmp_path: Path
) -> None:
    """The baselines have no PredictBatch: the row says UNIMPLEMENTED and has no numbers."""
    with bench.ServerPool() as pool:
        baseline = pool.baseline(bench.THREADPOOL, "conv", None)
        harness = bench.Bench(bench.SMOKE, bench.Cores(None, None), tmp_path)
        payload = bench.Payload.write("raw", tmp_path)
        row = bench.Row("conv", "raw", "PredictBatch", 4, bench.PINNED, bench.THREADPOOL, "batch")
        harness.attempt(row, baseline, harness.batch, payload)

    assert row.errors == 3
    assert row.problem.startswith("UNIMPLEMENTED")
    assert row.images_per_s is None
    assert "| batch | grpcio thread pool | - | - | - | - | - | 3 (UNIMPLEMENTED" in (
        bench.report.table([row], "conv")
    )


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
