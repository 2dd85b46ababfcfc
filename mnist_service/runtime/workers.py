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

Loads and unloads of models at run time go through the supervisor (`runtime.control`): a
worker that gets one over the control API (or SIGHUP) sends it up its pipe; the supervisor
plans it once, asks every worker to prepare it (load, warm up, golden check), and then all to
commit, or, if any refused or died, all to abort: the swap happens in every worker or in
none. It keeps the committed plans, which a worker started later loads. SIGHUP to the
supervisor rescans the repository the same way.

Workers sit in their own process group, so a terminal's Ctrl-C reaches only the supervisor,
which forwards it once. Each worker holds the read end of a pipe from the supervisor: if the
supervisor dies, the pipe ends and the worker drains and exits rather than linger.
"""

from __future__ import annotations

import contextlib
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
from typing import Any

from ..config import ServerConfig
from ..engine.inference import ModelInfo
from ..engine.repository import ModelPlan
from ..errors import MnistServiceError, ModelError
from . import control, metrics, server

log = logging.getLogger(__name__)

_BACKLOG = 1024
_POLL_S = 0.2
_RESTART_DELAY_S = 1.0
"""A worker that keeps dying is restarted at most this often."""
_STOP_MARGIN_S = 5.0
"""How long past the grace period workers get to exit before they are killed."""
_SWAP_TIMEOUT_S = 300.0
"""How long every worker gets to prepare a load (or acknowledge its commit)."""


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
        self._rescan = False
        self._lifeline_read, self._lifeline_write = os.pipe()
        self._repository = control.repository_for(config)
        self._plans: dict[str, ModelPlan | None] = {}
        """What every worker serves: the plan of each model's last committed load."""
        self._requests: list[tuple[_Worker, tuple[Any, ...]]] = []
        self._steps = 0

    def run(self) -> None:
        """Bind, start the workers, supervise them; return once all have exited after a stop."""
        config = self.config
        self._plans = control.startup_plans(config, self._repository)
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
        previous[signal.SIGHUP] = signal.signal(signal.SIGHUP, self._on_hangup)
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

    def _on_hangup(self, signum: int, frame: FrameType | None) -> None:
        self._rescan = True

    def _start(self, index: int) -> None:
        sock = self._worker_socket(self._sockets)
        http_sock = self._worker_socket(self._http_sockets) if self._http_sockets else None
        mine = (sock, http_sock)
        others = [s for s in (*self._sockets, *self._http_sockets) if s not in mine]
        ready_read, ready_write = self._context.Pipe(duplex=True)  # also the control link
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
                dict(self._plans),
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
        """Restart workers that die and carry out model loads, until a signal asks for a
        stop."""
        while not self._signals:
            if self._rescan:
                self._rescan = False
                self._carry_out(None, ("request", 0, "rescan", "", None))
            while self._requests and not self._signals:
                self._carry_out(*self._requests.pop(0))
            sentinels = {w.process.sentinel: w for w in self._workers.values()}
            links = {w.ready: w for w in self._workers.values() if not w.ready.closed}
            for ready in wait([*sentinels, *links], timeout=_POLL_S):
                if self._signals:
                    break
                if ready in links:
                    self._read(links[ready])
                    continue
                worker = sentinels[ready]  # type: ignore[index]
                if worker.process.is_alive():
                    continue
                self._restart(worker)

    def _restart(self, worker: _Worker) -> None:
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

    def _read(self, worker: _Worker) -> tuple[Any, ...] | None:
        """One message from a worker; requests are queued, the rest returned."""
        try:
            message = worker.ready.recv()
        except (EOFError, OSError):
            return None
        if isinstance(message, tuple) and message and message[0] == "request":
            self._requests.append((worker, message))
            return None
        if isinstance(message, ModelInfo):  # a restarted worker's ready message
            worker.is_ready = True
            return None
        if isinstance(message, str):  # a restarted worker's startup error; it exits
            log.error("worker %d could not start: %s", worker.index, message)
            return None
        return message  # type: ignore[no-any-return]

    def _carry_out(self, origin: _Worker | None, request: tuple[Any, ...]) -> None:
        """A load, unload or rescan in every worker or in none; the outcome to `origin`."""
        _, ident, action, name, config = request
        error: MnistServiceError | None = None
        outcome = ""
        try:
            if action == "rescan":
                changes = control.changed_plans(self._repository, self._plans)
                done = [self._swap(model, plan) for model, plan in changes]
                outcome = "; ".join(done) or "unchanged: every loaded model is as on disk"
            else:
                plan = control.resolve(self._repository, self._plans, action, name, config)
                outcome = plan if isinstance(plan, str) else self._swap(name, plan)
        except MnistServiceError as exc:
            error = exc
            log.warning("model control: %s %s refused: %s", action, name or "*", exc)
        else:
            if origin is None:
                log.info("model control: %s: %s", action, outcome)
        if origin is not None and origin.process.is_alive():
            with contextlib.suppress(OSError):
                origin.ready.send(("result", ident, error, outcome))

    def _swap(self, name: str, plan: ModelPlan | None) -> str:
        """Prepare in every worker, then commit in all, or abort in all."""
        self._steps += 1
        step = self._steps
        deadline = time.monotonic() + _SWAP_TIMEOUT_S
        # A worker still starting loads the plans it was forked with: wait until it serves.
        while any(w.process.is_alive() and not w.is_ready for w in self._workers.values()):
            if self._signals or time.monotonic() > deadline:
                raise ModelError("a worker is still starting; try again")
            starting = [w for w in self._workers.values() if not w.is_ready]
            for ready in wait([w.ready for w in starting], timeout=_POLL_S):
                self._read(next(w for w in starting if w.ready is ready))
        workers = [w for w in self._workers.values() if w.is_ready and w.process.is_alive()]
        self._broadcast(workers, ("prepare", step, name, plan))
        refusal: MnistServiceError | None = None
        answered: set[int] = set()
        while len(answered) < len(workers) and refusal is None:
            refusal = self._await_step(workers, answered, "prepared", step, deadline)
        if refusal is not None:
            self._broadcast(workers, ("abort", step))
            raise refusal
        self._broadcast(workers, ("commit", step))
        self._plans[name] = plan
        answered = set()
        while len(answered) < len(workers):
            if self._await_step(workers, answered, "committed", step, deadline) is not None:
                break  # a worker died after the commit: it restarts on the new plans
        versions = ", ".join(plan.version_numbers) if plan is not None else "nothing (unloaded)"
        return f"model {name!r} serves {versions} in {len(workers)} workers"

    def _await_step(
        self,
        workers: list[_Worker],
        answered: set[int],
        kind: str,
        step: int,
        deadline: float,
    ) -> MnistServiceError | None:
        """Wait for the next worker's answer to a step; a refusal, a death or the timeout is
        returned as the error that fails the step."""
        waiting = [w for w in workers if w.index not in answered]
        if self._signals:
            return ModelError("the server is stopping")
        if time.monotonic() > deadline:
            return ModelError(f"workers {[w.index for w in waiting]} did not answer in time")
        links = {w.ready: w for w in waiting}
        sentinels = {w.process.sentinel: w for w in waiting}
        for ready in wait([*links, *sentinels], timeout=_POLL_S):
            if ready in sentinels:
                worker = sentinels[ready]
                return ModelError(f"worker {worker.index} exited during the swap")
            worker = links[ready]  # type: ignore[index]
            message = self._read(worker)
            if message is None:
                if not worker.process.is_alive():
                    return ModelError(f"worker {worker.index} exited during the swap")
                continue
            if message[0] == kind and message[1] == step:
                answered.add(worker.index)
                if kind == "prepared" and message[2] is not None:
                    error = message[2]
                    return error if isinstance(error, MnistServiceError) else ModelError(str(error))
        return None

    def _broadcast(self, workers: list[_Worker], message: tuple[Any, ...]) -> None:
        for worker in workers:
            with contextlib.suppress(OSError):  # a dead worker: the step's wait sees it
                worker.ready.send(message)

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
    plans: dict[str, ModelPlan | None],
) -> None:
    """A worker process: serve on the inherited socket until SIGTERM or the supervisor dies;
    the models' versions are the supervisor's `plans`."""
    os.setpgid(0, 0)  # a terminal's Ctrl-C goes to the supervisor only
    os.close(lifeline_write)  # else our own copy would keep the pipe open forever
    for other in others:  # the supervisor's anchor and /metrics: not ours to hold
        other.close()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, signal.SIG_DFL)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # until serve() handles it: a rescan
    try:
        server.run(
            config,
            sock=sock,
            http_sock=http_sock,
            lifeline=lifeline,
            on_ready=ready.send,
            plans=plans,
            link=control.Link(ready),
        )
    except MnistServiceError as exc:  # a startup error: the supervisor prints it and exits
        ready.send(str(exc))
        raise SystemExit(1) from None
