"""Running a load: callers on one event loop, their tallies, and the run's report.

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
import itertools
import signal
import time
from array import array
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError, ProtocolError, StreamTerminatedError

from ..client import ItemFailure, MnistClient, Prediction
from ._config import LoadConfig
from ._report import LoadReport, ModelCheck, Progress
from ._workload import Payload
from .latency import summarise_latency

TRANSPORT_ERROR_BACKOFF_S = 0.01
"""Pause after a connection-level failure, so a dead server is not hammered in a tight loop."""
DRAIN_SLACK_S = 5.0


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
