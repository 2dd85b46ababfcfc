"""The server's lifecycle: bind, serve `Mnist` + health + reflection, drain, stop.

Startup order keeps health truthful: the model is loaded and warmed up before `serve` is
called, health turns SERVING only once the socket listens. On SIGTERM/SIGINT health turns
NOT_SERVING, new `Mnist` calls get UNAVAILABLE, in-flight calls get `grace_period` seconds to
finish, then the server closes. A second signal skips the wait.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import socket
from collections.abc import Awaitable, Callable
from concurrent.futures import Executor, ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from grpclib.const import Handler
from grpclib.health.check import ServiceStatus
from grpclib.health.service import Health
from grpclib.health.v1 import health_pb2
from grpclib.reflection.service import ServerReflection

from .._proto.google_proto_descriptor_pool import default_google_proto_descriptor_pool
from ..api.mnist import MnistService
from ..api.status import as_grpc_errors
from ..config import ServerConfig, format_address, is_loopback
from ..engine.batcher import Batcher
from ..engine.inference import Classifier, ModelInfo, OnnxClassifier
from ..engine.pipeline import Pipeline
from ..errors import ConfigError, ServerDrainingError
from ..tls import server_context
from ..transport.codec import SizeLimitedCodec
from ..transport.server import Server
from ..transport.unary import unary_methods
from .telemetry import install_request_log

if TYPE_CHECKING:
    from grpclib._typing import IServable

log = logging.getLogger(__name__)


class Drain:
    """Counts in-flight calls of the services it wraps, and refuses new ones once draining.

    It wraps the services' handlers rather than listening to grpclib's `RecvRequest` event:
    no event object or dispatch per call, and a refused call still reaches the request log.
    Health and reflection are not wrapped, so they keep answering while draining.
    """

    def __init__(self) -> None:
        self.draining = False
        self._in_flight = 0
        self._idle = asyncio.Event()
        self._idle.set()

    def wrap(self, service: IServable) -> IServable:
        """`service`, with every handler tracked (and refused while draining)."""
        mapping = {
            name: handler._replace(func=self.track(handler.func))
            for name, handler in service.__mapping__().items()
        }
        return _Servable(mapping)

    def track(self, func: Callable[[Any], Awaitable[Any]]) -> Callable[[Any], Awaitable[Any]]:
        """`func` (a handler of one argument), counted while it runs, refused while draining."""

        async def tracked(argument: Any) -> Any:
            if self.draining:
                with as_grpc_errors():
                    raise ServerDrainingError("the server is shutting down; retry on another")
            self._in_flight += 1
            self._idle.clear()
            try:
                return await func(argument)
            finally:
                self._in_flight -= 1
                if not self._in_flight:
                    self._idle.set()

        return tracked

    @property
    def in_flight(self) -> int:
        """How many tracked calls are running."""
        return self._in_flight

    async def wait_idle(self, timeout: float) -> bool:
        """Wait until no tracked call runs; False if `timeout` passed first."""
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True


class _Servable:
    """A ready-made handler mapping, in the shape grpclib's `Server` takes services."""

    def __init__(self, mapping: dict[str, Handler]) -> None:
        self._mapping = mapping

    def __mapping__(self) -> dict[str, Handler]:
        return self._mapping


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


def log_serving(config: ServerConfig, info: ModelInfo, port: int) -> None:
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
                "tls": "mutual" if config.tls_client_ca else "on" if config.tls else "off",
            }
        },
    )


def _descriptor_pool() -> object:
    """Our generated descriptors plus health's, so reflection can describe both."""
    pool = default_google_proto_descriptor_pool
    try:
        pool.FindFileByName(health_pb2.DESCRIPTOR.name)
    except KeyError:
        pool.AddSerializedFile(health_pb2.DESCRIPTOR.serialized_pb)
    return pool


class MnistServer:
    """The grpclib server with its service, health, reflection, drain and request log."""

    def __init__(self, config: ServerConfig, classifier: Classifier, executor: Executor) -> None:
        self.config = config
        self.classifier = classifier
        batcher = Batcher(
            classifier,
            max_batch_size=config.max_batch_size,
            max_delay=config.max_batch_delay_us / 1e6,
        )
        pipeline = Pipeline(
            batcher,
            max_image_pixels=config.limits.max_image_pixels,
            executor=executor,
            max_queue=config.limits.max_queue,
        )
        service = MnistService(pipeline, limits=config.limits)
        self.health_status = ServiceStatus()
        health = Health({service: [self.health_status]})
        # extend() returns the services given plus reflection's own.
        services = ServerReflection.extend([service, health], pool=_descriptor_pool())
        self.drain = Drain()
        self.server = Server(
            [self.drain.wrap(s) if s is service else s for s in services],
            codec=SizeLimitedCodec(
                config.limits.max_message_bytes,
                max_connection_bytes=config.limits.connection_bytes,
                max_message_seconds=config.limits.max_message_seconds,
            ),
            unary=unary_methods(service, wrap=self.drain.track),
        )
        install_request_log(self.server)
        self.port: int | None = None

    async def start(self, sock: socket.socket | None = None, *, announce: bool = True) -> None:
        """Listen on `sock` (or bind the configured address) and report SERVING.

        The TLS context is built here, in the process that serves (after any fork).
        """
        ssl = server_context(self.config)
        if sock is None:
            sock = bind_socket(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        await self.server.start(sock=sock, ssl=ssl)
        self.health_status.set(True)
        if announce:
            log_serving(self.config, self.classifier.info, self.port)
        else:
            log.debug("worker ready")

    async def stop(self, *, grace_period: float) -> None:
        """Drain: NOT_SERVING, refuse new calls, let in-flight ones finish, then close."""
        self.health_status.set(False)
        self.drain.draining = True
        log.info(
            "draining",
            extra={"fields": {"in_flight": self.drain.in_flight, "grace_s": grace_period}},
        )
        if not await self.drain.wait_idle(grace_period):
            log.warning(
                "grace period over; cancelling calls",
                extra={"fields": {"in_flight": self.drain.in_flight}},
            )
        self.server.close()
        await self.server.wait_closed()
        log.info("stopped")


async def serve(
    config: ServerConfig,
    classifier: Classifier,
    executor: Executor,
    *,
    sock: socket.socket | None = None,
    lifeline: int | None = None,
    on_ready: Callable[[ModelInfo], None] | None = None,
) -> None:
    """Serve until SIGINT or SIGTERM, then drain and return.

    A worker process gets its listening `sock` from the supervisor, a `lifeline` (the read
    end of a pipe whose EOF, the supervisor's death, counts as a signal) and `on_ready`.
    """
    app = MnistServer(config, classifier, executor)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    signals = (signal.SIGINT, signal.SIGTERM)
    for signum in signals:
        loop.add_signal_handler(signum, stop.set)
    if lifeline is not None:

        def supervisor_gone() -> None:
            loop.remove_reader(lifeline)  # EOF stays readable: react once
            log.warning("the supervisor is gone; draining")
            stop.set()

        loop.add_reader(lifeline, supervisor_gone)
    try:
        await app.start(sock, announce=sock is None)
        # What exists now (modules, the model, the server) lives as long as the process: take
        # it out of the collector's sight, or each full collection walks it all again
        # (measured: 45-55 ms pauses about once a second under load, the whole p99 tail).
        gc.collect()
        gc.freeze()
        if on_ready is not None:
            on_ready(classifier.info)
        await stop.wait()
        log.info("shutdown requested")
        stop.clear()
        drained = asyncio.create_task(app.stop(grace_period=config.grace_period))
        second_signal = asyncio.create_task(stop.wait())
        await asyncio.wait({drained, second_signal}, return_when=asyncio.FIRST_COMPLETED)
        if not drained.done():
            log.warning("second signal: stopping now")
            drained.cancel()
            app.server.close()
            await app.server.wait_closed()
            log.info("stopped")
        second_signal.cancel()
    finally:
        for signum in signals:
            loop.remove_signal_handler(signum)
        if lifeline is not None:
            loop.remove_reader(lifeline)  # a no-op if it already fired


def run(
    config: ServerConfig,
    *,
    sock: socket.socket | None = None,
    lifeline: int | None = None,
    on_ready: Callable[[ModelInfo], None] | None = None,
) -> None:
    """Load the model, then serve in this process until told to stop (see `serve`)."""
    classifier = OnnxClassifier.load(
        config.weights_path,
        architecture=config.model_architecture,
        device=config.device,
        threads=config.intra_op_threads,
    )
    with ThreadPoolExecutor(config.decode_threads, thread_name_prefix="mnist-decode") as executor:
        asyncio.run(
            serve(config, classifier, executor, sock=sock, lifeline=lifeline, on_ready=on_ready)
        )
