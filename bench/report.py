"""Results: one `Row` per measurement, markdown tables with ratios to the baselines, the machine.

Ratios compare images/s with the baseline under the same model, payload, core setting and
in-flight level; PredictBatch and PredictStream rows compare with the baseline's best case,
Predict at the highest in-flight level measured (the baselines implement only Predict).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from servers import AIO, ROOT, THREADPOOL

PINNED = "1 core"
MACHINE = "machine"
ONNXRUNTIME = "onnxruntime"


@dataclass
class Row:
    """One measurement; rates are None when the scenario could not run (see `problem`)."""

    model: str
    payload: str
    rpc: str
    in_flight: int
    setting: str
    server: str
    label: str
    req_per_s: float | None = None
    images_per_s: float | None = None
    p50_ms: float | None = None
    p90_ms: float | None = None
    p99_ms: float | None = None
    client_cpu: float | None = None  # the load generator's CPU use, in cores
    checked_calls: int = 0
    errors: int = 0
    problem: str = ""


def _baseline(rows: list[Row], row: Row, server: str) -> Row | None:
    same = [
        other
        for other in rows
        if other.server == server and other.rpc == "Predict"
        and (other.model, other.payload, other.setting) == (row.model, row.payload, row.setting)
    ]  # fmt: skip
    if row.rpc == "Predict":
        return next((other for other in same if other.in_flight == row.in_flight), None)
    return max(same, key=lambda other: other.in_flight, default=None)


def _ratio(rows: list[Row], row: Row, server: str) -> str:
    base = _baseline(rows, row, server)
    if row.server == ONNXRUNTIME or base is None or not row.images_per_s or not base.images_per_s:
        return "-"
    return f"{row.images_per_s / base.images_per_s:.2f}x"


def _number(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _percent(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def _errors(row: Row) -> str:
    if not row.errors and not row.problem:
        return "0"
    problem = row.problem if len(row.problem) <= 60 else row.problem[:57] + "..."
    return f"{row.errors} ({problem})" if problem else str(row.errors)


def table(rows: list[Row], model: str) -> str:
    """The markdown table of one model's rows, in measurement order."""
    lines = [
        "| scenario | server | req/s | images/s | p50 ms | p90 ms | p99 ms | errors "
        "| vs thread pool | vs grpc.aio | client CPU |",
        "|---|---|--:|--:|--:|--:|--:|---|--:|--:|--:|",
    ]
    for row in rows:
        if row.model != model:
            continue
        lines.append(
            f"| {row.label} | {row.server} | {_number(row.req_per_s)} "
            f"| {_number(row.images_per_s)} | {_number(row.p50_ms, 2)} | {_number(row.p90_ms, 2)} "
            f"| {_number(row.p99_ms, 2)} | {_errors(row)} | {_ratio(rows, row, THREADPOOL)} "
            f"| {_ratio(rows, row, AIO)} | {_percent(row.client_cpu)} |"
        )
    return "\n".join(lines)


def tables(rows: list[Row], models: Iterable[str]) -> str:
    """One table per model, each under a heading."""
    return "\n\n".join(f"### {model} model\n\n{table(rows, model)}" for model in models)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _command_output(command: list[str]) -> str:
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    if done.returncode != 0:
        return "?"
    lines = (done.stdout or done.stderr).strip().splitlines()
    return lines[0] if lines else ""


def cpu_busy(seconds: float = 0.5) -> float | None:
    """The busy fraction of all CPUs over `seconds`, from /proc/stat; None where unavailable."""

    def sample() -> tuple[int, int]:
        fields = [int(value) for value in Path("/proc/stat").read_text().split()[1:9]]
        idle = fields[3] + fields[4]  # idle + iowait
        return sum(fields) - idle, sum(fields)

    try:
        busy_before, total_before = sample()
        time.sleep(seconds)
        busy_after, total_after = sample()
    except (OSError, ValueError):
        return None
    return (busy_after - busy_before) / max(1, total_after - total_before)


def machine() -> dict[str, str]:
    """What the numbers depend on: CPU, cores, software versions, the commit measured."""
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"])
    dirty = _command_output(["git", "status", "--porcelain", "--untracked-files=no"])
    return {
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} ({len(os.sched_getaffinity(0))} usable)",
        "os": f"{platform.system()} {platform.release()} {platform.machine()}",
        "python": platform.python_version(),
        "onnxruntime": _version("onnxruntime"),
        "grpclib": _version("grpclib"),
        "grpcio": _version("grpcio"),
        "numpy": _version("numpy"),
        "pillow": _version("pillow"),
        "h2load": _command_output(["h2load", "--version"]),
        "commit": commit + (" (with uncommitted changes)" if dirty not in ("", "?") else ""),
    }


def markdown_machine(info: dict[str, str]) -> str:
    """The machine as a markdown list."""
    return "\n".join(f"- {key}: {value}" for key, value in info.items())
