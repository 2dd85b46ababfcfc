"""The server's lifecycle: bind, serve `Mnist`, the Open Inference Protocol, health and
reflection over gRPC, and the HTTP API (`mnist_service.http`) beside them, drain, stop.

Startup order keeps health truthful: the model is loaded and warmed up before `serve` is
called, health turns SERVING only once the socket listens. On SIGTERM/SIGINT (`MnistServer.
stop`):

1. health turns NOT_SERVING and the listening sockets close (no new connections); HTTP
   connections end after their current request, whose answer says `Connection: close`;
2. streaming calls stop reading requests: each answers what it has read and ends OK with
   `mnist-draining: true` in its trailers;
3. every connection gets the two-step GOAWAY (`transport.drain`); calls opened before the
   final one are served, streams opened after it get REFUSED_STREAM (grpcio retries them);
4. the calls still running get what is left of `grace_period` to finish; then what still
   runs is cancelled, every connection ends (a lingering close: our side first, then the
   client's, see `CoalescingProtocol.close`), a log line counts calls finished, cut off and
   refused, and `serve` returns (the process exits 0).

A second signal skips the waiting: what still runs is cut off at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import Any

from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection

from .._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from ..api.mnist import MnistService
from ..api.oip import InferenceService, TritonOnlyMethods
from ..calls import Call
from ..config import ServerConfig, format_address, is_loopback
from ..constants import MODEL_NAMES, Architecture
from ..engine.batcher import Batcher, BatchObserver
from ..engine.inference import Classifier, ModelInfo
from ..engine.pipeline import Admission, Pipeline
from ..engine.preprocess import limit_pillow
from ..engine.repository import ModelPlan
from ..engine.versions import Loaded, ModelRegistry, ModelVersion, VersionedModel
from ..errors import ConfigError
from ..http import HttpServer
from ..http.api import Models
from ..http.timing import ModelClock
from ..tls import server_context
from ..transport.codec import SizeLimitedCodec
from ..transport.server import Server
from . import collector
from .census import Census
from .control import Control, Link, load_plans, repository_for, startup_plans
from .eventloop import loop_factory
from .logs import flush_direct
from .metrics import Metrics
from .telemetry import RequestLog, log_refused_stream

log = logging.getLogger(__name__)

_GOAWAY_PING_TIMEOUT_S = 1.0
METRICS_SAMPLE_S = 0.5
"""How often the in-flight and queue gauges are refreshed."""
"""How long the first GOAWAY's PING may go unanswered before the final GOAWAY is sent."""


def bind_socket(host: str, port: int, *, reuse_port: bool = False) -> socket.socket:
    """Open the listening socket, turning OS errors into one clear ConfigError.

    With `reuse_port`, the port must first be free for a plain bind: SO_REUSEPORT on its own
    would let a second instance silently share a port that is already in use.
    """
    address = format_address(host, port)
    try:
        infos = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE | socket.AI_NUMERICSERV
        )
    except socket.gaierror as exc:
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if reuse_port:
            sock.bind(sockaddr)  # fails if anyone, SO_REUSEPORT or not, holds the port
            sockaddr = sock.getsockname()  # port 0 resolved
            sock.close()
            sock = socket.socket(family, kind, proto)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise ConfigError(f"cannot listen on {address}: {exc.strerror}") from exc
    return sock


def reuse_port_sibling(sock: socket.socket) -> socket.socket:
    """Another SO_REUSEPORT socket on the same address as `sock` (one per worker process)."""
    sibling = socket.socket(sock.family, sock.type, sock.proto)
    sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sibling.bind(sock.getsockname())
    return sibling


def log_serving(
    config: ServerConfig,
    info: ModelInfo,
    port: int,
    *,
    metrics_port: int | None = None,
    http_port: int | None = None,
) -> None:
    """The startup summary line (tools wait for its "serving" and read its port).

    Logged once per server (by the supervisor, or the only process), so it also carries the
    warning about plaintext on an address other machines can reach.
    """
    address = format_address(config.host, port)
    if not config.tls and not is_loopback(config.host):
        # Not worded "serving ...": tools take the line that starts so for the serving line.
        log.warning(
            "no TLS on %s, which other machines can reach: calls and images travel in the"
            " clear; pass --tls-cert and --tls-key, or listen on loopback behind a TLS proxy",
            address,
        )
    log.info(
        "serving %s model on %s",
        info.architecture,
        address,
        extra={
            "fields": {
                "address": address,
                "port": port,
                "architecture": info.architecture,
                "weights": str(info.weights_path),
                "sha256": info.weights_sha256[:12],
                "provider": info.execution_provider,
                "workers": config.workers,
                "max_batch_size": config.max_batch_size,
                "models": ",".join(MODEL_NAMES[model] for model in config.served_models),
                "tls": "mutual" if config.tls_client_ca else "on" if config.tls else "off",
                **({"metrics_port": metrics_port} if metrics_port is not None else {}),
                **(
                    {"http_address": format_address(config.http_host, http_port)}
                    if config.http_host is not None and http_port is not None
                    else {}
                ),
                **({"http_port": http_port} if http_port is not None else {}),
            }
        },
    )
    if http_port is not None and config.http_host is not None:
        scheme = "https" if config.tls else "http"
        log.info("HTTP on %s://%s/", scheme, format_address(config.http_host, http_port))
    if metrics_port is not None and config.metrics_host is not None:
        log.info("metrics on http://%s/metrics", format_address(config.metrics_host, metrics_port))


def _descriptor_pool() -> object:
    """Our generated descriptors plus health's, so reflection can describe both."""
    pool = default_google_proto_descriptor_pool
    try:
        pool.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        pool.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return pool


class MnistServer:
    """The grpclib server with its services, health, reflection, drain and request log.

    `classifier` is the model the MNIST API serves; `models` all those the Open Inference
    Protocol serves, by architecture (by default `classifier` alone), each served as version
    1. `versions` gives each model's loaded versions instead (`run` loads them from the
    repository's `plans`). Each version gets one batcher and pipeline, which both APIs
    share; `control` loads and unloads versions at run time (`runtime.control`).
    """

    def __init__(
        self,
        config: ServerConfig,
        classifier: Classifier,
        executor: Executor,
        *,
        models: Mapping[Architecture, Classifier] | None = None,
        metrics: Metrics | None = None,
        metrics_port: int | None = None,
        versions: Mapping[Architecture, Sequence[Loaded]] | None = None,
        plans: Mapping[str, ModelPlan | None] | None = None,
        link: Link | None = None,
    ) -> None:
        self.config = config
        self.classifier = classifier
        self.metrics = metrics
        self.metrics_port = metrics_port
        self._executor = executor
        self._sampler: asyncio.Task[None] | None = None
        self._admissions: dict[Architecture, Admission] = {}
        """Each model's `--max-queue` and `--max-decode-bytes`, shared by its versions."""
        self.request_log = RequestLog(access_log=config.access_log, model=config.model_architecture)
        limit_pillow(config.limits.max_image_pixels)
        if versions is None:
            models = {**(models or {}), config.model_architecture: classifier}
            versions = {arch: [Loaded("1", model)] for arch, model in models.items()}
        repository = repository_for(config)
        if plans is None:
            plans = {MODEL_NAMES[arch]: None for arch in versions}
        self.registry = ModelRegistry(
            [
                VersionedModel(
                    MODEL_NAMES[arch],
                    arch,
                    [self._version(arch, plans.get(MODEL_NAMES[arch]), loaded) for loaded in held],
                )
                for arch, held in versions.items()
            ],
            MODEL_NAMES[config.model_architecture],
        )
        self.control = Control(
            config, repository, self.registry, self._build, plans=plans, metrics=metrics, link=link
        )
        default = self.registry.default
        service = MnistService(default, limits=config.limits)
        self.inference = InferenceService(self.registry, limits=config.limits, control=self.control)
        self.health_status = ServiceStatus()
        health = Health({service: [self.health_status], self.inference: [self.health_status]})
        # extend() returns the services given plus reflection's own.
        services = ServerReflection.extend(
            [service, self.inference, health], pool=_descriptor_pool()
        )
        self.server = Server(
            [*services, TritonOnlyMethods()],
            codec=SizeLimitedCodec(
                config.limits.max_message_bytes,
                max_connection_bytes=config.limits.connection_bytes,
                max_message_seconds=config.limits.max_message_seconds,
            ),
            observer=self.request_log if metrics is None else self._observe_call,
            on_refused=log_refused_stream,
            max_connections=config.limits.max_connections,
        )
        self.port: int | None = None
        self.http: HttpServer | None = None
        if config.http_host is not None:
            self.http = HttpServer(
                Models(self.registry, control=self.control),
                limits=config.limits,
                executor=executor,
                observer=self.request_log if metrics is None else self._observe_http_call,
                ready=lambda: self.inference.ready,
                cors_allow_origins=config.cors_allow_origins,
                web_ui=config.web_ui,
            )

    @property
    def info(self) -> ModelInfo:
        """The MNIST API's model: its default version's, or (unloaded) the one started with."""
        model = self.registry.default.default
        return model.info if model is not None else self.classifier.info

    @property
    def pipeline(self) -> Pipeline:
        """The pipeline of the MNIST API's model, its default version now."""
        return self.registry.get(None).pipeline

    @property
    def pending(self) -> int:
        """Images accepted and not yet answered, by every model's versions (retired ones
        still finishing their calls included)."""
        return sum(admission.pending for admission in self._admissions.values())

    def _version(self, arch: Architecture, plan: ModelPlan | None, loaded: Loaded) -> ModelVersion:
        """A served version of a model, with its own batcher and pipeline."""
        name = MODEL_NAMES[arch]
        # Each model run timed, for HTTP's Server-Timing (two clock reads a batch).
        clock = ModelClock(loaded.classifier)
        batch = (plan.max_batch_size if plan else None) or self.config.max_batch_size
        delay = plan.max_batch_delay_us if plan and plan.max_batch_delay_us is not None else None
        admission = self._admissions.setdefault(
            arch, Admission(self.config.limits.max_queue, self.config.limits.max_decode_bytes)
        )
        pipeline = self._pipeline(
            clock,
            self._executor,
            admission,
            max_batch_size=batch,
            max_delay_us=self.config.max_batch_delay_us if delay is None else delay,
            observer=(self.metrics.version_batches(name, loaded.version) if self.metrics else None),
        )
        return ModelVersion(
            name, arch, loaded.version, pipeline, loaded.accuracy, plan, clock=clock
        )

    def _build(
        self, plan: ModelPlan, version: str, classifier: Any, accuracy: float
    ) -> ModelVersion:
        return self._version(plan.architecture, plan, Loaded(version, classifier, accuracy))

    def _pipeline(
        self,
        classifier: Classifier,
        executor: Executor,
        admission: Admission,
        *,
        max_batch_size: int,
        max_delay_us: int,
        observer: BatchObserver | None,
    ) -> Pipeline:
        """One model version's batcher and pipeline."""
        batcher = Batcher(
            classifier,
            max_batch_size=max_batch_size,
            max_delay=max_delay_us / 1e6,
            observer=observer,
        )
        return Pipeline(
            batcher,
            max_image_pixels=self.config.limits.max_image_pixels,
            executor=executor,
            shift_views=self.config.shift_views,
            admission=admission,
        )

    async def start(
        self,
        sock: socket.socket | None = None,
        *,
        http_sock: socket.socket | None = None,
        announce: bool = True,
    ) -> None:
        """Listen on `sock` and `http_sock` (or bind the configured addresses) and report
        SERVING.

        The TLS context is built here, in the process that serves (after any fork); HTTP gets
        the same certificate, offering HTTP/1.1 by ALPN.
        """
        ssl = server_context(self.config)
        if sock is None:
            sock = bind_socket(self.config.host, self.config.port)
        if self.http is not None and http_sock is None:
            assert self.config.http_host is not None
            try:
                http_sock = bind_socket(self.config.http_host, self.config.http_port)
            except ConfigError as exc:
                sock.close()
                raise ConfigError(f"{exc} (--http-address)") from None
        self.port = sock.getsockname()[1]
        await self.server.start(sock=sock, ssl=ssl)
        if self.http is not None:
            assert http_sock is not None
            await self.http.start(http_sock, server_context(self.config, alpn=("http/1.1",)))
        self.health_status.set(True)
        self.inference.ready = True
        if self.metrics is not None:
            info = self.info
            self.metrics.describe_model(
                info.architecture, info.execution_provider, info.weights_sha256
            )
            for model in self.registry:
                for version in model.served:
                    self.metrics.version_served(model.name, version.version, True)
            self._sampler = asyncio.create_task(self._sample_metrics())
        if announce:
            log_serving(
                self.config,
                self.info,
                self.port,
                metrics_port=self.metrics_port,
                http_port=self.http.port if self.http is not None else None,
            )
        else:
            log.debug("worker ready")

    def _observe_call(self, call: Call) -> None:
        self.request_log(call)
        assert self.metrics is not None
        self.metrics.record_call(call.method, call.status, time.perf_counter() - call.started)

    def _observe_http_call(self, call: Call) -> None:
        self.request_log(call)
        assert self.metrics is not None
        self.metrics.record_call(
            call.method, call.status, time.perf_counter() - call.started, protocol="http"
        )

    async def _sample_metrics(self) -> None:
        """The in-flight and queue gauges, sampled (not counted per call: no per-call cost)."""
        assert self.metrics is not None
        while True:
            pending = self.pending
            http_calls = len(self.http.calls()) if self.http is not None else 0
            self.metrics.sample(len(self.server.calls()) + http_calls, pending)
            await asyncio.sleep(METRICS_SAMPLE_S)

    async def stop(self, *, grace_period: float, hurry: asyncio.Event | None = None) -> None:
        """Drain (see the module's docstring); `hurry`, once set, cuts the waiting short."""
        if self._sampler is not None:
            self._sampler.cancel()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace_period
        server = self.server
        self.health_status.set(False)
        self.inference.ready = False
        server.stop_accepting()
        if self.http is not None:
            self.http.stop_accepting()
        server.stop_stream_reads()
        calls: set[asyncio.Future[Any]] = set(server.calls())
        if self.http is not None:
            calls |= self.http.calls()
        log.info(
            "draining",
            extra={
                "fields": {
                    "in_flight": len(calls),
                    "connections": server.connections
                    + (self.http.connections if self.http is not None else 0),
                    "grace_s": grace_period,
                }
            },
        )
        hurried = asyncio.ensure_future((hurry or asyncio.Event()).wait())
        goaway = asyncio.ensure_future(server.goaway(min(_GOAWAY_PING_TIMEOUT_S, grace_period)))
        try:
            await asyncio.wait({goaway, hurried}, return_when=asyncio.FIRST_COMPLETED)
            calls |= server.calls()  # with those that arrived before the final GOAWAY
            pending: set[asyncio.Future[Any]] = {c for c in calls if not c.done()}
            while pending and not hurried.done() and (left := deadline - loop.time()) > 0:
                _, pending = await asyncio.wait(
                    pending | {hurried}, timeout=left, return_when=asyncio.FIRST_COMPLETED
                )
                pending.discard(hurried)
        finally:
            goaway.cancel()
            hurried.cancel()
        if pending:
            reason = "second signal" if hurried.done() else "grace period over"
            log.warning(
                "%s: cutting off calls", reason, extra={"fields": {"in_flight": len(pending)}}
            )
        refused = server.refused_streams
        await server.close_connections()
        if self.http is not None:
            await self.http.close()
        log.info(
            "drained",
            extra={
                "fields": {
                    "calls_finished": len(calls) - len(pending),
                    "calls_cut_off": len(pending),
                    "streams_refused": refused,
                }
            },
        )


async def serve(
    config: ServerConfig,
    classifier: Classifier,
    executor: Executor,
    *,
    sock: socket.socket | None = None,
    http_sock: socket.socket | None = None,
    lifeline: int | None = None,
    on_ready: Callable[[ModelInfo], None] | None = None,
    metrics_port: int | None = None,
    models: Mapping[Architecture, Classifier] | None = None,
    versions: Mapping[Architecture, Sequence[Loaded]] | None = None,
    plans: Mapping[str, ModelPlan | None] | None = None,
    link: Link | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return.

    A worker process gets its listening `sock` (and `http_sock`) from the supervisor, a
    `lifeline` (the read end of a pipe whose EOF, the supervisor's death, counts as a
    signal), `on_ready` and its `link` to the supervisor for loads and unloads. With metrics
    on, the process records them (`metrics_port`: where this process serves them, for the
    serving line, when it is the only one). SIGHUP rescans the model repository.
    """
    metrics = Metrics() if config.metrics_host is not None else None
    app = MnistServer(
        config,
        classifier,
        executor,
        models=models,
        metrics=metrics,
        metrics_port=metrics_port,
        versions=versions,
        plans=plans,
        link=link,
    )
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    rescans: set[asyncio.Task[str]] = set()

    def rescan() -> None:
        task = asyncio.ensure_future(app.control.rescan())
        rescans.add(task)
        task.add_done_callback(rescans.discard)

    if lifeline is not None:

        def supervisor_gone() -> None:
            loop.remove_reader(lifeline)  # EOF stays readable: react once
            log.warning("the supervisor is gone; draining")
            stop.set()

        loop.add_reader(lifeline, supervisor_gone)
    try:
        # Before SERVING is announced: a signal that came before its handler would kill.
        loop.add_signal_handler(signal.SIGUSR2, Census(app.server.held).log)
        loop.add_signal_handler(signal.SIGHUP, rescan)
        if link is not None:
            link.start(loop)
        await app.start(sock, http_sock=http_sock, announce=sock is None)
        collector.settle()  # what exists now lives as long as the process
        if on_ready is not None:
            on_ready(app.info)
        await stop.wait()
        log.info("shutdown requested")
        stop.clear()  # set again by a second signal, which cuts the drain short
        await app.stop(grace_period=config.grace_period, hurry=stop)
        log.info("stopped")
    finally:
        for signum in (*signals, signal.SIGUSR2, signal.SIGHUP):
            loop.remove_signal_handler(signum)
        if lifeline is not None:
            loop.remove_reader(lifeline)  # a no-op if it already fired
        if link is not None:
            link.stop(loop)
        for task in rescans:
            task.cancel()


def run(
    config: ServerConfig,
    *,
    sock: socket.socket | None = None,
    http_sock: socket.socket | None = None,
    lifeline: int | None = None,
    on_ready: Callable[[ModelInfo], None] | None = None,
    metrics_port: int | None = None,
    plans: Mapping[str, ModelPlan | None] | None = None,
    link: Link | None = None,
) -> None:
    """Load the models' versions (`plans`, or the repository's now), each warmed up and
    golden-checked, then serve in this process until told to stop (see `serve`)."""
    if plans is None:
        plans = startup_plans(config, repository_for(config))
    versions = load_plans(config, plans)
    default = versions[config.model_architecture]
    classifier = default[-1].classifier if default else None
    if classifier is None:  # unloaded everywhere: any loaded model's, for the startup line
        classifier = next(v[-1].classifier for v in versions.values() if v)
    executor = ThreadPoolExecutor(config.decode_threads, thread_name_prefix="mnist-decode")
    try:
        with executor, asyncio.Runner(loop_factory=loop_factory(config.busy_poll_us)) as runner:
            runner.run(
                serve(
                    config,
                    classifier,
                    executor,
                    sock=sock,
                    http_sock=http_sock,
                    lifeline=lifeline,
                    on_ready=on_ready,
                    metrics_port=metrics_port,
                    versions=versions,
                    plans=plans,
                    link=link,
                )
            )
    finally:
        flush_direct()  # the request log lines of the last loop turn
