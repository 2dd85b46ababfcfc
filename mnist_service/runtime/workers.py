"""One server process per core: a supervisor that starts, restarts and drains workers.

`run(config)` serves in this process when `config.workers == 1`. Otherwise this process
becomes the supervisor:

- it binds the port itself (and the HTTP port), so a port in use fails with the same one-line
  error as ever;
- it forks `workers` processes, each with its own event loop, onnxruntime session and decode
  pool (one Python process saturates one core; the GIL makes threads no substitute);
- the workers share the port in one of two ways. With `reuse_port` (the default where the OS
  has it), each gets its own SO_REUSEPORT socket and the kernel spreads new connections over
  them by a hash of the addresses. The supervisor holds the port with a bound socket that
  never listens and opens a fresh listening socket for each worker it starts, keeping no
  copy: when a worker drains and closes its socket, the kernel at once sends new connections
  to the other workers only. Otherwise they all accept on one inherited socket, which
  balances badly: asyncio accepts every pending connection on a wake-up, so whichever worker
  wakes first takes them all (measured: 4 and 8 connections all on one of 2 workers). The HTTP
  port is shared the same way, with sockets of its own;
- it reports SERVING (the "serving" log line) once every worker is ready, and restarts a
  worker that dies, with a log line saying so;
- on SIGTERM or SIGINT it forwards SIGTERM to every worker, which drain as a single process
  does, and exits 0 when they all did; a second signal is forwarded too and stops them now.

Workers sit in their own process group, so a terminal's Ctrl-C reaches only the supervisor,
which forwards it once. Each worker holds the read end of a pipe from the supervisor: if the
supervisor dies, the pipe ends and the worker drains and exits rather than linger.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import signal
import socket
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from multiprocessing.context import ForkProcess
from types import FrameType

from ..config import ServerConfig
from ..engine.inference import ModelInfo
from ..errors import MnistServiceError
from . import metrics, server

log = logging.getLogger(__name__)

_BACKLOG = 1024
_POLL_S = 0.2
_RESTART_DELAY_S = 1.0
"""A worker that keeps dying is restarted at most this often."""
_STOP_MARGIN_S = 5.0
"""How long past the grace period workers get to exit before they are killed."""


class WorkerStartupError(MnistServiceError):
    """A worker could not start (its message is the worker's own startup error)."""


def run(config: ServerConfig) -> None:
    """Serve with `config.workers` processes (in this one when it is 1) until stopped.

    With metrics on, this process serves `/metrics` for all of them (see `runtime.metrics`).
    """
    exporter = None
    if config.metrics_host is not None:
        exporter = metrics.Exporter.start(config.metrics_host, config.metrics_port)
    try:
        if config.workers == 1:
            server.run(config, metrics_port=exporter.port if exporter is not None else None)
        else:
            Supervisor(config, exporter).run()
    finally:
        if exporter is not None:
            exporter.stop()


@dataclass(slots=True)
class _Worker:
    index: int
    process: ForkProcess
    ready: Connection
    started: float = field(default_factory=time.monotonic)
    is_ready: bool = False


class Supervisor:
    """Starts `config.workers` worker processes and looks after them until stopped."""

    def __init__(self, config: ServerConfig, exporter: metrics.Exporter | None = None) -> None:
        self.config = config
        self._exporter = exporter
        self._context = multiprocessing.get_context("fork")
        self._sockets: list[socket.socket] = []
        self._http_sockets: list[socket.socket] = []
        self._workers: dict[int, _Worker] = {}
        self._signals = 0
        self._lifeline_read, self._lifeline_write = os.pipe()

    def run(self) -> None:
        """Bind, start the workers, supervise them; return once all have exited after a stop."""
        config = self.config
        first = server.bind_socket(config.host, config.port, reuse_port=config.reuse_port)
        self._sockets = [first]  # with reuse_port: the port's anchor, never listening
        if config.http_host is not None:
            try:
                http = server.bind_socket(
                    config.http_host, config.http_port, reuse_port=config.reuse_port
                )
            except MnistServiceError as exc:
                first.close()
                raise type(exc)(f"{exc} (--http-address)") from None
            self._http_sockets = [http]
        if not config.reuse_port:
            for sock in (*self._sockets, *self._http_sockets):
                sock.listen(_BACKLOG)  # connections queue in the kernel while workers start
        port = first.getsockname()[1]
        http_port = self._http_sockets[0].getsockname()[1] if self._http_sockets else None
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            for index in range(config.workers):
                self._start(index)
            info = self._wait_all_ready()
            server.log_serving(
                config,
                info,
                port,
                metrics_port=self._exporter.port if self._exporter else None,
                http_port=http_port,
            )
            self._supervise()
            self._stop()
        finally:
            for signum, handler in previous.items():
                signal.signal(signum, handler)
            for sock in (*self._sockets, *self._http_sockets):
                sock.close()
            os.close(self._lifeline_write)
            os.close(self._lifeline_read)

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals > 1:  # the second signal: workers stop without waiting
            self._forward(signal.SIGTERM)

    def _start(self, index: int) -> None:
        sock = self._worker_socket(self._sockets)
        http_sock = self._worker_socket(self._http_sockets) if self._http_sockets else None
        mine = (sock, http_sock)
        others = [s for s in (*self._sockets, *self._http_sockets) if s not in mine]
        ready_read, ready_write = self._context.Pipe(duplex=False)
        if self._exporter is not None:
            others.append(self._exporter.socket)  # the supervisor's /metrics, not the worker's
        process = self._context.Process(
            target=_worker_main,
            args=(
                self.config,
                sock,
                http_sock,
                others,
                self._lifeline_read,
                self._lifeline_write,
                ready_write,
            ),
            name=f"mnist-worker-{index}",
            daemon=False,
        )
        process.start()
        ready_write.close()
        if self.config.reuse_port:
            sock.close()  # the worker's alone: it stops listening when the worker drains
            if http_sock is not None:
                http_sock.close()
        self._workers[index] = _Worker(index, process, ready_read)

    def _worker_socket(self, anchors: list[socket.socket]) -> socket.socket:
        """A new worker's listening socket: its own SO_REUSEPORT sibling, or the shared one."""
        if self.config.reuse_port:
            sock = server.reuse_port_sibling(anchors[0])
            sock.listen(_BACKLOG)  # connections queue in the kernel while the worker starts
            return sock
        return anchors[0]

    def _wait_all_ready(self) -> ModelInfo:
        """Wait for every worker's ready message; the first startup error ends the start."""
        info: ModelInfo | None = None
        while not all(w.is_ready for w in self._workers.values()):
            if self._signals:
                self._stop(quiet=True)
                raise WorkerStartupError("stopped by a signal before all workers were ready")
            pending = {w.ready: w for w in self._workers.values() if not w.is_ready}
            for conn in wait(list(pending), timeout=_POLL_S):
                worker = pending[conn]  # type: ignore[index]
                try:
                    message = worker.ready.recv()
                except EOFError:
                    message = f"worker {worker.index} exited while starting"
                if isinstance(message, str):  # a startup error: the same for every worker
                    self._stop(quiet=True)
                    raise WorkerStartupError(message)
                info = message
                worker.is_ready = True
        assert info is not None
        return info

    def _supervise(self) -> None:
        """Restart workers that die, until a signal asks for a stop."""
        while not self._signals:
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            for sentinel in wait(list(sentinels), timeout=_POLL_S):
                if self._signals:
                    break
                worker = sentinels[sentinel]  # type: ignore[index]
                worker.process.join()
                worker.ready.close()
                if self._exporter is not None and worker.process.pid is not None:
                    metrics.process_gone(worker.process.pid)
                log.warning(
                    "worker %d exited unexpectedly; restarting it",
                    worker.index,
                    extra={
                        "fields": {
                            "worker_pid": worker.process.pid,
                            "exitcode": worker.process.exitcode,
                        }
                    },
                )
                delay = _RESTART_DELAY_S - (time.monotonic() - worker.started)
                if delay > 0:
                    time.sleep(delay)
                self._start(worker.index)

    def _forward(self, signum: int) -> None:
        for worker in self._workers.values():
            if worker.process.is_alive() and worker.process.pid is not None:
                os.kill(worker.process.pid, signum)

    def _stop(self, *, quiet: bool = False) -> None:
        """Drain every worker: SIGTERM, wait for the grace period, kill what is left.

        `quiet` is for a failed start, where the one line that matters is the error itself.
        """
        if not quiet:
            log.info("stopping workers", extra={"fields": {"workers": len(self._workers)}})
        self._forward(signal.SIGTERM)
        for sock in (*self._sockets, *self._http_sockets):
            sock.close()  # a shared listening socket: workers close their own copies
        deadline = time.monotonic() + self.config.grace_period + _STOP_MARGIN_S
        for worker in self._workers.values():
            worker.process.join(max(0.0, deadline - time.monotonic()))
            if worker.process.is_alive():
                log.warning("worker %d did not stop in time; killing it", worker.index)
                worker.process.kill()
                worker.process.join()
            worker.ready.close()
        if quiet:
            return
        failed = [w.index for w in self._workers.values() if w.process.exitcode != 0]
        if failed:
            log.warning("workers %s exited with an error", failed)
        log.info("stopped")


def _worker_main(
    config: ServerConfig,
    sock: socket.socket,
    http_sock: socket.socket | None,
    others: list[socket.socket],
    lifeline: int,
    lifeline_write: int,
    ready: Connection,
) -> None:
    """A worker process: serve on the inherited socket until SIGTERM or the supervisor dies."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor only
    os.close(lifeline_write)  # else our own copy would keep the pipe open forever
    for other in others:  # the supervisor's anchor and /metrics: not ours to hold
        other.close()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    try:
        server.run(
            config,
            sock=sock,
            http_sock=http_sock,
            lifeline=lifeline,
            on_ready=ready.send,
        )
    except MnistServiceError as exc:  # a startup error: the supervisor prints it and exits
        ready.send(str(exc))
        raise SystemExit(1) from None
