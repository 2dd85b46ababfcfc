"""Measure a real server on loopback: unary latency, unary throughput, stream throughput.

    python scripts/bench.py [--requests 2000] [--concurrency 32] [--architecture conv]

Starts `python -m mnist_service serve` on a free [::1] port, sends real MNIST test digits as
PNG files with the async client, prints a table and writes JSON to bench-results/. Every loop
is bounded in count and in time. Not a test: nothing here asserts on timings.
"""

from __future__ import annotations

import asyncio
import io
import json
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mnist_service.client import MnistClient  # noqa: E402
from training.data import load_mnist  # noqa: E402

TIME_LIMIT_S = 120.0


def start_server(architecture: str) -> tuple[subprocess.Popen[str], str]:
    """Start a server on a free loopback port; return it and its address."""
    process = subprocess.Popen(
        [sys.executable, "-m", "mnist_service", "serve", "--address", "[::1]:0",
         "--model-architecture", architecture, "--log-format", "json", "--log-level", "info"],
        stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert process.stderr is not None
    for line in process.stderr:
        entry = json.loads(line)
        if str(entry.get("message", "")).startswith("serving"):
            return process, f"[::1]:{entry['port']}"
    raise RuntimeError("server did not start")


def pngs(count: int) -> list[bytes]:
    images, _ = load_mnist("test")
    encoded = []
    for image in images[:count]:
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    return encoded


async def timed_calls(
    call: Callable[[bytes], Awaitable[object]], payloads: list[bytes], concurrency: int
) -> tuple[list[float], float]:
    """Run one call per payload with `concurrency` workers; latencies (ms) and wall time (s)."""
    latencies: list[float] = []
    queue = list(reversed(payloads))
    deadline = time.perf_counter() + TIME_LIMIT_S

    async def worker() -> None:
        while queue and time.perf_counter() < deadline:
            payload = queue.pop()
            started = time.perf_counter()
            await call(payload)
            latencies.append((time.perf_counter() - started) * 1000)

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return latencies, time.perf_counter() - started


def summary(name: str, latencies: list[float], wall_s: float) -> dict[str, float | str]:
    quantiles = statistics.quantiles(latencies, n=100) if len(latencies) > 1 else latencies * 99
    return {
        "scenario": name,
        "requests": len(latencies),
        "throughput_rps": round(len(latencies) / wall_s, 1),
        "p50_ms": round(quantiles[49], 3),
        "p90_ms": round(quantiles[89], 3),
        "p99_ms": round(quantiles[98], 3),
    }


async def run(
    address: str, payloads: list[bytes], concurrency: int
) -> list[dict[str, float | str]]:
    results = []
    async with MnistClient(address) as client:
        await timed_calls(client.predict, payloads[:100], 4)  # warm-up
        latencies, wall = await timed_calls(client.predict, payloads, 1)
        results.append(summary("unary, 1 in flight", latencies, wall))
        latencies, wall = await timed_calls(client.predict, payloads, concurrency)
        results.append(summary(f"unary, {concurrency} in flight", latencies, wall))
        started = time.perf_counter()
        count = 0
        async for _ in client.predict_many(payloads, timeout=TIME_LIMIT_S):
            count += 1
        wall = time.perf_counter() - started
        results.append({"scenario": "PredictStream, one call", "requests": count,
                        "throughput_rps": round(count / wall, 1)})  # fmt: skip
    return results


def main(
    requests: Annotated[int, typer.Option(help="Calls per scenario.")] = 2000,
    concurrency: Annotated[int, typer.Option(help="In-flight calls, second scenario.")] = 32,
    architecture: Annotated[str, typer.Option(help="mlp or conv.")] = "conv",
    output_dir: Annotated[Path, typer.Option(help="Where to write JSON.")] = ROOT / "bench-results",
) -> None:
    """Benchmark a local server and print a table."""
    payloads = pngs(requests)
    process, address = start_server(architecture)
    try:
        results = asyncio.run(run(address, payloads, concurrency))
    finally:
        process.terminate()
        process.wait(30)
    header = f"{'scenario':<28}{'requests':>9}{'req/s':>10}{'p50 ms':>9}{'p90 ms':>9}{'p99 ms':>9}"
    print(f"\n{architecture} model, {platform.machine()}, {platform.python_version()}\n{header}")
    for row in results:
        quantiles = "".join(f"{row.get(key, '-'):>9}" for key in ("p50_ms", "p90_ms", "p99_ms"))
        print(f"{row['scenario']:<28}{row['requests']:>9}{row['throughput_rps']:>10}{quantiles}")
    output_dir.mkdir(exist_ok=True)
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    out = output_dir / f"bench-{architecture}-{stamp}.json"
    out.write_text(json.dumps({"architecture": architecture, "results": results}, indent=2))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    typer.run(main)
