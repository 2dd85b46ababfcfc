"""Results: one `Row` per measurement, markdown tables with ratios to the baselines, the machine.

Ratios compare images/s with the baseline under the same model, payload, core setting and
in-flight level; PredictBatch and PredictStream rows compare with the baseline's best case,
Predict at the highest in-flight level measured (the baselines implement only Predict). A
PredictBatch of mixed kinds compares with what the baseline's Predict would do on the same
mix: the harmonic mean of its best Predict rates on those kinds (the time per image averaged).
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

from .payloads import USER_KINDS
from .servers import AIO, ROOT, THREADPOOL

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
    wrong_labels: int = 0
    """Checked calls answered with another label than the digit's where that is tolerated: a
    baseline's naive preprocessing on a kind that is not MNIST format."""
    mix: list[str] = field(default_factory=list)
    """The payload kinds a mixed batch cycles through (`payload` is then "mixed")."""


def _baseline(rows: list[Row], row: Row, server: str, payload: str) -> Row | None:
    same = [
        other
        for other in rows
        if other.server == server and other.rpc == "Predict"
        and (other.model, other.payload, other.setting) == (row.model, payload, row.setting)
    ]  # fmt: skip
    if row.rpc == "Predict":
        return next((other for other in same if other.in_flight == row.in_flight), None)
    return max(same, key=lambda other: other.in_flight, default=None)


def _baseline_rate(rows: list[Row], row: Row, server: str) -> float | None:
    """The baseline's images/s to divide by (None: not measured)."""
    rates = [
        base.images_per_s if base is not None else None
        for base in (_baseline(rows, row, server, kind) for kind in row.mix or [row.payload])
    ]
    if not all(rates):
        return None
    return len(rates) / sum(1 / rate for rate in rates if rate)


def _ratio(rows: list[Row], row: Row, server: str) -> str:
    base = _baseline_rate(rows, row, server)
    if row.server == ONNXRUNTIME or base is None or not row.images_per_s:
        return "-"
    return f"{row.images_per_s / base:.2f}x"


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


def notes(rows: list[Row], model: str) -> str:
    """What a reader of one model's table must know about the baselines' answers."""
    mine = [row for row in rows if row.model == model]
    lines = []
    if any(row.payload in USER_KINDS or row.mix for row in mine):
        lines.append(BASELINE_NOTE)
    wrong: dict[str, dict[str, list[int]]] = {}  # server -> payload -> [wrong, checked]
    for row in mine:
        if row.wrong_labels:
            counts = wrong.setdefault(row.server, {}).setdefault(row.payload, [0, 0])
            counts[0] += row.wrong_labels
            counts[1] += row.checked_calls
    if wrong:
        servers = "; ".join(
            f"{server} on " + ", ".join(f"{kind} ({bad} of {checked} checks)"
                                        for kind, (bad, checked) in kinds.items())
            for server, kinds in wrong.items()
        )  # fmt: skip
        lines.append(f"Wrong labels, not counted as errors: {servers}.")
    return "\n\n".join(lines)


BASELINE_NOTE = (
    "The baselines preprocess naively: 784 bytes are taken as raw pixels; anything else is "
    'decoded by Pillow in full, `convert("L")` (alpha dropped), resized to 28x28 (bicubic) and '
    "scaled to 0-1, with no inversion, cropping or centring. So on the kinds that are not MNIST "
    "format they do the decoding and resizing but answer mostly wrong (a black-on-transparent "
    "canvas becomes an all-black image): their labels are checked only on MNIST-format kinds, "
    "the service's on every kind."
)


def tables(rows: list[Row], models: Iterable[str], cpu: str | None = None) -> str:
    """One table per model under a heading that names the CPU, each followed by its notes."""
    on = f", on {cpu}" if cpu else ""
    parts = []
    for model in models:
        parts.append(f"### {model} model{on}\n\n{table(rows, model)}")
        note = notes(rows, model)
        if note:
            parts.append(note)
    return "\n\n".join(parts)


def cpu_model() -> str:
    """The CPU's model name, with family/model/stepping where the name is vague (VMs often
    report only "AMD EPYC"), and whether it is a virtual machine."""
    fields: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
            if not line.strip():
                break  # the first processor is enough
    except OSError:
        return platform.processor() or "unknown"
    name = fields.get("model name") or platform.processor() or "unknown"
    detail = [
        f"{key} {fields[key]}" for key in ("cpu family", "model", "stepping") if key in fields
    ]
    if "hypervisor" in fields.get("flags", "").split():
        detail.append("virtual machine")
    return f"{name} ({', '.join(detail)})" if detail else name


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
        "cpu": cpu_model(),
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
