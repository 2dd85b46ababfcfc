"""Client-side load generation behind `mnist-service bench`: measure a running deployment.

    config = LoadConfig(address="[::1]:50051", mode="unary", concurrency=32, duration_s=10,
                        payloads=generated_digits())
    report = run(config)                      # or `await run_load(config)` inside a loop
    print(format_report(report))

Three modes: `unary` (callers looping on Predict), `batch` (callers looping on PredictBatch)
and `stream` (one PredictStream per caller for the whole duration, with at most `stream_window`
images unanswered, so latency measures the server rather than a queue). Callers share a few
HTTP/2 connections round-robin: a connection lands on one server process, so a server running
several processes on one port needs several connections to be loaded evenly. Every loop is
bounded in time and in count. The client measures its own CPU use, because a Python client
saturates one core long before a good server does; a CPU-bound report says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import itertools
import math
import signal
import time
from array import array
from collections import Counter, deque
from collections.abc import (
    AsyncIterator,
    Callable,
    Coroutine,
    Iterable,
    Iterator,
    Mapping,
    Sequence,
)
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args

import numpy as np
import numpy.typing as npt
from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError
from PIL import Image, ImageDraw, ImageFont

from .client import ItemFailure, MnistClient, Prediction
from .config import parse_address
from .constants import IMAGE_SIZE
from .errors import ConfigError
from .tls import ClientTls

Mode = Literal["unary", "batch", "stream"]
MODES: tuple[str, ...] = get_args(Mode)

DEFAULT_MAX_CONNECTIONS = 16
DEFAULT_MAX_REQUESTS = 100_000_000
"""The count bound of a run (calls, or images in stream mode); the duration usually ends it."""
CPU_BOUND_FRACTION = 0.9
"""Client CPU time over wall time above which the client, not the server, was the limit."""
MAX_IMAGE_FILES = 10_000
TRANSPORT_ERROR_BACKOFF_S = 0.01
"""Pause after a connection-level failure, so a dead server is not hammered in a tight loop."""
DRAIN_SLACK_S = 5.0

_DIGIT_FONT_SIZE = 80
_DIGIT_BOX = 20  # MNIST digits fit a 20x20 box, centred by centre of mass in 28x28


@dataclass(frozen=True, slots=True)
class Payload:
    """One image the load sends: its request bytes, a name, and the digit it shows if known."""

    data: bytes
    name: str
    expected: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadConfig:
    """What to load, how hard and for how long; validated on construction."""

    address: str
    payloads: tuple[Payload, ...]
    mode: Mode = "unary"
    concurrency: int = 8
    """Concurrent callers: in-flight calls (unary, batch) or open streams (stream)."""
    duration_s: float = 10.0
    batch_size: int = 64
    """Images per PredictBatch call (batch mode only)."""
    connections: int | None = None
    """HTTP/2 connections the callers share; None: one per caller, at most 16."""
    stream_window: int = 32
    """Images a stream may have unanswered (stream mode only)."""
    call_timeout_s: float = 30.0
    """Deadline of one call; a stream gets the remaining duration on top."""
    max_requests: int = DEFAULT_MAX_REQUESTS
    model_check: bool = False
    """Classify each payload once first, then count answers under load that disagree."""
    tls: ClientTls | None = None
    """Connect over TLS (None: plaintext)."""

    def __post_init__(self) -> None:
        parse_address(self.address)
        if self.mode not in MODES:
            raise ConfigError(f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        if not self.payloads:
            raise ConfigError("there are no images to send")
        for name in ("concurrency", "batch_size", "stream_window", "max_requests"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.connections is not None and self.connections < 1:
            raise ConfigError(f"connections must be at least 1, got {self.connections}")
        if not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ConfigError(f"duration must be a positive number of seconds: {self.duration_s}")
        if not (math.isfinite(self.call_timeout_s) and self.call_timeout_s > 0):
            raise ConfigError(
                f"call timeout must be a positive number of seconds: {self.call_timeout_s}"
            )

    @property
    def connection_count(self) -> int:
        """The connections actually opened (never more than the callers)."""
        wanted = self.connections or DEFAULT_MAX_CONNECTIONS
        return min(wanted, self.concurrency)


@dataclass(frozen=True, slots=True)
class Progress:
    """A snapshot of a run in progress."""

    elapsed_s: float
    requests: int
    images: int
    errors: int


@dataclass(frozen=True, kw_only=True, slots=True)
class LatencySummary:
    """Latency percentiles in milliseconds, of calls (unary, batch) or of images (stream)."""

    of: Literal["call", "image"]
    count: int
    mean_ms: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float


@dataclass(frozen=True, kw_only=True, slots=True)
class ModelCheck:
    """The outcome of `--model-check`."""

    references: int
    """Payloads that got a reference label from one Predict call before the load."""
    drawn_correct: int | None
    """Of the payloads showing a known digit, how many the model got right (None: none known)."""
    drawn_total: int
    mismatched: int
    """Answers under load whose label differs from their payload's reference."""


@dataclass(frozen=True, kw_only=True, slots=True)
class LoadReport:
    """The outcome of a run: counts, rates, latency, errors, and how busy the client was."""

    mode: Mode
    address: str
    concurrency: int
    connections: int
    batch_size: int | None
    payloads: int
    duration_s: float
    elapsed_s: float
    interrupted: bool
    requests: int
    """Answered request messages: calls (unary, batch) or streamed images (stream)."""
    images: int
    """Answered images, classified or not."""
    classified: int
    latency: LatencySummary | None
    errors: Mapping[str, int]
    """Failed calls by gRPC status (or by exception, for transport failures)."""
    item_errors: Mapping[str, int]
    """Images a batch or stream answer reported as failed, by gRPC status."""
    server: Mapping[str, str] | None
    """What GetModelInfo said (None when the server does not implement it)."""
    model_check: ModelCheck | None
    client_cpu_s: float
    event_loop: str

    @property
    def requests_per_s(self) -> float:
        """Answered requests per second of elapsed time."""
        return self.requests / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def images_per_s(self) -> float:
        """Answered images per second of elapsed time."""
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def client_busy(self) -> float:
        """Client CPU time over wall time: near 1 means the client was the bottleneck."""
        return self.client_cpu_s / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def cpu_bound(self) -> bool:
        """Whether the client was busy enough that the numbers are a lower bound."""
        return self.client_busy > CPU_BOUND_FRACTION

    def to_json(self) -> dict[str, Any]:
        """The report as plain JSON types."""
        return {
            "mode": self.mode,
            "address": self.address,
            "concurrency": self.concurrency,
            "connections": self.connections,
            "batch_size": self.batch_size,
            "payloads": self.payloads,
            "duration_s": self.duration_s,
            "elapsed_s": round(self.elapsed_s, 4),
            "interrupted": self.interrupted,
            "requests": self.requests,
            "images": self.images,
            "classified": self.classified,
            "requests_per_s": round(self.requests_per_s, 2),
            "images_per_s": round(self.images_per_s, 2),
            "latency_ms": _latency_json(self.latency),
            "errors": dict(self.errors),
            "item_errors": dict(self.item_errors),
            "server": dict(self.server) if self.server is not None else None,
            "model_check": _model_check_json(self.model_check),
            "client": {
                "cpu_s": round(self.client_cpu_s, 3),
                "busy": round(self.client_busy, 3),
                "cpu_bound": self.cpu_bound,
                "event_loop": self.event_loop,
            },
        }


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The q-th percentile (0-100) of ascending values, interpolating linearly between ranks."""
    if not sorted_values:
        raise ValueError("percentile of no values")
    if not 0 <= q <= 100:
        raise ValueError(f"percentile must be in [0, 100], got {q}")
    rank = (len(sorted_values) - 1) * q / 100
    low = math.floor(rank)
    high = min(low + 1, len(sorted_values) - 1)
    return sorted_values[low] + (sorted_values[high] - sorted_values[low]) * (rank - low)


def summarise_latency(
    seconds: Iterable[float], of: Literal["call", "image"]
) -> LatencySummary | None:
    """Percentiles of latencies given in seconds; None when there are none."""
    ordered = sorted(seconds)
    if not ordered:
        return None
    ms = [value * 1000 for value in ordered]
    return LatencySummary(
        of=of,
        count=len(ms),
        mean_ms=math.fsum(ms) / len(ms),
        p50_ms=percentile(ms, 50),
        p90_ms=percentile(ms, 90),
        p99_ms=percentile(ms, 99),
        max_ms=ms[-1],
    )


# --- payloads ---------------------------------------------------------------------------------


def generated_digits(*, raw: bool = False) -> tuple[Payload, ...]:
    """The digits 0-9 drawn with Pillow's default font in MNIST form, as PNG files or raw bytes."""
    font = ImageFont.load_default(size=_DIGIT_FONT_SIZE)
    payloads = []
    for digit in range(10):
        pixels = _draw_digit(str(digit), font)
        if raw:
            data = pixels.tobytes()
        else:
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            data = buffer.getvalue()
        payloads.append(Payload(data, f"digit-{digit}", expected=digit))
    return tuple(payloads)


def _draw_digit(
    text: str, font: ImageFont.FreeTypeFont | ImageFont.ImageFont
) -> npt.NDArray[np.uint8]:
    """White ink on black, scaled to fit 20x20 and centred by centre of mass in 28x28."""
    canvas = Image.new("L", (2 * _DIGIT_FONT_SIZE, 2 * _DIGIT_FONT_SIZE), 0)
    ImageDraw.Draw(canvas).text((_DIGIT_FONT_SIZE // 2, _DIGIT_FONT_SIZE // 4), text, 255, font)
    glyph = canvas.crop(canvas.getbbox())
    scale = _DIGIT_BOX / max(glyph.size)
    size = (max(1, round(glyph.width * scale)), max(1, round(glyph.height * scale)))
    glyph = glyph.resize(size, Image.Resampling.LANCZOS)
    ink = np.asarray(glyph, dtype=np.float64)
    rows, cols = np.indices(ink.shape)
    centre_row = float((rows * ink).sum() / ink.sum())
    centre_col = float((cols * ink).sum() / ink.sum())
    digit = Image.new("L", (IMAGE_SIZE, IMAGE_SIZE), 0)
    digit.paste(glyph, (round(IMAGE_SIZE / 2 - centre_col), round(IMAGE_SIZE / 2 - centre_row)))
    return np.asarray(digit, dtype=np.uint8)


def load_images(paths: Iterable[Path]) -> tuple[Payload, ...]:
    """Files sent as they are; a directory contributes its files (not recursively), sorted."""
    files: list[Path] = []
    for path in paths:
        if path.is_dir():
            files += sorted(p for p in path.iterdir() if p.is_file() and not p.name.startswith("."))
        elif path.is_file():
            files.append(path)
        else:
            raise ConfigError(f"no such file or directory: {path}")
        if len(files) > MAX_IMAGE_FILES:
            raise ConfigError(f"more than {MAX_IMAGE_FILES} image files; pass fewer")
    if not files:
        raise ConfigError("no image files found")
    return tuple(Payload(path.read_bytes(), str(path)) for path in files)


# --- running ----------------------------------------------------------------------------------


@dataclass(slots=True)
class _Recorder:
    """Mutable tallies shared by the callers of one run (all on one event loop)."""

    max_requests: int
    references: dict[int, int] = field(default_factory=dict)
    issued: int = 0
    requests: int = 0
    images: int = 0
    classified: int = 0
    mismatched: int = 0
    latencies: array[float] = field(default_factory=lambda: array("d"))
    errors: Counter[str] = field(default_factory=Counter)
    item_errors: Counter[str] = field(default_factory=Counter)

    def take(self) -> bool:
        """Claim one request from the count budget; False when it is spent."""
        if self.issued >= self.max_requests:
            return False
        self.issued += 1
        return True

    def answered(self, payload_index: int, result: Prediction | ItemFailure) -> None:
        self.images += 1
        if isinstance(result, Prediction):
            self.classified += 1
            reference = self.references.get(payload_index)
            if reference is not None and reference != result.label:
                self.mismatched += 1
        else:
            self.item_errors[result.status.name] += 1

    def failed(self, exc: BaseException, *, requests: int, images: int) -> None:
        """A call failed as a whole: with a gRPC status, its requests were still answered."""
        if isinstance(exc, GRPCError):
            self.requests += requests
            self.images += images
            self.errors[exc.status.name] += 1
        elif isinstance(exc, TimeoutError):
            self.errors[Status.DEADLINE_EXCEEDED.name] += 1
        else:
            self.errors[type(exc).__name__] += 1

    def error_count(self) -> int:
        return sum(self.errors.values()) + sum(self.item_errors.values())


_CALL_ERRORS = (GRPCError, OSError, StreamTerminatedError, ProtocolError)
"""What a call may fail with: a status, or the connection (TimeoutError is an OSError)."""


async def _after_failure(exc: BaseException) -> None:
    if not isinstance(exc, GRPCError):
        await asyncio.sleep(TRANSPORT_ERROR_BACKOFF_S)


async def _unary_caller(
    client: MnistClient, payloads: Sequence[Payload], start: int, deadline: float, rec: _Recorder
) -> None:
    index = start
    while time.perf_counter() < deadline and rec.take():
        payload_index = index % len(payloads)
        index += 1
        started = time.perf_counter()
        try:
            prediction = await client.predict(payloads[payload_index].data)
        except _CALL_ERRORS as exc:
            if isinstance(exc, GRPCError):
                rec.latencies.append(time.perf_counter() - started)
            rec.failed(exc, requests=1, images=1)
            await _after_failure(exc)
            continue
        rec.latencies.append(time.perf_counter() - started)
        rec.requests += 1
        rec.answered(payload_index, prediction)


async def _batch_caller(
    client: MnistClient,
    payloads: Sequence[Payload],
    start: int,
    batch_size: int,
    deadline: float,
    rec: _Recorder,
) -> None:
    indices = [(start + k) % len(payloads) for k in range(batch_size)]
    batch = [payloads[i].data for i in indices]
    while time.perf_counter() < deadline and rec.take():
        started = time.perf_counter()
        try:
            results = await client.predict_batch(batch)
        except _CALL_ERRORS as exc:
            if isinstance(exc, GRPCError):
                rec.latencies.append(time.perf_counter() - started)
            rec.failed(exc, requests=1, images=batch_size)
            await _after_failure(exc)
            continue
        rec.latencies.append(time.perf_counter() - started)
        rec.requests += 1
        for payload_index, result in zip(indices, results, strict=False):
            rec.answered(payload_index, result)


async def _stream_caller(
    client: MnistClient,
    payloads: Sequence[Payload],
    start: int,
    deadline: float,
    config: LoadConfig,
    rec: _Recorder,
) -> None:
    """Streams until the deadline, opening a new stream if one fails."""
    positions = itertools.count(start)
    while time.perf_counter() < deadline and rec.issued < rec.max_requests:
        sent: deque[tuple[float, int]] = deque()
        window = asyncio.Semaphore(config.stream_window)
        images = _windowed_images(payloads, positions, deadline, rec, sent, window)
        timeout = deadline - time.perf_counter() + config.call_timeout_s
        try:
            async for result in client.predict_many(images, timeout=timeout):
                window.release()
                sent_at, payload_index = sent.popleft()
                rec.latencies.append(time.perf_counter() - sent_at)
                rec.requests += 1
                rec.answered(payload_index, result)
        except _CALL_ERRORS as exc:
            rec.failed(exc, requests=0, images=0)  # its answered images are counted
            await _after_failure(exc)


async def _windowed_images(
    payloads: Sequence[Payload],
    positions: Iterator[int],
    deadline: float,
    rec: _Recorder,
    sent: deque[tuple[float, int]],
    window: asyncio.Semaphore,
) -> AsyncIterator[bytes]:
    """A stream's images until the deadline, no more than the window unanswered at a time.

    Without a window, HTTP/2 flow control alone would pace the stream, and a server that
    buffers what it receives would hold seconds of images: latency would measure the queue.
    """
    while time.perf_counter() < deadline:
        await window.acquire()
        if time.perf_counter() >= deadline or not rec.take():
            return
        payload_index = next(positions) % len(payloads)
        sent.append((time.perf_counter(), payload_index))
        yield payloads[payload_index].data


async def _server_info(client: MnistClient, timeout: float) -> dict[str, str] | None:
    """GetModelInfo's answer, None when unimplemented; connects the client as a side effect."""
    try:
        info = await client.model_info(timeout=timeout)
    except GRPCError as exc:
        if exc.status is Status.UNIMPLEMENTED:
            return None
        raise
    return {
        "architecture": info.architecture,
        "execution_provider": info.execution_provider,
        "server_version": info.server_version,
        "weights_sha256": info.weights_sha256,
    }


async def _references(
    client: MnistClient, payloads: Sequence[Payload], timeout: float
) -> dict[int, int]:
    """One Predict per payload before the load: the label each should keep getting."""
    references = {}
    for index, payload in enumerate(payloads):
        try:
            references[index] = (await client.predict(payload.data, timeout=timeout)).label
        except GRPCError:
            continue
    return references


async def run_load(
    config: LoadConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 0.5,
    stop: asyncio.Event | None = None,
    event_loop: str = "asyncio",
) -> LoadReport:
    """Load the server as configured; setting `stop` ends the run early with a partial report.

    Raises OSError (including TimeoutError) or GRPCError when the server cannot be reached.
    """
    payloads = config.payloads
    clients = [
        MnistClient(config.address, timeout=config.call_timeout_s, tls=config.tls)
        for _ in range(config.connection_count)
    ]
    rec = _Recorder(max_requests=config.max_requests)
    try:
        # Open every connection (and learn what is served) before the clock starts.
        infos = await asyncio.gather(
            *(_server_info(client, config.call_timeout_s) for client in clients)
        )
        if config.model_check:
            rec.references = await _references(clients[0], payloads, config.call_timeout_s)
        elapsed, cpu = await _drive(config, clients, rec, on_progress, progress_interval_s, stop)
    finally:
        await asyncio.gather(*(client.aclose() for client in clients))

    return LoadReport(
        mode=config.mode,
        address=config.address,
        concurrency=config.concurrency,
        connections=len(clients),
        batch_size=config.batch_size if config.mode == "batch" else None,
        payloads=len(payloads),
        duration_s=config.duration_s,
        elapsed_s=elapsed,
        interrupted=stop is not None and stop.is_set(),
        requests=rec.requests,
        images=rec.images,
        classified=rec.classified,
        latency=summarise_latency(rec.latencies, "image" if config.mode == "stream" else "call"),
        errors=dict(rec.errors),
        item_errors=dict(rec.item_errors),
        server=infos[0],
        model_check=_model_check(payloads, rec) if config.model_check else None,
        client_cpu_s=cpu,
        event_loop=event_loop,
    )


async def _drive(
    config: LoadConfig,
    clients: Sequence[MnistClient],
    rec: _Recorder,
    on_progress: Callable[[Progress], None] | None,
    progress_interval_s: float,
    stop: asyncio.Event | None,
) -> tuple[float, float]:
    """Run the callers until the duration ends or `stop` is set; elapsed and CPU seconds."""
    started = time.perf_counter()
    cpu_started = time.process_time()
    deadline = started + config.duration_s
    spacing = len(config.payloads) / config.concurrency  # callers start on different payloads
    callers = [
        asyncio.create_task(
            _caller(config, clients[n % len(clients)], int(n * spacing), deadline, rec)
        )
        for n in range(config.concurrency)
    ]
    helpers: list[asyncio.Task[Any]] = [asyncio.create_task((stop or asyncio.Event()).wait())]
    if on_progress is not None:
        helpers.append(
            asyncio.create_task(_report_progress(on_progress, progress_interval_s, started, rec))
        )
    everything = asyncio.gather(*callers)
    try:
        await asyncio.wait(
            {everything, helpers[0]},
            timeout=config.duration_s + config.call_timeout_s + DRAIN_SLACK_S,
            return_when=asyncio.FIRST_COMPLETED,
        )
    finally:
        for task in (*callers, *helpers):
            task.cancel()
        await asyncio.gather(everything, *helpers, return_exceptions=True)
    elapsed = time.perf_counter() - started
    cpu = time.process_time() - cpu_started
    for caller in callers:
        if not caller.cancelled() and (bug := caller.exception()) is not None:
            raise bug  # call failures are counted, never raised: this is a bug, so not hidden
    return elapsed, cpu


def _model_check(payloads: Sequence[Payload], rec: _Recorder) -> ModelCheck:
    drawn = [(i, p.expected) for i, p in enumerate(payloads) if p.expected is not None]
    correct = sum(rec.references.get(i) == expected for i, expected in drawn)
    return ModelCheck(
        references=len(rec.references),
        drawn_correct=correct if drawn else None,
        drawn_total=len(drawn),
        mismatched=rec.mismatched,
    )


def _caller(
    config: LoadConfig, client: MnistClient, start: int, deadline: float, rec: _Recorder
) -> Coroutine[Any, Any, None]:
    payloads = config.payloads
    if config.mode == "unary":
        return _unary_caller(client, payloads, start, deadline, rec)
    if config.mode == "batch":
        return _batch_caller(client, payloads, start, config.batch_size, deadline, rec)
    return _stream_caller(client, payloads, start, deadline, config, rec)


async def _report_progress(
    on_progress: Callable[[Progress], None], interval_s: float, started: float, rec: _Recorder
) -> None:
    while True:  # cancelled when the run ends
        await asyncio.sleep(interval_s)
        on_progress(
            Progress(
                elapsed_s=time.perf_counter() - started,
                requests=rec.requests,
                images=rec.images,
                errors=rec.error_count(),
            )
        )


def run(
    config: LoadConfig,
    *,
    on_progress: Callable[[Progress], None] | None = None,
    progress_interval_s: float = 0.5,
) -> LoadReport:
    """Run the load on a fresh event loop (uvloop when installed); Ctrl-C ends it early.

    The first SIGINT stops the callers and still returns the partial report; a second one
    interrupts at once.
    """
    loop_factory, event_loop = _loop_factory()

    async def main() -> LoadReport:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()

        def interrupted() -> None:
            stop.set()
            loop.remove_signal_handler(signal.SIGINT)

        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
            loop.add_signal_handler(signal.SIGINT, interrupted)
        try:
            return await run_load(
                config,
                on_progress=on_progress,
                progress_interval_s=progress_interval_s,
                stop=stop,
                event_loop=event_loop,
            )
        finally:
            with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):
                loop.remove_signal_handler(signal.SIGINT)

    with asyncio.Runner(loop_factory=loop_factory) as runner:
        return runner.run(main())


def _loop_factory() -> tuple[Callable[[], asyncio.AbstractEventLoop] | None, str]:
    try:
        import uvloop  # type: ignore[import-not-found, unused-ignore]  # optional, not a dependency
    except ImportError:
        return None, "asyncio"
    factory: Callable[[], asyncio.AbstractEventLoop] = uvloop.new_event_loop
    return factory, "uvloop"


# --- presenting -------------------------------------------------------------------------------


def format_progress(progress: Progress) -> str:
    """One status line: elapsed, completed, rate, errors."""
    rate = progress.images / progress.elapsed_s if progress.elapsed_s > 0 else 0.0
    return (
        f"{progress.elapsed_s:6.1f} s  {progress.requests:,} requests  {progress.images:,} images"
        f"  {rate:,.0f} images/s  {progress.errors:,} errors"
    )


def format_report(report: LoadReport) -> str:
    """The report for people: counts, rates, latency, errors, and a CPU-bound warning if due."""
    what = {"unary": "Predict", "batch": f"PredictBatch of {report.batch_size}"}
    calls = what.get(report.mode, "PredictStream")
    callers = "streams" if report.mode == "stream" else "callers"
    lines = [
        f"{report.mode}: {report.concurrency} {callers} ({calls}) on {report.connections} "
        f"connection(s) to {report.address}, {report.payloads} payload(s)",
        f"elapsed     {report.elapsed_s:.2f} s of {report.duration_s:g} s"
        + ("  (interrupted: partial results)" if report.interrupted else ""),
        f"requests    {report.requests:,}  ({report.requests_per_s:,.1f}/s)",
        f"images      {report.images:,}  ({report.images_per_s:,.1f}/s), "
        f"{report.classified:,} classified",
    ]
    if report.latency is not None:
        latency = report.latency
        lines.append(
            f"latency ms  p50 {latency.p50_ms:.2f}  p90 {latency.p90_ms:.2f}  "
            f"p99 {latency.p99_ms:.2f}  max {latency.max_ms:.2f}  (per {latency.of})"
        )
    lines.append(f"errors      {_counts(report.errors)}")
    if report.mode != "unary":
        lines.append(f"item errors {_counts(report.item_errors)}")
    if report.server is not None:
        server = report.server
        lines.append(
            f"server      {server['architecture']} on {server['execution_provider']}, "
            f"mnist-service {server['server_version']}"
        )
    if report.model_check is not None:
        check = report.model_check
        drawn = (
            f", {check.drawn_correct}/{check.drawn_total} drawn digits read as drawn"
            if check.drawn_correct is not None
            else ""
        )
        lines.append(
            f"model check {check.mismatched:,} answers disagreed with their reference label "
            f"({check.references} references{drawn})"
        )
    lines.append(
        f"client CPU  {report.client_busy:.0%} of wall time ({report.event_loop} event loop)"
    )
    if report.cpu_bound:
        lines.append(
            f"WARNING: the client was CPU-bound (busy {report.client_busy:.0%} of the time), so "
            "these numbers are a lower bound of what the server can do. Run several bench "
            "processes at once (and add up their rates), or use h2load."
        )
    if report.model_check is not None and report.model_check.mismatched:
        lines.append("WARNING: some answers under load disagreed with the same image's reference.")
    return "\n".join(lines)


def _counts(counts: Mapping[str, int]) -> str:
    if not counts:
        return "none"
    return "  ".join(f"{name} {count:,}" for name, count in sorted(counts.items()))


def _latency_json(latency: LatencySummary | None) -> dict[str, Any] | None:
    if latency is None:
        return None
    return {
        "of": latency.of,
        "count": latency.count,
        "mean": round(latency.mean_ms, 4),
        "p50": round(latency.p50_ms, 4),
        "p90": round(latency.p90_ms, 4),
        "p99": round(latency.p99_ms, 4),
        "max": round(latency.max_ms, 4),
    }


def _model_check_json(check: ModelCheck | None) -> dict[str, Any] | None:
    if check is None:
        return None
    return {
        "references": check.references,
        "drawn_correct": check.drawn_correct,
        "drawn_total": check.drawn_total,
        "mismatched": check.mismatched,
    }
