"""Soak: mixed, hostile traffic against one server for `--minutes`, and whether its memory
stays flat.

    python -m bench.soak [--minutes 10] [--workers 1] [--clients 4] [--only KIND ...]
                         [--warmup SECONDS] [--root CHECKOUT] [--json FILE]

Starts `python -m mnist_service serve` from `--root` (this checkout by default; another one
measures a "before"), with its request log on, then `--clients` client processes, each with
its own event loop and one connection for the whole run. Each picks a kind of call at random,
with the weights of `KINDS`: valid PNGs, raw 784-byte images, 600x600 JPEGs, junk, empty
messages, 1 ms deadlines, calls cancelled mid-flight, 20-item streams with two bad items,
PredictBatch calls with bad items, and streams abandoned halfway. `--only` keeps some kinds:
issue 21's bisection ran one kind at a time.

Every `--sample-every` seconds (5) it takes the resident set of each of the server's
processes (the supervisor and every worker). After `--warmup` (a fifth of the run, at most
2 minutes) it fits a line to each process's samples, least squares, and reports its slope
in MB a minute with its standard error, and the mean level: the slope, not a start and an
end, which would tell warm-up from growth only by luck. Each worker logs its census
(`runtime.census`, SIGUSR2) before the load, after the warm-up (for the connections each
worker carries: the kernel spreads them by a hash, and may give one worker all of them) and
after the load, once the clients have gone; each process's file descriptors are counted
before and after too.

It exits 1 when a process's slope is over `--max-slope` (1 MB per 10 minutes; judged only
with 5 minutes of samples or more after the warm-up: shorter fits are reported, not judged),
when file descriptors, tasks, connections, calls or waiting stream reads do not come back to
their idle counts, when a status outside `EXPECTED` came back, when no call succeeded (among
kinds that can), or when a worker died or the server logged a warning (a client's cancel or
deadline is not the server's problem). Not a test: `nox -s soak -- --minutes 10` is the
long form, for notes and for every change to the request path (docs/operations.md);
tests/test_soak.py runs a short form in CI.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import math
import multiprocessing
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import typer
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from PIL import Image

from mnist_service.client import ItemFailure, MnistClient
from mnist_service.loadgen.latency import percentile

from .servers import ROOT, service_flags

EXPECTED = frozenset(
    {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}
)
"""What a client may see: answers, its own bad input, its own deadlines and cancels, and
(only under overload) the admission limit. Anything else, UNKNOWN or INTERNAL above all, is a
bug."""

KINDS = {
    "png": 5,
    "raw": 3,
    "jpeg": 2,
    "junk": 2,
    "empty": 1,
    "deadline": 2,
    "cancel": 2,
    "stream": 1,
    "batch": 1,
    "abandon": 1,
}
"""Each kind of call and its weight in the mix."""
ANSWERED = frozenset({"png", "raw", "jpeg", "stream", "batch"})
"""The kinds whose calls should end OK."""

MAX_SLOPE_MB_PER_MIN = 0.1
"""1 MB per 10 minutes, per process."""
JUDGED_AFTER_S = 300.0
"""A slope is judged only when fitted over this much time or more."""
STARTUP_TIMEOUT_S = 120.0
STREAM_ITEMS = 20
JPEG_SIDE = 600
DIGITS = 64

Pixels = np.ndarray[Any, np.dtype[np.uint8]]


def _digits(count: int) -> list[Pixels]:
    from training.data import load_mnist

    pixels, _ = load_mnist("test")
    return [pixels[i] for i in range(count)]


def _encode(pixels: Pixels, kind: str) -> bytes:
    """A digit as the wire carries it: raw MNIST bytes, or dark ink on white paper."""
    if kind == "raw":
        return pixels.tobytes()
    buffer = io.BytesIO()
    image = Image.fromarray(255 - pixels)
    if kind == "jpeg":  # a big photo-sized file: decoded in the decode pool
        image.resize((JPEG_SIDE, JPEG_SIDE), Image.Resampling.BILINEAR).save(
            buffer, format="JPEG", quality=85
        )
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_INPUTS = (b"\x00", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"x" * 785)


class Client:
    """One client process's workload and tallies."""

    def __init__(self, address: str, seed: int, kinds: Sequence[str]) -> None:
        self.address = address
        self.random = random.Random(seed)
        self.kinds = list(kinds)
        self.weights = [KINDS[kind] for kind in self.kinds]
        digits = _digits(DIGITS)
        self.payloads = {
            kind: [_encode(d, kind) for d in digits] for kind in ("png", "raw", "jpeg")
        }
        self.statuses: Counter[str] = Counter()
        self.latencies: list[float] = []
        self.calls = 0

    def _pick(self, kind: str) -> bytes:
        return self.random.choice(self.payloads[kind])

    def _record(self, status: Status | str) -> None:
        self.statuses[status if isinstance(status, str) else status.name] += 1

    async def run(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        async with MnistClient(self.address, timeout=30) as client:
            while time.monotonic() < end:
                kind = self.random.choices(self.kinds, self.weights)[0]
                self.calls += 1
                try:
                    await getattr(self, kind)(client)
                except GRPCError as exc:
                    self._record(exc.status)
                except TimeoutError:
                    self._record(Status.DEADLINE_EXCEEDED)  # the client's own timer

    async def _predict(self, client: MnistClient, data: bytes) -> None:
        started = time.perf_counter()
        await client.predict(data)
        self.latencies.append(time.perf_counter() - started)
        self._record(Status.OK)

    async def png(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("png"))

    async def raw(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("raw"))

    async def jpeg(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("jpeg"))

    async def junk(self, client: MnistClient) -> None:
        if self.random.random() < 0.5:
            data = self.random.choice(BAD_INPUTS)
        else:  # random bytes, never 784 of them (that would be a valid raw image)
            data = self.random.randbytes(self.random.choice([1, 2, 100, 783, 785, 4096]))
        await client.predict(data)
        self._record("OK_FOR_INVALID")  # an invalid image answered OK: a bug

    async def empty(self, client: MnistClient) -> None:
        await client.predict(b"")
        self._record("OK_FOR_INVALID")

    async def deadline(self, client: MnistClient) -> None:
        await client.predict(self._pick("png"), timeout=0.001)
        self._record(Status.OK)

    async def cancel(self, client: MnistClient) -> None:
        call = asyncio.ensure_future(client.predict(self._pick("png")))
        await asyncio.sleep(self.random.uniform(0, 0.002))
        call.cancel()
        try:
            await call
            self._record(Status.OK)  # it finished first
        except asyncio.CancelledError:
            self._record(Status.CANCELLED)

    async def stream(self, client: MnistClient) -> None:
        images = [b"bad" if i % 10 == 9 else self._pick("raw") for i in range(STREAM_ITEMS)]
        results = [item async for item in client.predict_many(images)]
        failures = sum(isinstance(result, ItemFailure) for result in results)
        self._record(Status.OK if failures == 2 and len(results) == STREAM_ITEMS else "BAD_STREAM")

    async def batch(self, client: MnistClient) -> None:
        images = [self._pick("png") for _ in range(14)] + [b"", b"garbage"]
        self.random.shuffle(images)
        results = await client.predict_batch(images)
        failures = sum(isinstance(result, ItemFailure) for result in results)
        self._record(Status.OK if failures == 2 and len(results) == 16 else "BAD_BATCH")

    async def abandon(self, client: MnistClient) -> None:
        stream = client.predict_many([self._pick("png") for _ in range(40)])
        index = 0
        async for _ in stream:
            index += 1
            if index == 10:
                break
        await stream.aclose()  # resets the call: the server sees a cancel
        self._record(Status.CANCELLED)


def _client_process(
    address: str, seed: int, kinds: list[str], seconds: float, ready: Any, go: Any, results: Any
) -> None:
    client = Client(address, seed, kinds)
    ready.put(seed)
    go.wait()
    try:
        asyncio.run(client.run(seconds))
    except (OSError, StreamTerminatedError) as exc:  # the connection itself failed: report it
        client.statuses[f"CONNECTION_ERROR {type(exc).__name__}"] += 1
    results.put((client.calls, dict(client.statuses), client.latencies))


@dataclass
class ServerUnderSoak:
    """`python -m mnist_service serve` from a checkout, its log read as it comes: warnings,
    errors and censuses kept, request lines only counted (ten minutes of them is a lot)."""

    root: Path
    workers: int
    process: subprocess.Popen[str] = field(init=False)
    port: int | None = None
    kept: list[dict[str, Any]] = field(default_factory=list)
    request_lines: int = 0
    _serving: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        command = [sys.executable, "-m", "mnist_service", "serve", "--address", "[::1]:0",
                   "--model-architecture", "conv", "--workers", str(self.workers),
                   "--intra-op-threads", "1", "--log-format", "json", "--log-level", "info",
                   "--grace-period", "2"]  # fmt: skip
        if "--http-address" in service_flags(self.root):
            command += ["--http-address", "[::1]:0"]  # gRPC alone is soaked; no fixed port
        self.process = subprocess.Popen(
            command,
            cwd=self.root,  # `-m` imports the package of the working directory first
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        threading.Thread(target=self._read, daemon=True).start()
        if not self._serving.wait(STARTUP_TIMEOUT_S) or self.port is None:
            self.stop()
            raise RuntimeError(f"the server did not start: {self.kept[-5:]}")

    def _read(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            try:
                entry = json.loads(line)
            except json.JSONDecodeError:
                entry = {"level": "raw", "message": line.rstrip("\n")}
            if not isinstance(entry, dict):
                continue
            if entry.get("logger") == "mnist_service.requests" and entry.get("level") == "info":
                self.request_lines += 1
                continue
            with self._lock:
                self.kept.append(entry)
            if self.port is None and str(entry.get("message", "")).startswith("serving"):
                self.port = int(entry["port"])
                self._serving.set()
        self._serving.set()

    @property
    def address(self) -> str:
        return f"[::1]:{self.port}"

    def processes(self) -> list[psutil.Process]:
        """The server's processes: the one started, then its workers (none with one)."""
        root = psutil.Process(self.process.pid)
        return [root, *root.children()]

    def worker_processes(self) -> list[psutil.Process]:
        processes = self.processes()
        return processes[1:] if self.workers > 1 else processes

    def census(self) -> dict[int, dict[str, Any]] | None:
        """Each worker's census (SIGUSR2), by pid; None when the checkout has none."""
        if not (self.root / "mnist_service" / "runtime" / "census.py").exists():
            return None  # a worker without the handler would die of the signal
        pids = [p.pid for p in self.worker_processes()]
        with self._lock:
            seen = len(self.kept)
        for pid in pids:
            os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            with self._lock:
                found = {
                    e["pid"]: e for e in self.kept[seen:] if e.get("message") == "memory census"
                }
            if set(pids) <= set(found):
                return {pid: found[pid] for pid in pids}
            time.sleep(0.05)
        raise RuntimeError("the workers did not log their census")

    def warnings(self) -> list[str]:
        return [json.dumps(e) for e in self.kept if e.get("level") in ("warning", "error", "raw")]

    def stop(self) -> None:
        """SIGTERM the process group (workers included), then SIGKILL what is left."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(30)
        with contextlib.suppress(ProcessLookupError):  # workers outliving their supervisor
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(10)


def fit(times: Sequence[float], values: Sequence[float]) -> tuple[float, float] | None:
    """The least-squares slope of `values` over `times`, and its standard error (None with
    fewer than three samples)."""
    n = len(times)
    if n < 3:
        return None
    mean_t, mean_v = statistics.fmean(times), statistics.fmean(values)
    sxx = sum((t - mean_t) ** 2 for t in times)
    slope = sum((t - mean_t) * (v - mean_v) for t, v in zip(times, values, strict=True)) / sxx
    residuals = [v - mean_v - slope * (t - mean_t) for t, v in zip(times, values, strict=True)]
    stderr = math.sqrt(sum(r * r for r in residuals) / (n - 2) / sxx)
    return slope, stderr


def slopes(
    times: Sequence[float], rss: dict[str, list[float]], warmup: float
) -> dict[str, dict[str, Any]]:
    """Per process (and the whole tree): the fitted slope after `warmup`, MB a minute, with
    its standard error, the mean level, and the span of the fit."""
    kept = [i for i, t in enumerate(times) if t >= warmup]
    span = times[kept[-1]] - times[kept[0]] if kept else 0.0
    series = dict(rss)
    if len(rss) > 1:
        series["tree"] = [sum(values) for values in zip(*rss.values(), strict=True)]
    out: dict[str, dict[str, Any]] = {}
    for name, values in series.items():
        fitted = fit([times[i] for i in kept], [values[i] for i in kept])
        out[name] = {
            "slope_mb_per_min": None if fitted is None else round(60 * fitted[0], 3),
            "stderr_mb_per_min": None if fitted is None else round(60 * fitted[1], 3),
            "mean_mb": round(statistics.fmean(values[i] for i in kept), 1) if kept else None,
            "fit_s": round(span),
            "samples": len(kept),
        }
    return out


def soak(
    minutes: float,
    clients: int,
    workers: int,
    kinds: list[str],
    warmup: float,
    sample_every: float,
    root: Path,
) -> dict[str, Any]:
    """Run the soak; the report as a dict."""
    seconds = 60 * minutes
    server = ServerUnderSoak(root, workers)
    procs: list[multiprocessing.process.BaseProcess] = []
    try:
        processes = server.processes()
        names = {p.pid: "server" for p in processes}
        if workers > 1:
            names = {processes[0].pid: "supervisor"}
            names |= {p.pid: f"worker-{i}" for i, p in enumerate(processes[1:], 1)}
        idle_fds = {names[p.pid]: p.num_fds() for p in processes}
        idle_census = server.census()

        context = multiprocessing.get_context("spawn")
        ready, go, results = context.Queue(), context.Event(), context.Queue()
        procs += [
            context.Process(
                target=_client_process,
                args=(server.address, seed, kinds, seconds, ready, go, results),
            )
            for seed in range(clients)
        ]
        for proc in procs:
            proc.start()
        for _ in procs:
            ready.get(timeout=STARTUP_TIMEOUT_S)
        go.set()
        started = time.monotonic()
        times: list[float] = []
        rss: dict[str, list[float]] = {name: [] for name in names.values()}
        loaded: dict[str, int] | None = None  # each worker's connections, after the warm-up
        while (elapsed := time.monotonic() - started) <= seconds:
            times.append(round(elapsed, 2))
            for process in processes:
                rss[names[process.pid]].append(round(process.memory_info().rss / 2**20, 2))
            if loaded is None and elapsed >= warmup:
                census = server.census()
                if census is not None:
                    loaded = {names[pid]: entry["connections"] for pid, entry in census.items()}
            time.sleep(max(0.0, started + len(times) * sample_every - time.monotonic()))
        outcomes = [results.get(timeout=120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)

        # The clients have gone; their sockets are released on the server's next loop turns.
        deadline = time.monotonic() + 10
        while True:
            end_fds = {names[p.pid]: p.num_fds() for p in processes}
            if all(end_fds[n] <= idle_fds[n] for n in names.values()):
                break
            if time.monotonic() > deadline:
                break
            time.sleep(0.2)
        end_census = server.census()
        still_up = server.process.poll() is None
        same_workers = {p.pid for p in server.processes()} == set(names)
        warnings = server.warnings()
        request_lines = server.request_lines
    finally:
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        server.stop()

    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    calls = 0
    for count, tally, times_taken in outcomes:
        calls += count
        statuses.update(tally)
        latencies.extend(times_taken)
    latencies.sort()
    return {
        "root": str(root),
        "minutes": minutes,
        "warmup_s": warmup,
        "kinds": kinds,
        "clients": clients,
        "workers": workers,
        "calls": calls,
        "calls_per_s": round(calls / seconds, 1),
        "request_log_lines": request_lines,
        "statuses": dict(statuses.most_common()),
        "unexpected_statuses": sorted(set(statuses) - EXPECTED),
        "predict_p50_ms": round(1000 * percentile(latencies, 50), 2) if latencies else None,
        "predict_p99_ms": round(1000 * percentile(latencies, 99), 2) if latencies else None,
        "rss": slopes(times, rss, warmup),
        "connections_under_load": loaded,
        "fds_idle": idle_fds,
        "fds_end": end_fds,
        "census_idle": _brief(idle_census),
        "census_end": _brief(end_census),
        "server_survived": still_up,
        "workers_kept": same_workers,
        "server_warnings": len(warnings),
        "first_warning": warnings[0][:3000] if warnings else None,
        "samples": {"t_s": times, "rss_mb": rss},
    }


COME_BACK = ("tasks", "connections", "calls", "stream_reads")
"""Census counts that must be back to their idle values after the load."""


def _brief(census: dict[int, dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """Each worker's census, without its lists (by type, tracemalloc's lines)."""
    if census is None:
        return None
    keys = ("rss_mb", "threads", "gc_objects", "handlers", *COME_BACK)
    return [{key: entry.get(key) for key in keys} for entry in census.values()]


def failures(report: dict[str, Any], max_slope: float) -> list[str]:
    """What broke the acceptance bounds (empty: none)."""
    problems = []
    if report["unexpected_statuses"]:
        problems.append(f"unexpected statuses: {report['unexpected_statuses']}")
    for name, fitted in report["rss"].items():
        if name == "tree" or fitted["slope_mb_per_min"] is None:
            continue
        if fitted["fit_s"] < JUDGED_AFTER_S:
            continue
        if fitted["slope_mb_per_min"] > max_slope:
            problems.append(
                f"{name}'s RSS grows {fitted['slope_mb_per_min']:.3f} MB/min "
                f"(± {fitted['stderr_mb_per_min']:.3f}; bound {max_slope})"
            )
    for name, idle in report["fds_idle"].items():
        if report["fds_end"][name] > idle:
            problems.append(f"{name}'s open files: {idle} idle, {report['fds_end'][name]} after")
    if report["census_idle"] is not None:
        for index, (idle, end) in enumerate(
            zip(report["census_idle"], report["census_end"], strict=True), 1
        ):
            for key in COME_BACK:
                if end[key] > idle[key]:
                    problems.append(f"worker {index}'s {key}: {idle[key]} idle, {end[key]} after")
    if report["server_warnings"]:
        problems.append(f"the server logged {report['server_warnings']} warnings or errors")
    if not report["server_survived"] or not report["workers_kept"]:
        problems.append("the server or a worker died")
    if set(report["kinds"]) & ANSWERED and not report["statuses"].get("OK"):
        problems.append("no call succeeded")
    return problems


def _print(report: dict[str, Any]) -> None:
    shown = {key: value for key, value in report.items() if key not in ("rss", "samples")}
    width = max(len(key) for key in shown)
    for key, value in shown.items():
        print(f"{key:<{width}}  {value}")
    print("RSS after the warm-up: mean level and fitted slope (± standard error)")
    for name, fitted in report["rss"].items():
        if fitted["slope_mb_per_min"] is None:
            print(f"  {name:<10} {fitted['mean_mb']} MB  (too few samples for a slope)")
            continue
        judged = "" if fitted["fit_s"] >= JUDGED_AFTER_S else ", too short to judge"
        print(
            f"  {name:<10} {fitted['mean_mb']} MB  {fitted['slope_mb_per_min']:+.3f} "
            f"± {fitted['stderr_mb_per_min']:.3f} MB/min "
            f"({10 * fitted['slope_mb_per_min']:+.2f} MB per 10 min; "
            f"{fitted['samples']} samples over {fitted['fit_s']} s{judged})"
        )


def main(
    minutes: Annotated[float, typer.Option(help="Minutes of load, warm-up included.")] = 10,
    clients: Annotated[int, typer.Option(help="Client processes, one connection each.")] = 4,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    only: Annotated[
        list[str] | None, typer.Option(help=f"Only these kinds of call: {', '.join(KINDS)}.")
    ] = None,
    warmup: Annotated[
        float | None,
        typer.Option(help="Seconds before the fit [default: a fifth of the run, at most 120]."),
    ] = None,
    sample_every: Annotated[float, typer.Option(help="Seconds between RSS samples.")] = 5,
    max_slope: Annotated[
        float, typer.Option(help="Bound on each process's RSS slope, MB a minute.")
    ] = MAX_SLOPE_MB_PER_MIN,
    root: Annotated[Path, typer.Option(help="The checkout whose server to soak.")] = ROOT,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Soak one server with a mixed, hostile workload; print the report; exit 1 on a breach."""
    kinds = only or list(KINDS)
    unknown = sorted(set(kinds) - set(KINDS))
    if unknown:
        raise typer.BadParameter(f"unknown kinds {unknown}; the kinds are {list(KINDS)}")
    if warmup is None:
        warmup = min(120.0, 12 * minutes)
    report = soak(minutes, clients, workers, kinds, warmup, sample_every, root.resolve())
    problems = failures(report, max_slope)
    report["problems"] = problems
    _print(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        raise typer.Exit(1)
    print("soak passed")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    typer.run(main)
