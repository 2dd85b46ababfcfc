"""Soak: a mixed, hostile workload against one server process for a fixed time.

    python bench/soak.py [--seconds 60] [--clients 3] [--workers 1] [--json FILE]

Starts `python -m mnist_service serve` (one worker by default, so one process to watch), then
runs several client processes, each with its own event loop and connection, for `--seconds`.
Each picks operations at random: Predict with PNG, JPEG, raw and undecodable images,
Predict with a 1 ms deadline, Predict cancelled by the client mid-call, PredictBatch with a
few bad items, PredictStream with every tenth item bad, and a stream abandoned halfway.

It reports calls made, statuses by code, Predict latency p50/p99, and the server's RSS and
open file descriptors after warm-up and at the end (psutil), and exits 1 if the acceptance
bounds are broken: a status outside the expected set, RSS growth over `--max-rss-growth-mb`,
more open file descriptors at the end than after warm-up, or any warning in the server's log
(a client's cancel or deadline is not the server's problem). Not a test: `nox -s soak` runs
it for a minute; tests/test_soak.py runs a short form in CI.
"""

from __future__ import annotations

import asyncio
import io
import json
import multiprocessing
import os
import random
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import psutil
import typer
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from grpclib.const import Status  # noqa: E402
from grpclib.exceptions import GRPCError, StreamTerminatedError  # noqa: E402
from servers import ServerPool, service_flags  # noqa: E402

from mnist_service.client import ItemFailure, MnistClient  # noqa: E402

EXPECTED = frozenset(
    {"OK", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "CANCELLED", "RESOURCE_EXHAUSTED"}
)
"""What a client may see: answers, its own bad input, its own deadlines and cancels, and
(only under overload) the admission limit. Anything else, UNKNOWN or INTERNAL above all, is a
bug."""

OPERATIONS = (
    ("predict_png", 6),
    ("predict_raw", 3),
    ("predict_jpeg", 2),
    ("predict_invalid", 2),
    ("predict_short_deadline", 2),
    ("predict_cancelled", 2),
    ("batch_mixed", 1),
    ("stream_mixed", 1),
    ("stream_abandoned", 1),
)


def _images(count: int) -> list[np.ndarray[Any, np.dtype[np.uint8]]]:
    from training.data import load_mnist

    pixels, _ = load_mnist("test")
    return [pixels[i] for i in range(count)]


def _encode(pixels: np.ndarray[Any, np.dtype[np.uint8]], kind: str) -> bytes:
    if kind == "raw":
        return pixels.tobytes()
    buffer = io.BytesIO()
    image = Image.fromarray(255 - pixels)  # dark ink on white paper, like a scan
    if kind == "jpeg":
        image.resize((112, 112)).save(buffer, format="JPEG", quality=70)
    else:
        image.save(buffer, format="PNG")
    return buffer.getvalue()


BAD_INPUTS = (b"", b"\x00", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, b"x" * 785)


class Client:
    """One client process's workload and tallies."""

    def __init__(self, address: str, seed: int) -> None:
        self.address = address
        self.random = random.Random(seed)
        digits = _images(64)
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
        names = [name for name, _ in OPERATIONS]
        weights = [weight for _, weight in OPERATIONS]
        end = time.monotonic() + seconds
        async with MnistClient(self.address, timeout=30) as client:
            while time.monotonic() < end:
                operation = self.random.choices(names, weights)[0]
                self.calls += 1
                try:
                    await getattr(self, operation)(client)
                except GRPCError as exc:
                    self._record(exc.status)
                except TimeoutError:
                    self._record(Status.DEADLINE_EXCEEDED)  # the client's own timer

    async def _predict(
        self, client: MnistClient, data: bytes, timeout: float | None = None
    ) -> None:
        started = time.perf_counter()
        await client.predict(data, timeout=timeout)
        self.latencies.append(time.perf_counter() - started)
        self._record(Status.OK)

    async def predict_png(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("png"))

    async def predict_raw(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("raw"))

    async def predict_jpeg(self, client: MnistClient) -> None:
        await self._predict(client, self._pick("jpeg"))

    async def predict_invalid(self, client: MnistClient) -> None:
        await client.predict(self.random.choice(BAD_INPUTS))
        self._record("OK_FOR_INVALID")  # an invalid image answered OK: a bug

    async def predict_short_deadline(self, client: MnistClient) -> None:
        await client.predict(self._pick("png"), timeout=0.001)
        self._record(Status.OK)

    async def predict_cancelled(self, client: MnistClient) -> None:
        call = asyncio.ensure_future(client.predict(self._pick("png")))
        await asyncio.sleep(self.random.uniform(0, 0.002))
        call.cancel()
        try:
            await call
            self._record(Status.OK)  # it finished first
        except asyncio.CancelledError:
            self._record(Status.CANCELLED)

    async def batch_mixed(self, client: MnistClient) -> None:
        images = [self._pick("png") for _ in range(14)] + [b"", b"garbage"]
        self.random.shuffle(images)
        results = await client.predict_batch(images)
        failures = sum(isinstance(result, ItemFailure) for result in results)
        self._record(Status.OK if failures == 2 and len(results) == 16 else "WRONG_BATCH")

    async def stream_mixed(self, client: MnistClient) -> None:
        images = [b"bad" if i % 10 == 9 else self._pick("raw") for i in range(50)]
        results = [item async for item in client.predict_many(images)]
        failures = sum(isinstance(result, ItemFailure) for result in results)
        self._record(Status.OK if failures == 5 and len(results) == 50 else "WRONG_STREAM")

    async def stream_abandoned(self, client: MnistClient) -> None:
        stream = client.predict_many([self._pick("png") for _ in range(40)])
        async for index, _ in _enumerate(stream):
            if index == 10:
                break
        await stream.aclose()  # resets the call: the server sees a cancel
        self._record(Status.CANCELLED)


async def _enumerate(items: Any) -> Any:
    index = 0
    async for item in items:
        yield index, item
        index += 1


def _client_process(address: str, seed: int, seconds: float, results: Any) -> None:
    client = Client(address, seed)
    try:
        asyncio.run(client.run(seconds))
    except (OSError, StreamTerminatedError) as exc:  # the connection itself failed: report it
        client.statuses[f"CONNECTION_ERROR {type(exc).__name__}"] += 1
    results.put((client.calls, dict(client.statuses), client.latencies))


def _level(line: str) -> str | None:
    try:
        entry = json.loads(line)
    except json.JSONDecodeError:
        return None
    return str(entry.get("level")) if isinstance(entry, dict) else None


def _sample(process: psutil.Process) -> dict[str, float]:
    return {"rss_mb": process.memory_info().rss / 2**20, "fds": process.num_fds()}


def _settled(process: psutil.Process, start: dict[str, float]) -> dict[str, float]:
    """The end sample, once the clients' last connections have closed on the server's side
    too (a socket the client closed is released on the server's next loop turns): up to 5 s
    for the file descriptors to come back to the start's count, whatever they are then."""
    deadline = time.monotonic() + 5
    sample = _sample(process)
    while sample["fds"] > start["fds"] and time.monotonic() < deadline:
        time.sleep(0.1)
        sample = _sample(process)
    return sample


def soak(seconds: float, clients: int, workers: int, warmup: float) -> dict[str, Any]:
    """Run the soak; the report as a dict."""
    extra: list[str] = []
    with ServerPool() as pool:
        server = pool.service("conv", None, workers=workers, flags=service_flags(), extra=extra)
        process = psutil.Process(server.process.pid)
        watched = process.children()[0] if workers > 1 else process
        context = multiprocessing.get_context("spawn")
        results = context.Queue()
        procs = [
            context.Process(
                target=_client_process, args=(server.address, seed, seconds + warmup, results)
            )
            for seed in range(clients)
        ]
        for proc in procs:
            proc.start()
        time.sleep(warmup)
        start = _sample(watched)
        peak_rss = start["rss_mb"]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            time.sleep(0.5)
            peak_rss = max(peak_rss, _sample(watched)["rss_mb"])
        outcomes = [results.get(timeout=seconds + 120) for _ in procs]
        for proc in procs:
            proc.join(timeout=30)
        end = _settled(watched, start)
        still_up = server.process.poll() is None
        warnings = [line.strip() for line in server.logs if _level(line) in ("warning", "error")]

    statuses: Counter[str] = Counter()
    latencies: list[float] = []
    calls = 0
    for count, tally, times in outcomes:
        calls += count
        statuses.update(tally)
        latencies.extend(times)
    latencies.sort()
    unexpected = sorted(set(statuses) - EXPECTED)
    return {
        "seconds": seconds,
        "warmup_s": warmup,
        "clients": clients,
        "workers": workers,
        "calls": calls,
        "calls_per_s": round(calls / (seconds + warmup), 1),
        "statuses": dict(statuses.most_common()),
        "predict_p50_ms": round(1000 * statistics.median(latencies), 2) if latencies else None,
        "predict_p99_ms": round(1000 * latencies[int(0.99 * (len(latencies) - 1))], 2)
        if latencies
        else None,
        "rss_mb_start": round(start["rss_mb"], 1),
        "rss_mb_end": round(end["rss_mb"], 1),
        "rss_mb_peak": round(peak_rss, 1),
        "fds_start": start["fds"],
        "fds_end": end["fds"],
        "server_survived": still_up,
        "server_warnings": len(warnings),
        "first_warning": warnings[0][:3000] if warnings else None,
        "unexpected_statuses": unexpected,
    }


def failures(report: dict[str, Any], max_rss_growth_mb: float) -> list[str]:
    """What broke the acceptance bounds (empty: none)."""
    problems = []
    if report["unexpected_statuses"]:
        problems.append(f"unexpected statuses: {report['unexpected_statuses']}")
    growth = report["rss_mb_end"] - report["rss_mb_start"]
    if growth > max_rss_growth_mb:
        problems.append(f"RSS grew {growth:.1f} MB (bound {max_rss_growth_mb} MB)")
    if report["fds_end"] > report["fds_start"]:
        problems.append(f"open file descriptors grew {report['fds_start']} -> {report['fds_end']}")
    if report["server_warnings"]:
        problems.append(f"the server logged {report['server_warnings']} warnings or errors")
    if not report["server_survived"]:
        problems.append("the server died")
    if not report["statuses"].get("OK"):
        problems.append("no call succeeded")
    return problems


def main(
    seconds: Annotated[float, typer.Option(help="Measured seconds, after the warm-up.")] = 60,
    clients: Annotated[int, typer.Option(help="Client processes, one connection each.")] = 3,
    workers: Annotated[int, typer.Option(help="Server worker processes.")] = 1,
    warmup: Annotated[float, typer.Option(help="Seconds of load before the first sample.")] = 5,
    max_rss_growth_mb: Annotated[float, typer.Option(help="Acceptance bound on RSS growth.")] = 20,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Soak one server with a mixed, hostile workload; print the report; exit 1 on a breach."""
    report = soak(seconds, clients, workers, warmup)
    problems = failures(report, max_rss_growth_mb)
    report["problems"] = problems
    width = max(len(key) for key in report)
    for key, value in report.items():
        print(f"{key:<{width}}  {value}")
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if problems:
        print("FAILED: " + "; ".join(problems), file=sys.stderr)
        raise typer.Exit(1)
    print("soak passed")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    typer.run(main)
