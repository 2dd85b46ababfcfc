"""Scale-out on one machine: 3 replicas behind nginx, one drained, one killed, both restarted.

    python -m bench.scaleout [--steady 8] [--phase 6] [--recovered 8] [--clients 2]
                             [--threads 4] [--json FILE]

Starts three `python -m mnist_service serve --workers 1` replicas on loopback ports and nginx
(the Debian package, as a non-daemon child with its own config in a temp dir) in front of
them: `grpc_pass` to an upstream of the three, keepalive connections to them, and retries on
connection errors. grpcio client processes send a mix of Predict (PNG and raw images) and
PredictBatch through nginx for the whole run while the phases go by:

    warmup, steady     all three replicas serve
    sigterm            replica 0 gets SIGTERM: it drains and exits 0; no call may fail
    sigkill            replica 1 gets SIGKILL: only calls in flight on it may fail
    restarting         both start again on their old ports (nginx's upstream list stays valid),
                       and nginx's fail_timeout passes (it tries them again only then)
    recovered          all three serve again: traffic must reach the restarted ones

Per phase it reports calls, failures by status (with samples of their details), calls/s,
p50/p99 latency, calls served by each replica (from the replicas' own request logs, one
debug line per call) and nginx's error-log lines by kind; then the replicas' exit codes and
drain summaries. It exits 1 when an acceptance bound breaks (see `problems`). Not a test:
`nox -s scaleout` runs it; tests/test_scaleout.py runs a short form.

Why a SIGKILL may fail calls at all: nginx's gRPC proxy never buffers the request body, and
nginx does not pass a request on to the next upstream once it has sent it to one (1.22,
ngx_http_upstream_next: `u->request_sent && r->request_body_no_buffering`), whatever
`grpc_next_upstream` says. So a call whose request reached the killed replica fails with
UNAVAILABLE (nginx answers 502), while calls nginx tries to connect afterwards get
`connect() failed` and go to another replica. Each client thread has one call in flight, so
at most `clients x threads` calls can fail, and in practice only the third or so that were
on the killed replica. A drained replica never needs a retry after the request was sent: it
finishes the calls it took, refuses new connections (retried), and nginx closes an idle
upstream connection as soon as the GOAWAY arrives on it.
"""

from __future__ import annotations

import contextlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import typer

from mnist_service.loadgen.latency import percentile

from . import stubs
from .servers import ROOT, Server

REPLICAS = 3
DRAINED, KILLED = 0, 1
GRACE_PERIOD_S = 5
CALL_TIMEOUT_S = 10.0
STARTUP_TIMEOUT_S = 30.0
CLIENT_STARTUP_TIMEOUT_S = 60.0
"""How long the client processes may take to be ready to call (imports, MNIST, PNGs)."""
NGINX_FAIL_TIMEOUT_S = 1
"""How long nginx leaves a replica alone after a failed attempt (max_fails=1): short, so that
a restarted replica gets traffic within a second."""

OPERATIONS = (("predict_png", 5), ("predict_raw", 4), ("predict_batch", 1))
BATCH_SIZE = 8

NGINX_ERRORS = {
    "connect() failed (retried elsewhere)": "connect() failed",
    "upstream prematurely closed": "upstream prematurely closed",
    "recv() failed": "recv() failed",
    "send() failed": "send() failed",
    "upstream rejected request": "upstream rejected request",
    "upstream sent goaway": "upstream sent goaway",
    "no live upstreams": "no live upstreams",
}
"""nginx error-log lines worth counting, by a phrase in them."""


# -- nginx ---------------------------------------------------------------------------------


def nginx_binary() -> str | None:
    """nginx's path: on PATH, or where Debian puts it (/usr/sbin is not on every user's PATH)."""
    found = shutil.which("nginx")
    if found is None and Path("/usr/sbin/nginx").exists():
        found = "/usr/sbin/nginx"
    return found


def nginx_version(binary: str) -> tuple[int, ...]:
    """nginx's version, e.g. (1, 22, 1), from `nginx -v` (which prints to stderr)."""
    out = subprocess.run([binary, "-v"], capture_output=True, text=True, check=True).stderr
    match = re.search(r"nginx/(\d+)\.(\d+)\.(\d+)", out)
    if match is None:
        raise RuntimeError(f"cannot read nginx's version from {out!r}")
    return tuple(int(part) for part in match.groups())


def nginx_config(prefix: Path, port: int, upstreams: list[int], version: tuple[int, ...]) -> str:
    """An nginx.conf proxying gRPC on [::1]:port to the replicas, everything kept in prefix."""
    # 1.25.1 replaced `listen ... http2` with the `http2` directive (the old form warns).
    listen = (
        f"listen [::1]:{port};\n        http2 on;"
        if version >= (1, 25, 1)
        else f"listen [::1]:{port} http2;"
    )
    servers = "\n".join(
        f"        server [::1]:{p} max_fails=1 fail_timeout={NGINX_FAIL_TIMEOUT_S}s;"
        for p in upstreams
    )
    temp = "\n".join(
        f"    {kind}_temp_path {prefix / kind};"
        for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi")
    )
    return f"""\
worker_processes 1;
error_log {prefix / "error.log"} warn;
pid {prefix / "nginx.pid"};
events {{
    worker_connections 1024;
}}
http {{
    access_log off;
{temp}
    upstream mnist {{
{servers}
        # Idle connections kept open to the replicas: a new connection per call would mean
        # more connects, and a connection a draining replica accepted but never served.
        keepalive 32;
        keepalive_requests 1000000;
    }}
    server {{
        {listen}
        keepalive_requests 1000000;  # no GOAWAY to our clients every 1000 calls
        location / {{
            grpc_pass grpc://mnist;
            # Retries happen only before the request was sent (see the module docstring):
            # connection refused (a draining or dead replica) and connect timeouts.
            grpc_next_upstream error timeout non_idempotent;
            grpc_next_upstream_tries {REPLICAS};
            grpc_connect_timeout 1s;
            grpc_read_timeout {CALL_TIMEOUT_S:.0f}s;
        }}
    }}
}}
"""


@dataclass
class Nginx:
    """nginx in the foreground, as our child; its error log is read by byte offsets."""

    process: subprocess.Popen[bytes]
    prefix: Path
    port: int

    @property
    def error_log(self) -> Path:
        return self.prefix / "error.log"

    def log_offset(self) -> int:
        return self.error_log.stat().st_size if self.error_log.exists() else 0

    def log_between(self, start: int, end: int | None) -> str:
        data = self.error_log.read_bytes() if self.error_log.exists() else b""
        return data[start:end].decode(errors="replace")

    def stop(self) -> int:
        """SIGQUIT (graceful shutdown), then SIGKILL; the exit code."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGQUIT)
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def start_nginx(binary: str, prefix: Path, upstreams: list[int]) -> Nginx:
    """nginx listening on a free [::1] port, ready to accept connections."""
    port = free_port()
    config = prefix / "nginx.conf"
    config.write_text(nginx_config(prefix, port, upstreams, nginx_version(binary)))
    command = [binary, "-e", str(prefix / "error.log"), "-c", str(config), "-p", str(prefix),
               "-g", "daemon off;"]  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    nginx = Nginx(process, prefix, port)
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"nginx exited {process.returncode}: {nginx.log_between(0, None)}")
        with contextlib.suppress(OSError), socket.create_connection(("::1", port), timeout=1):
            return nginx
        time.sleep(0.05)
    nginx.stop()
    raise RuntimeError("nginx did not start listening")


def free_port() -> int:
    """A [::1] port nobody listens on now."""
    with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def nginx_errors(text: str) -> dict[str, int]:
    """nginx error-log lines by kind; lines of no known kind count as "other"."""
    counts: Counter[str] = Counter()
    for line in text.splitlines():
        if "[warn]" in line and "upstream server temporarily disabled" in line:
            continue  # follows every failed attempt (max_fails=1): no news
        kind = next((k for k, phrase in NGINX_ERRORS.items() if phrase in line), "other")
        counts[kind] += 1
    return dict(counts)


# -- replicas ------------------------------------------------------------------------------


@dataclass
class Slot:
    """One replica's place in nginx's upstream list: a port and the processes that held it."""

    index: int
    port: int = 0
    generations: list[Server] = field(default_factory=list)

    @property
    def current(self) -> Server:
        return self.generations[-1]

    def served(self) -> int:
        """Calls answered OK so far, by every process that held this slot (request logs)."""
        return sum(_count_ok_calls(server.logs) for server in self.generations)


def _count_ok_calls(lines: list[str]) -> int:
    count = 0
    for line in list(lines):
        if '"call ' not in line:
            continue
        with contextlib.suppress(json.JSONDecodeError):
            entry = json.loads(line)
            if str(entry.get("message", "")).startswith("call ") and entry.get("status") == "OK":
                count += 1
    return count


def spawn_replica(port: int) -> subprocess.Popen[str]:
    """`mnist_service serve` with one worker on [::1]:port (0: any free port)."""
    command = [sys.executable, "-m", "mnist_service", "serve", "--workers", "1",
               "--address", f"[::1]:{port}", "--http-address", "",
               "--log-format", "json", "--log-level", "debug",
               "--grace-period", str(GRACE_PERIOD_S)]  # fmt: skip
    return subprocess.Popen(
        command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        start_new_session=True,  # a terminal's Ctrl-C reaches us, not them; Server.stop works
    )  # fmt: skip


def announced(process: subprocess.Popen[str], name: str) -> Server:
    """The replica once it logs "serving" (its log read for its whole life)."""
    assert process.stderr is not None
    return Server(name, process, process.stderr)


def summary(server: Server) -> dict[str, Any]:
    """A replica process's exit code, drain line and warnings."""
    draining: dict[str, Any] | None = None
    drained: dict[str, Any] | None = None
    warnings = []
    for line in server.logs:
        try:
            entry = json.loads(line)
        except json.JSONDecodeError:
            continue
        if entry.get("message") == "draining":
            draining = {k: entry.get(k) for k in ("in_flight", "connections")}
        if entry.get("message") == "drained":
            drained = {k: entry.get(k) for k in ("calls_finished", "calls_cut_off",
                                                   "streams_refused")}  # fmt: skip
        if entry.get("level") in ("warning", "error", "critical"):
            warnings.append(line.strip()[:500])
    return {
        "pid": server.process.pid,
        "exit_code": server.process.returncode,
        "draining": draining,
        "drained": drained,
        "warnings": warnings,
    }


# -- clients -------------------------------------------------------------------------------

Record = tuple[float, float, str, str, str]
"""One call: started, ended (time.monotonic, shared by all processes), operation, status, detail."""


def _payloads() -> dict[str, list[bytes]]:
    from PIL import Image

    from training.data import load_mnist

    pixels, _ = load_mnist("test")
    payloads: dict[str, list[bytes]] = {"png": [], "raw": []}
    for digit in pixels[:64]:
        buffer = io.BytesIO()
        Image.fromarray(255 - digit).save(buffer, format="PNG")
        payloads["png"].append(buffer.getvalue())
        payloads["raw"].append(digit.tobytes())
    return payloads


def _client_process(
    address: str, seed: int, threads: int, ready: Any, stop: Any, results: Any
) -> None:
    import grpc

    mnist_pb2, mnist_pb2_grpc = stubs.load()
    payloads = _payloads()
    names = [name for name, _ in OPERATIONS]
    weights = [weight for _, weight in OPERATIONS]
    channel = grpc.insecure_channel(address)
    stub = mnist_pb2_grpc.MnistStub(channel)
    per_thread: list[list[Record]] = [[] for _ in range(threads)]
    ready.wait(CLIENT_STARTUP_TIMEOUT_S)  # the phases begin once every client can call

    def well_formed(prediction: Any) -> bool:
        return 0 <= prediction.label <= 9 and len(prediction.probabilities) == 10

    def work(index: int) -> None:
        rng = random.Random(seed * 1000 + index)
        records = per_thread[index]
        while not stop.is_set():
            operation = rng.choices(names, weights)[0]
            detail = ""
            started = time.monotonic()
            try:
                if operation == "predict_batch":
                    images = [mnist_pb2.MnistImage(data=rng.choice(payloads["png"]))
                              for _ in range(BATCH_SIZE)]  # fmt: skip
                    reply = stub.PredictBatch(
                        mnist_pb2.PredictBatchRequest(images=images), timeout=CALL_TIMEOUT_S
                    )
                    good = len(reply.results) == BATCH_SIZE and all(
                        r.HasField("prediction") and well_formed(r.prediction)
                        for r in reply.results
                    )
                else:
                    data = rng.choice(payloads[operation.removeprefix("predict_")])
                    reply = stub.Predict(mnist_pb2.MnistImage(data=data), timeout=CALL_TIMEOUT_S)
                    good = well_formed(reply)
                status = "OK" if good else "BAD_RESPONSE"
            except grpc.RpcError as exc:
                status = exc.code().name
                detail = str(exc.details())[:300]
            records.append((started, time.monotonic(), operation, status, detail))

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    channel.close()
    results.put([record for records in per_thread for record in records])


# -- the run -------------------------------------------------------------------------------


@dataclass
class Phase:
    name: str
    start: float
    end: float = float("inf")
    served: dict[int, int] = field(default_factory=dict)
    nginx_log: tuple[int, int | None] = (0, None)


class Run:
    """The replicas, nginx and the phase boundaries of one run."""

    def __init__(self, nginx_bin: str, prefix: Path) -> None:
        self.nginx_bin = nginx_bin
        self.prefix = prefix
        self.slots = [Slot(i) for i in range(REPLICAS)]
        self.phases: list[Phase] = []
        self.nginx: Nginx | None = None
        self._served_at_start: dict[int, int] = {}
        self._log_at_start = 0

    def start(self) -> None:
        processes = [spawn_replica(0) for _ in self.slots]
        for slot, process in zip(self.slots, processes, strict=True):
            slot.generations.append(announced(process, f"replica {slot.index}"))
            assert slot.current.port is not None
            slot.port = slot.current.port
        self.nginx = start_nginx(self.nginx_bin, self.prefix, [s.port for s in self.slots])

    def begin(self, name: str) -> None:
        """End the current phase (if any) and begin the next one now."""
        assert self.nginx is not None
        now = time.monotonic()
        served = {slot.index: slot.served() for slot in self.slots}
        offset = self.nginx.log_offset()
        if self.phases:
            last = self.phases[-1]
            last.end = now
            last.served = {i: served[i] - self._served_at_start[i] for i in served}
            last.nginx_log = (self._log_at_start, offset)
        self._served_at_start, self._log_at_start = served, offset
        if name:
            self.phases.append(Phase(name, now))

    def restart(self, indices: list[int]) -> None:
        """New processes on the old ports of these slots, started together."""
        processes = {i: spawn_replica(self.slots[i].port) for i in indices}
        for i, process in processes.items():
            self.slots[i].generations.append(announced(process, f"replica {i} (restarted)"))

    def stop(self) -> int | None:
        """SIGTERM every live replica and wait for it; stop nginx; nginx's exit code."""
        for slot in self.slots:
            for server in slot.generations:
                if server.process.poll() is None:
                    server.process.send_signal(signal.SIGTERM)
        for slot in self.slots:
            for server in slot.generations:
                try:
                    server.process.wait(GRACE_PERIOD_S + 10)
                except subprocess.TimeoutExpired:
                    server.process.kill()
                    server.process.wait()
        return self.nginx.stop() if self.nginx is not None else None


def _ms(ordered: list[float], q: float) -> float | None:
    """The q-th percentile (0-100) of latencies in seconds, in ms; None when there are none."""
    return round(1000 * percentile(ordered, q), 2) if ordered else None


def phase_report(phase: Phase, records: list[Record], nginx: Nginx) -> dict[str, Any]:
    """One phase's numbers, calls counted in the phase they ended in: a call in flight on the
    replica killed at a phase's start fails in that phase, not in the one it started in."""
    mine = [r for r in records if phase.start <= r[1] < phase.end]
    ended = max((r[1] for r in mine), default=phase.start)
    seconds = (phase.end if phase.end != float("inf") else ended) - phase.start
    statuses = Counter(r[3] for r in mine)
    failures = {status: n for status, n in statuses.items() if status != "OK"}
    latencies = sorted(r[1] - r[0] for r in mine if r[3] == "OK")
    samples = sorted({f"{r[2]}: {r[3]}: {r[4]}" for r in mine if r[3] != "OK"})[:5]
    return {
        "phase": phase.name,
        "seconds": round(seconds, 2),
        "calls": len(mine),
        "ok": statuses.get("OK", 0),
        "failures": failures,
        "failed": sum(failures.values()),
        "calls_per_s": round(len(mine) / seconds, 1) if seconds > 0 else None,
        "p50_ms": _ms(latencies, 50),
        "p99_ms": _ms(latencies, 99),
        "served_by_replica": {f"r{i}": n for i, n in sorted(phase.served.items())},
        "nginx_errors": nginx_errors(nginx.log_between(*phase.nginx_log)),
        "failure_samples": samples,
    }


def scaleout(
    steady: float, phase: float, recovered: float, clients: int, threads: int, warmup: float
) -> dict[str, Any]:
    """Run every phase; the report as a dict."""
    nginx_bin = nginx_binary()
    if nginx_bin is None:
        raise RuntimeError("nginx not found: apt-get install nginx")
    context = multiprocessing.get_context("spawn")
    clients_ready = context.Barrier(clients + 1)
    stop_clients = context.Event()
    results = context.Queue()
    prefix = Path(tempfile.mkdtemp(prefix="mnist-scaleout-"))
    run = Run(nginx_bin, prefix)
    procs = []
    records: list[Record] = []
    timeline: dict[str, float] = {}
    try:
        run.start()
        assert run.nginx is not None
        address = f"[::1]:{run.nginx.port}"
        procs = [
            context.Process(
                target=_client_process,
                args=(address, seed, threads, clients_ready, stop_clients, results),
            )
            for seed in range(clients)
        ]
        for proc in procs:
            proc.start()
        try:  # a fixed pause would be too short on a busy machine, and the warm-up see no call
            clients_ready.wait(CLIENT_STARTUP_TIMEOUT_S)
        except threading.BrokenBarrierError:
            raise RuntimeError(
                f"the client processes were not ready in {CLIENT_STARTUP_TIMEOUT_S:.0f} s"
            ) from None
        run.begin("warmup")
        time.sleep(warmup)
        run.begin("steady")
        time.sleep(steady)

        run.begin("sigterm")
        drained = run.slots[DRAINED].current
        drained.process.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        drained.process.wait(GRACE_PERIOD_S + 10)
        timeline["sigterm_to_exit_s"] = round(time.monotonic() - signalled, 2)
        time.sleep(max(0.0, signalled + phase - time.monotonic()))

        run.begin("sigkill")
        killed = run.slots[KILLED].current
        killed.process.send_signal(signal.SIGKILL)
        killed.process.wait(10)
        time.sleep(phase)

        run.begin("restarting")
        started = time.monotonic()
        run.restart([DRAINED, KILLED])
        timeline["restart_to_serving_s"] = round(time.monotonic() - started, 2)
        # nginx tries a replica it marked failed again only after fail_timeout: until then the
        # restarted ones serve nothing, and "recovered" is meant to measure what comes after.
        time.sleep(NGINX_FAIL_TIMEOUT_S)

        run.begin("recovered")
        time.sleep(recovered)
        run.begin("")
        stop_clients.set()
        for _ in procs:
            records.extend(results.get(timeout=CALL_TIMEOUT_S + 60))
        for proc in procs:
            proc.join(30)
    finally:
        stop_clients.set()
        for proc in procs:
            if proc.is_alive():
                proc.kill()
        nginx_exit = run.stop()
        for slot in run.slots:
            for server in slot.generations:
                server.stream.close()

    assert run.nginx is not None
    phases = [phase_report(p, records, run.nginx) for p in run.phases]
    ok = [r[1] - r[0] for r in records if r[3] == "OK"]
    ok.sort()
    report = {
        "nginx_version": ".".join(map(str, nginx_version(nginx_bin))),
        "replicas": REPLICAS,
        "clients": clients,
        "threads_per_client": threads,
        "calls_in_flight_max": clients * threads,
        "calls": len(records),
        "failed": sum(r[3] != "OK" for r in records),
        "p50_ms": _ms(ok, 50),
        "p99_ms": _ms(ok, 99),
        **timeline,
        "phases": phases,
        "replica_processes": {
            f"r{slot.index}": {"port": slot.port,
                               "processes": [summary(s) for s in slot.generations]}
            for slot in run.slots
        },
        "nginx_exit_code": nginx_exit,
        "nginx_other_errors": [
            line for line in run.nginx.log_between(0, None).splitlines()
            if nginx_errors(line).get("other")
        ][:10],
    }  # fmt: skip
    shutil.rmtree(prefix, ignore_errors=True)
    return report


def problems(report: dict[str, Any], max_kill_failures: int, min_share: float) -> list[str]:
    """What broke the acceptance bounds (empty: none)."""
    found = []
    phases = {p["phase"]: p for p in report["phases"]}
    for name, phase in phases.items():
        if phase["ok"] == 0:
            found.append(f"{name}: no call succeeded")
        if name != "sigkill" and phase["failed"]:
            found.append(f"{name}: {phase['failed']} failed calls {phase['failures']}")
    if phases["sigkill"]["failed"] > max_kill_failures:
        found.append(
            f"sigkill: {phases['sigkill']['failed']} failed calls, bound {max_kill_failures}"
        )
    recovered = phases["recovered"]
    for replica, served in recovered["served_by_replica"].items():
        if served < min_share * recovered["ok"]:
            found.append(f"recovered: {replica} served {served} of {recovered['ok']} calls")
    processes = report["replica_processes"]
    for replica, entry in processes.items():
        for index, process in enumerate(entry["processes"]):
            killed = replica == f"r{KILLED}" and index == 0
            expected = -signal.SIGKILL if killed else 0
            if process["exit_code"] != expected:
                found.append(f"{replica} process {index} exited {process['exit_code']}")
            if not killed and (process["drained"] or {}).get("calls_cut_off", 1) != 0:
                found.append(f"{replica} process {index} drain: {process['drained']}")
            if process["warnings"]:
                found.append(f"{replica} process {index} warned: {process['warnings'][0]}")
    if report["nginx_exit_code"] != 0:
        found.append(f"nginx exited {report['nginx_exit_code']}")
    return found


def print_table(report: dict[str, Any]) -> None:
    """The phases as a table, then the replicas' processes."""
    head = ("phase", "s", "calls", "failed", "calls/s", "p50 ms", "p99 ms", "r0/r1/r2", "nginx")
    rows = [head]
    for p in report["phases"]:
        served = "/".join(str(n) for n in p["served_by_replica"].values())
        errors = ", ".join(f"{k}: {n}" for k, n in p["nginx_errors"].items()) or "-"
        failed = str(p["failed"]) + (f" {p['failures']}" if p["failed"] else "")
        rows.append((p["phase"], f"{p['seconds']:.1f}", str(p["calls"]), failed,
                     str(p["calls_per_s"]), str(p["p50_ms"]), str(p["p99_ms"]), served,
                     errors))  # fmt: skip
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for row in rows:
        print("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    for p in report["phases"]:
        for sample in p["failure_samples"]:
            print(f"  {p['phase']} failure: {sample}")
    for replica, entry in report["replica_processes"].items():
        for process in entry["processes"]:
            print(f"{replica} [::1]:{entry['port']} pid {process['pid']}: exit "
                  f"{process['exit_code']}, draining {process['draining']}, "
                  f"drained {process['drained']}, "
                  f"{len(process['warnings'])} warnings")  # fmt: skip
    for key in ("nginx_version", "calls", "failed", "p50_ms", "p99_ms", "sigterm_to_exit_s",
                "restart_to_serving_s", "nginx_exit_code"):  # fmt: skip
        print(f"{key}: {report.get(key)}")


def main(
    steady: Annotated[float, typer.Option(help="Seconds with all replicas serving.")] = 8,
    phase: Annotated[
        float, typer.Option(help="Seconds of the SIGTERM and SIGKILL phases each.")
    ] = 6,
    recovered: Annotated[float, typer.Option(help="Seconds after the restarts.")] = 8,
    warmup: Annotated[float, typer.Option(help="Seconds of load before 'steady'.")] = 2,
    clients: Annotated[int, typer.Option(help="Client processes, one channel each.")] = 2,
    threads: Annotated[int, typer.Option(help="Threads per client, one call each.")] = 4,
    max_kill_failures: Annotated[
        int | None,
        typer.Option(help="Bound on failed calls in the SIGKILL phase [clients x threads]."),
    ] = None,
    min_share: Annotated[
        float, typer.Option(help="Least share of calls each replica serves once recovered.")
    ] = 0.15,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the report here.")] = None,
) -> None:
    """Three replicas behind nginx: drain one, kill one, restart both; report every phase."""
    report = scaleout(steady, phase, recovered, clients, threads, warmup)
    bound = clients * threads if max_kill_failures is None else max_kill_failures
    report["problems"] = problems(report, bound, min_share)
    print_table(report)
    if json_out is not None:
        json_out.write_text(json.dumps(report, indent=2) + "\n")
    if report["problems"]:
        print("FAILED: " + "; ".join(report["problems"]), file=sys.stderr)
        raise typer.Exit(1)
    print("scale-out passed")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    typer.run(main)
