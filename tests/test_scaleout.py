"""Scale-out behind a real nginx, in short form: bench.scaleout with a few seconds a phase.

Three real replicas, nginx in front (`grpc_pass` to an upstream of the three), grpcio clients
sending Predict and PredictBatch through it the whole time. One replica is drained (SIGTERM),
another killed (SIGKILL), then both are restarted on their ports. `nox -s scaleout` runs the
same script for longer.

The SIGKILL bound: nginx does not resend a gRPC request once it has sent it to a replica (the
request body is never buffered), so a call fails only if its request went out on a connection
to the killed replica, either in flight when it died or sent on an idle keepalive connection
before nginx saw it close. nginx runs one call at a time per upstream connection and then
closes a broken one, so each connection to the killed replica fails at most one call; nginx
holds no more connections to one replica than it had calls in flight, at most
`clients x threads` (8 here). After that, connects are refused and nginx tries another replica.

Needs nginx (Debian package `nginx`), which pip cannot install: without it this test is
skipped, unless MNIST_REQUIRE_NGINX=1 (set by .ci/run, which installs it) makes its absence a
failure.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CLIENTS, THREADS = 2, 4
IN_FLIGHT = CLIENTS * THREADS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", autouse=True)
def nginx() -> str:
    """nginx's path; without it there is no load balancer (a failure where it is required)."""
    path = shutil.which("nginx") or (
        "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None
    )
    if path is None:
        reason = "nginx not found: install it with apt-get install nginx (.ci/run does)"
        if os.environ.get("MNIST_REQUIRE_NGINX") == "1":
            pytest.fail(reason)
        pytest.skip(reason)
    return path


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One short run of bench.scaleout (about 20 s), shared by the tests below."""
    report_file = tmp_path_factory.mktemp("scaleout") / "scaleout.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.scaleout", "--warmup", "1", "--steady", "3",
         "--phase", "4", "--recovered", "4", "--clients", str(CLIENTS), "--threads",
         str(THREADS), "--json", str(report_file)],
        capture_output=True, text=True, timeout=110, cwd=ROOT, check=False,
    )  # fmt: skip
    output = done.stdout[-4000:] + done.stderr[-4000:]
    assert report_file.exists(), output
    result: dict[str, Any] = json.loads(report_file.read_text())
    result["output"] = output
    result["returncode"] = done.returncode
    return result


def phase(report: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in report["phases"] if p["phase"] == name)


def test_the_run_passes_its_own_acceptance_bounds(report: dict[str, Any]) -> None:
    assert report["problems"] == [], report["output"]
    assert report["returncode"] == 0, report["output"]


def test_calls_flow_through_nginx_to_all_three_replicas_in_steady_state(
    report: dict[str, Any],
) -> None:
    steady = phase(report, "steady")
    assert steady["failed"] == 0
    assert steady["ok"] > 0
    assert all(served > 0 for served in steady["served_by_replica"].values()), steady
    assert sum(steady["served_by_replica"].values()) == pytest.approx(steady["ok"], rel=0.1)


def test_a_draining_replica_fails_no_call(report: dict[str, Any]) -> None:
    sigterm = phase(report, "sigterm")
    assert sigterm["ok"] > 0
    assert sigterm["failed"] == 0, sigterm
    # nginx did send calls at the drained replica's closed port, and moved them elsewhere.
    assert sigterm["nginx_errors"].get("connect() failed (retried elsewhere)", 0) >= 1, sigterm
    drained = report["replica_processes"]["r0"]["processes"][0]
    assert drained["exit_code"] == 0
    assert drained["drained"]["calls_cut_off"] == 0


def test_a_killed_replica_fails_at_most_the_calls_sent_to_it(report: dict[str, Any]) -> None:
    sigkill = phase(report, "sigkill")
    assert sigkill["ok"] > 0
    assert sigkill["failed"] <= IN_FLIGHT, sigkill
    # nginx answers 502 for a call it could not finish; grpcio reports that as UNAVAILABLE.
    assert set(sigkill["failures"]) <= {"UNAVAILABLE"}, sigkill
    assert report["replica_processes"]["r1"]["processes"][0]["exit_code"] == -9


def test_traffic_returns_to_both_restarted_replicas(report: dict[str, Any]) -> None:
    recovered = phase(report, "recovered")
    assert recovered["failed"] == 0
    assert phase(report, "restarting")["failed"] == 0
    for replica in ("r0", "r1"):
        assert len(report["replica_processes"][replica]["processes"]) == 2
        # Round robin gives each a third once nginx's 1 s fail_timeout has passed.
        assert recovered["served_by_replica"][replica] >= 0.15 * recovered["ok"], recovered


def test_every_replica_still_running_at_the_end_drains_and_exits_0(
    report: dict[str, Any],
) -> None:
    last = [entry["processes"][-1] for entry in report["replica_processes"].values()]
    assert [process["exit_code"] for process in last] == [0, 0, 0]
    assert all(process["drained"]["calls_cut_off"] == 0 for process in last)
    assert all(process["warnings"] == [] for process in last)
    assert report["nginx_exit_code"] == 0
