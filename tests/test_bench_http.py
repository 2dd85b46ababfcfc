"""The HTTP rows' harness (bench/http_rows.py) runs: our server starts, h2load --h1 drives each
request kind, every answer is a 2xx, and the rows are written. Correctness only, never
timings; KServe's and MLServer's rows need their virtualenvs from PyPI and run in the
benchmark alone. Skipped without h2load, unless MNIST_REQUIRE_H2LOAD=1 (set by .ci/run)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_http_rows_run_against_mnist_service(tmp_path: Path) -> None:
    if shutil.which("h2load") is None:
        reason = "h2load not found: install nghttp2-client (apt-get install nghttp2-client)"
        if os.environ.get("MNIST_REQUIRE_H2LOAD") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    out = tmp_path / "http.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.http_rows", "--servers", "mnist-service",
         "--seconds", "1", "--in-flight", "1", "--in-flight", "4", "--json", str(out)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stderr
    rows = json.loads(out.read_text())
    assert {(row["request"], row["in_flight"]) for row in rows} == {
        (request, level)
        for request in ("POST /v1/predict png", "infer fp32-json", "infer fp32-binary")
        for level in (1, 4)
    }
    for row in rows:
        assert row["failed"] == 0, row
        assert row["rate"] > 0, row
