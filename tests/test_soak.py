"""The soak (bench.soak): its short form against a real server, and how it judges memory.

`nox -s soak -- --minutes 10` is the long form; here it runs for a few seconds so that CI sees
every kind of call (bad images, empty messages, 1 ms deadlines, client cancels, streams,
abandoned streams, batches) end in an expected status, with no warning in the server's log,
and file descriptors, tasks, connections and calls back to their idle counts afterwards.
A few seconds cannot judge a memory slope: the fit and its verdict are tested on samples.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def soak() -> ModuleType:
    """bench.soak, the soak's module."""
    return importlib.import_module("bench.soak")


def test_short_soak_passes_its_acceptance_bounds(tmp_path: Path) -> None:
    report_file = tmp_path / "soak.json"
    done = subprocess.run(
        [sys.executable, "-m", "bench.soak", "--minutes", "0.12", "--warmup", "2",
         "--clients", "2", "--json", str(report_file)],
        capture_output=True, text=True, timeout=300, cwd=ROOT, check=False,
    )  # fmt: skip

    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads(report_file.read_text())
    assert report["problems"] == []
    # Every kind of outcome happened, and nothing else did.
    assert {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED"} <= set(report["statuses"])
    assert report["unexpected_statuses"] == []
    assert report["server_warnings"] == 0
    assert report["request_log_lines"] > 0  # the request log was on
    assert report["fds_end"]["server"] <= report["fds_idle"]["server"]
    (idle,), (end,) = report["census_idle"], report["census_end"]
    assert idle["connections"] == end["connections"] == end["calls"] == 0
    assert end["tasks"] <= idle["tasks"]
    assert report["rss"]["server"]["samples"] >= 1
    assert report["connections_under_load"] == {"server": 2}  # a connection per client


def samples(per_minute: float, minutes: float, noise: float = 0.0) -> tuple[list[float], list]:
    times = [5.0 * i for i in range(int(60 * minutes / 5) + 1)]
    wobble = [noise * ((-1) ** i) for i in range(len(times))]
    return times, [100 + per_minute * t / 60 + w for t, w in zip(times, wobble, strict=True)]


def test_the_fit_finds_a_slope_through_noise(soak: ModuleType) -> None:
    times, rss = samples(per_minute=0.5, minutes=10, noise=2.0)
    slope, stderr = soak.fit(times, rss)
    assert 60 * slope == pytest.approx(0.5, abs=0.05)
    assert 0 < 60 * stderr < 0.1
    assert soak.fit(times[:2], rss[:2]) is None


def report(
    soak: ModuleType, rss: dict[str, list[float]], times: list[float], warmup: float
) -> dict[str, Any]:
    """A soak's report with these RSS samples, and nothing else wrong."""
    return {
        "unexpected_statuses": [],
        "rss": soak.slopes(times, rss, warmup),
        "fds_idle": dict.fromkeys(rss, 10),
        "fds_end": dict.fromkeys(rss, 10),
        "census_idle": None,
        "server_warnings": 0,
        "server_survived": True,
        "workers_kept": True,
        "statuses": {"OK": 1},
        "kinds": ["png"],
    }


@pytest.mark.parametrize(
    ("per_minute", "minutes", "broken"),
    [(0.0, 10, False), (0.05, 10, False), (0.3, 10, True), (0.3, 4, False)],
    ids=["flat", "within-bound", "growing", "growing-but-too-short-to-judge"],
)
def test_a_slope_above_the_bound_fails_the_soak_when_fitted_long_enough(
    soak: ModuleType, per_minute: float, minutes: float, broken: bool
) -> None:
    """The bound is per process (1 MB per 10 minutes); the warm-up is left out of the fit,
    and a fit over less than 5 minutes is reported, not judged."""
    times, grows = samples(per_minute, minutes, noise=0.5)
    _, flat = samples(0.0, minutes)
    warm = [v + (30 if t < 60 else 0) for t, v in zip(times, grows, strict=True)]  # warm-up
    problems = soak.failures(report(soak, {"worker-1": warm, "worker-2": flat}, times, 60.0), 0.1)

    assert bool(problems) is broken
    assert all("worker-1" in problem for problem in problems)


def test_counts_that_do_not_come_back_fail_the_soak(soak: ModuleType) -> None:
    times, flat = samples(0.0, 1)
    broken = report(soak, {"server": flat}, times, 10.0) | {
        "fds_end": {"server": 12},
        "census_idle": [{"tasks": 1, "connections": 0, "calls": 0, "stream_reads": 0}],
        "census_end": [{"tasks": 3, "connections": 1, "calls": 0, "stream_reads": 0}],
    }
    problems = soak.failures(broken, 0.1)

    assert any("open files" in problem for problem in problems)
    assert any("tasks" in problem for problem in problems)
    assert any("connections" in problem for problem in problems)


def test_kinds_that_cannot_succeed_are_not_expected_to(soak: ModuleType) -> None:
    """`--only deadline` or `--only junk` (the bisection) ends no call OK, rightly."""
    times, flat = samples(0.0, 1)
    junk_only = report(soak, {"server": flat}, times, 10.0) | {
        "kinds": ["junk"],
        "statuses": {"INVALID_ARGUMENT": 100},
    }
    assert soak.failures(junk_only, 0.1) == []
    assert soak.failures(junk_only | {"kinds": ["junk", "png"]}, 0.1) == ["no call succeeded"]
