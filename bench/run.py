"""The benchmark behind `nox -s bench`: mnist-service against two baselines, on loopback.

    python -m bench.run            # everything, about 10 minutes; writes docs/benchmarks.md
    python -m bench.run --quick    # a subset (conv), about 2 minutes
    python -m bench.run --smoke    # two kinds, one level, seconds; what the tests run

One pinned core per side: servers run under `taskset` on one core, h2load and the stream
client on another, so a server's numbers are what one core buys. A last part runs the service
with its worker processes and the thread-pool baseline unpinned, driven over several
connections. Real MNIST test digits are sent (bench/payloads.py): in MNIST format, as 784 raw
bytes and as PNG files, through every RPC; and as users send them (a noisy or inverted 28x28
crop, a canvas export, a phone photo) through Predict on every server and through one
PredictBatch that mixes every kind. Every run is bracketed by grpc-status checks; failures
show as errors in the tables instead of stopping the run, so it stays usable while the server
changes. Not a test: nothing asserts on timings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated, Any, Concatenate, ParamSpec

import numpy as np
import numpy.typing as npt
import typer

from mnist_service.loadgen.latency import median

from . import load, payloads, report
from .payloads import KINDS, USER_KINDS
from .report import MACHINE, ONNXRUNTIME, PINNED, Row
from .servers import (
    AIO,
    ROOT,
    SERVICE,
    THREADPOOL,
    WEIGHTS,
    Server,
    ServerPool,
    pinned,
    service_flags,
)

PREDICT_IMAGE = 0  # a 7 that both models get right, so a wrong label means a broken server
BATCH_IMAGES = 64
BATCH_IN_FLIGHT = 4
MACHINE_CONNECTIONS = 4  # one HTTP/2 connection lands on one worker process
MACHINE_STREAMS = 16
CHILD_SLACK_S = 90.0
BUSY_WARNING = 0.1

P = ParamSpec("P")


@dataclass(frozen=True)
class Plan:
    """Which scenarios run, and for how long each."""

    models: tuple[str, ...] = ("conv", "mlp")
    payloads: tuple[str, ...] = ("mnist-png", "raw")
    """MNIST-format kinds (see bench/payloads.py): every RPC at every level of `in_flight`."""
    user_payloads: tuple[str, ...] = USER_KINDS
    """Kinds as users send them: Predict on every server at every level of `user_in_flight`."""
    in_flight: tuple[int, ...] = (1, 8, 64)
    user_in_flight: tuple[int, ...] = (1, 64)
    baselines: tuple[str, ...] = (THREADPOOL, AIO)
    batch: bool = True
    """PredictBatch of each MNIST-format kind, and of a mix of every kind in the plan."""
    stream: bool = True
    oip: bool = True
    """ModelInfer (Open Inference Protocol) rows beside the service's Predict rows."""
    model_speed: bool = True
    machine_wide: bool = True
    seconds: int = 4
    warmup_s: float = 1.0
    latency_rounds: int = 3
    """One call in flight is about latency, and a burst of noise from the shared machine that
    hits one server's run and not the next one's decides a p99: Predict at one call in flight
    is measured in this many rounds of `round_seconds` each, alternating between the servers,
    and reports the median round's figures."""

    @property
    def round_seconds(self) -> int:
        """Timed seconds of one latency round: the scenario's time shared out, rounded up."""
        return -(-self.seconds // self.latency_rounds)


FULL = Plan()
QUICK = Plan(models=("conv",), payloads=("mnist-png",), in_flight=(1, 64), seconds=2,
             warmup_s=0.5, latency_rounds=1)  # fmt: skip
SMOKE = Plan(
    models=("conv",), payloads=("raw",), user_payloads=("photo-1024",), in_flight=(8,),
    user_in_flight=(8,), baselines=(THREADPOOL,), batch=False, stream=False, model_speed=False,
    machine_wide=False, seconds=1, warmup_s=0.2, latency_rounds=1,
)  # fmt: skip


@dataclass(frozen=True)
class Cores:
    """Where the load runs and where a pinned server runs (None: anywhere)."""

    load: int | None
    server: int | None

    @classmethod
    def pick(cls) -> Cores:
        usable = sorted(os.sched_getaffinity(0))
        if len(usable) < 2:
            print("warning: fewer than 2 usable cores; nothing is pinned", file=sys.stderr)
            return cls(None, None)
        return cls(usable[0], usable[1])


def _digits() -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]:
    """The MNIST test digits and their labels (cached on disk by training.data)."""
    from training.data import load_mnist

    return load_mnist("test")


@dataclass(frozen=True)
class Payload:
    """The request bodies of one image of one payload kind, as h2load files and as data for
    the checks."""

    kind: str
    predict_data: bytes
    predict_label: int
    predict_body: Path
    infer_request: Any
    """The ModelInfer request of the same image (for `model`)."""
    infer_body: Path

    @classmethod
    def write(cls, kind: str, directory: Path, model: str = "conv") -> Payload:
        pixels, labels = _digits()
        data = payloads.verify(kind, payloads.render(kind, pixels[PREDICT_IMAGE], PREDICT_IMAGE))
        predict_body = directory / f"predict-{kind}.bin"
        predict_body.write_bytes(load.grpc_frame(load.mnist_pb2.MnistImage(data=data)))
        infer_request = load.model_infer_request(model, data, kind)
        infer_body = directory / f"infer-{model}-{kind}.bin"
        infer_body.write_bytes(load.grpc_frame(infer_request))
        return cls(kind, data, int(labels[PREDICT_IMAGE]), predict_body, infer_request,
                   infer_body)  # fmt: skip

    @property
    def mnist_format(self) -> bool:
        """Whether even a naive server can be expected to give the right label."""
        return KINDS[self.kind].mnist_format


@dataclass(frozen=True)
class Batch:
    """One PredictBatch request of BATCH_IMAGES test digits, of one kind or of several."""

    name: str
    """The payload kind, or "mixed"."""
    kinds: tuple[str, ...]
    """The kinds the items cycle through (one: every item is of that kind)."""
    data: list[bytes]
    body: Path

    @classmethod
    def write(cls, kinds: tuple[str, ...], directory: Path) -> Batch:
        pixels, _ = _digits()
        data = payloads.mixed(kinds, pixels[:BATCH_IMAGES])
        for index, item in enumerate(data):
            payloads.verify(kinds[index % len(kinds)], item)
        name = kinds[0] if len(kinds) == 1 else "mixed"
        body = directory / f"batch-{name}.bin"
        images = [load.mnist_pb2.MnistImage(data=item) for item in data]
        body.write_bytes(load.grpc_frame(load.mnist_pb2.PredictBatchRequest(images=images)))
        return cls(name, kinds, data, body)


class Bench:
    """Runs scenarios and collects rows; a failing scenario becomes a row with its problem."""

    def __init__(self, plan: Plan, cores: Cores, workdir: Path) -> None:
        self.plan = plan
        self.cores = cores
        self.workdir = workdir
        self.rows: list[Row] = []
        self._runs: dict[int, list[load.H2Result]] = {}  # by id(row): its rounds so far

    def _h2load(self, server: Server, row: Row, path: str, body: Path, conns: int, streams: int,
                check: load.Check) -> None:  # fmt: skip
        core = self.cores.load if row.setting == PINNED else None
        # Predict at one call in flight runs in rounds (see `Plan.latency_rounds`).
        rounds = self.plan.latency_rounds if (row.rpc, streams * conns) == ("Predict", 1) else 1
        result = load.run_h2load(
            port=server.port or 0, path=path, body=body, connections=conns, streams=streams,
            seconds=self.plan.round_seconds if rounds > 1 else self.plan.seconds,
            warmup_s=self.plan.warmup_s / rounds, core=core,
            log_file=self.workdir / "h2load.log",
        )  # fmt: skip
        runs = self._runs.setdefault(id(row), [])
        runs.append(result)
        # The median round (one round: itself), figure by figure.
        row.req_per_s = median(run.rate for run in runs)
        row.client_cpu = median(run.client_cpu for run in runs)
        row.p50_ms, row.p90_ms, row.p99_ms = (_median(run.percentile(q) for run in runs)
                                              for q in (50, 90, 99))  # fmt: skip
        lost = result.failed + result.non_2xx + load.short_replies(result, check.reply_bytes)
        row.errors += lost
        if lost and not row.problem:
            row.problem = f"h2load: {result.failed} failed, {result.non_2xx} non-2xx, short replies"

    def _checked(self, row: Row, check: load.Check) -> bool:
        """Record a check; False when every call failed (the timed run would be meaningless)."""
        row.checked_calls += check.calls
        row.wrong_labels += check.wrong_labels
        row.errors += len(check.problems)
        row.problem = row.problem or (check.problems[0] if check.problems else "")
        return len(check.problems) < check.calls

    def predict(self, server: Server, row: Row, payload: Payload, conns: int, streams: int) -> None:
        """Unary Predict through h2load, checked before and after. The service must give the
        right label on every kind; a baseline, whose preprocessing is naive, only on MNIST
        format (elsewhere a wrong label is counted, not an error)."""
        demand = server.name == SERVICE or payload.mnist_format

        def check() -> load.Check:
            return load.check_predict(server.address, payload.predict_data, payload.predict_label,
                                      demand_label=demand)  # fmt: skip

        first = check()
        if self._checked(row, first):
            self._h2load(server, row, load.PREDICT, payload.predict_body, conns, streams, first)
            self._checked(row, check())
        row.images_per_s = row.req_per_s

    def model_infer(
        self, server: Server, row: Row, payload: Payload, conns: int, streams: int
    ) -> None:
        """Unary ModelInfer (Open Inference Protocol) of the same image, checked likewise."""

        def check() -> load.Check:
            return load.check_model_infer(
                server.address, payload.infer_request, payload.predict_label
            )

        first = check()
        if self._checked(row, first):
            self._h2load(server, row, load.MODEL_INFER, payload.infer_body, conns, streams, first)
            self._checked(row, check())
        row.images_per_s = row.req_per_s

    def batch(self, server: Server, row: Row, batch: Batch) -> None:
        """PredictBatch with BATCH_IMAGES images per call through h2load, checked likewise."""
        first = load.check_batch(server.address, batch.data)
        if self._checked(row, first):
            self._h2load(server, row, load.PREDICT_BATCH, batch.body, 1, BATCH_IN_FLIGHT, first)
            self._checked(row, load.check_batch(server.address, batch.data))
        if row.req_per_s is not None:
            row.images_per_s = row.req_per_s * BATCH_IMAGES

    def stream(self, server: Server, row: Row, payload: Payload) -> None:
        """One PredictStream call from bench.stream_client on the load core."""
        command = [sys.executable, "-m", "bench.stream_client", "--address", server.address,
                   "--payload", payload.kind, "--seconds", str(self.plan.seconds)]  # fmt: skip
        done = subprocess.run(
            pinned(self.cores.load, command), capture_output=True, text=True, check=False,
            cwd=ROOT, timeout=self.plan.seconds + CHILD_SLACK_S,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"stream client failed: {done.stderr.strip()[-300:]}")
        result = json.loads(done.stdout)
        row.images_per_s = result["images_per_s"]
        row.client_cpu = result["client_cpu"]
        row.errors += result["errors"]
        row.problem = row.problem or result["problem"]

    def model_speed(self, model: str) -> None:
        """onnxruntime alone on the server core, batch 1 and batch 64."""
        command = [sys.executable, "-m", "bench.model_speed", "--model", str(WEIGHTS[model]),
                   "--seconds", str(min(self.plan.seconds, 2))]  # fmt: skip
        rows = [Row(model, "-", ONNXRUNTIME, size, PINNED, ONNXRUNTIME, f"model only, batch {size}")
                for size in (1, BATCH_IMAGES)]  # fmt: skip
        try:
            done = subprocess.run(
                pinned(self.cores.server, command), capture_output=True, text=True, check=True,
                cwd=ROOT, timeout=4 * self.plan.seconds + CHILD_SLACK_S,
            )  # fmt: skip
            result = json.loads(done.stdout)
            for row in rows:
                row.images_per_s = result[f"batch_{row.in_flight}"]
        except (subprocess.SubprocessError, ValueError, KeyError) as exc:
            for row in rows:
                row.errors, row.problem = 1, f"model_speed failed: {exc}"
        self.rows += rows

    def attempt(
        self,
        row: Row,
        server: Server | str,
        measure: Callable[Concatenate[Server, Row, P], None],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> None:
        """Run one scenario (or one more round of it) into `row`; a server that did not start
        or a crash is an error."""
        if not any(known is row for known in self.rows):
            self.rows.append(row)
        if isinstance(server, str):
            row.errors, row.problem = 1, server
            return
        try:
            measure(server, row, *args, **kwargs)
        except (RuntimeError, OSError, subprocess.SubprocessError, ValueError) as exc:
            row.errors += 1
            row.problem = row.problem or f"{type(exc).__name__}: {exc}"
        print(f"  {row.model} {row.label:<38} {row.server:<20} "
              f"{report._number(row.images_per_s):>10} images/s  errors {row.errors}",
              file=sys.stderr, flush=True)  # fmt: skip


def _median(values: Iterable[float | None]) -> float | None:
    known = [value for value in values if value is not None]
    return median(known) if known else None


def start(pool: ServerPool, name: str, model: str, core: int | None, workers: int,
          flags: set[str], extra: list[str]) -> Server | str:  # fmt: skip
    """A started server, or why it did not start."""
    try:
        if name == SERVICE:
            return pool.service(model, core, workers=workers, flags=flags, extra=extra)
        return pool.baseline(name, model, core)
    except (RuntimeError, OSError) as exc:
        return f"{name} did not start: {str(exc)[:200]}"


def _predict_rows(bench: Bench, servers: dict[str, Server | str], model: str, payload: Payload,
                  levels: tuple[int, ...]) -> None:  # fmt: skip
    """Predict of one payload on every server at every level; at one call in flight, in rounds
    that alternate between the servers (see `Plan.latency_rounds`)."""
    rows = {(name, level): Row(model, payload.kind, "Predict", level, PINNED, name,
                               f"Predict {payload.kind}, {level} in flight")
            for name in servers for level in levels}  # fmt: skip
    bench.rows += rows.values()  # the tables keep this order: by server, then level
    for level in levels:
        for _ in range(bench.plan.latency_rounds if level == 1 else 1):
            for name, server in servers.items():  # alternating, round by round
                bench.attempt(rows[name, level], server, bench.predict, payload, 1, level)


def run_plan(plan: Plan, extra: list[str]) -> tuple[list[Row], dict[str, object]]:
    """Every scenario of `plan`; the rows and the settings that shaped them."""
    load.h2load_path()  # fail before starting anything
    cores = Cores.pick()
    flags = service_flags()
    with tempfile.TemporaryDirectory(prefix="mnist-bench-") as tmp, ServerPool() as pool:
        bench = Bench(plan, cores, Path(tmp))
        kinds = (*plan.payloads, *plan.user_payloads)
        batches = [Batch.write((kind,), Path(tmp)) for kind in plan.payloads if plan.batch]
        if plan.batch and plan.user_payloads:
            batches.append(Batch.write(kinds, Path(tmp)))
        for model in plan.models:
            by_kind = {kind: Payload.write(kind, Path(tmp), model) for kind in kinds}
            print(f"{model}: one pinned core", file=sys.stderr, flush=True)
            if plan.model_speed:
                bench.model_speed(model)
            servers = {name: start(pool, name, model, cores.server, 1, flags, extra)
                       for name in (SERVICE, *plan.baselines)}  # fmt: skip
            service = servers[SERVICE]
            for kind in plan.payloads:
                payload = by_kind[kind]
                _predict_rows(bench, servers, model, payload, plan.in_flight)
                for level in plan.in_flight if plan.oip else ():
                    row = Row(model, kind, "ModelInfer", level, PINNED, SERVICE,
                              f"ModelInfer (OIP) {kind}, {level} in flight")  # fmt: skip
                    bench.attempt(row, service, bench.model_infer, payload, 1, level)
                for batch in (batch for batch in batches if batch.name == kind):
                    row = Row(model, kind, "PredictBatch", BATCH_IN_FLIGHT, PINNED, SERVICE,
                              f"PredictBatch {kind} ×{BATCH_IMAGES}, {BATCH_IN_FLIGHT} in "
                              "flight")  # fmt: skip
                    bench.attempt(row, service, bench.batch, batch)
                if plan.stream:
                    row = Row(model, kind, "PredictStream", 1, PINNED, SERVICE,
                              f"PredictStream {kind}, 1 stream")  # fmt: skip
                    bench.attempt(row, service, bench.stream, payload)
            for kind in plan.user_payloads:
                _predict_rows(bench, servers, model, by_kind[kind], plan.user_in_flight)
            for batch in (batch for batch in batches if batch.name == "mixed"):
                row = Row(model, batch.name, "PredictBatch", BATCH_IN_FLIGHT, PINNED, SERVICE,
                          f"PredictBatch mixed ×{BATCH_IMAGES} ({len(batch.kinds)} kinds), "
                          f"{BATCH_IN_FLIGHT} in flight", mix=list(batch.kinds))  # fmt: skip
                bench.attempt(row, service, bench.batch, batch)
            pool.stop_all()
            if plan.machine_wide:
                print(f"{model}: whole machine", file=sys.stderr, flush=True)
                workers = len(os.sched_getaffinity(0))  # the service's default: usable cores
                servers = {name: start(pool, name, model, None, workers, flags, extra)
                           for name in (SERVICE, THREADPOOL)}  # fmt: skip
                level = MACHINE_CONNECTIONS * MACHINE_STREAMS
                for kind in plan.payloads:
                    for name, server in servers.items():
                        row = Row(model, kind, "Predict", level, MACHINE, name,
                                  f"Predict {kind}, {MACHINE_CONNECTIONS} conns × "
                                  f"{MACHINE_STREAMS}, unpinned")  # fmt: skip
                        bench.attempt(row, server, bench.predict, by_kind[kind],
                                      MACHINE_CONNECTIONS, MACHINE_STREAMS)  # fmt: skip
                pool.stop_all()
    settings: dict[str, object] = {
        **{key: value for key, value in asdict(plan).items() if key != "baselines"},
        "baselines": list(plan.baselines),
        "load_core": cores.load,
        "server_core": cores.server,
        "service_flags_seen": sorted(flags & {"--workers", "--intra-op-threads",
                                              "--max-batch-size", "--max-batch-delay"}),
        "extra_server_args": extra,
        "servers": _describe_servers(flags, extra),
        "kinds": {kind: KINDS[kind].description for kind in (*plan.payloads, *plan.user_payloads)},
        "baseline_preprocessing": report.BASELINE_NOTE,
    }  # fmt: skip
    return bench.rows, settings


def _describe_servers(flags: set[str], extra: list[str]) -> str:
    intra = " --intra-op-threads 1" if "--intra-op-threads" in flags else ""
    quiet = " --no-access-log" if "--no-access-log" in flags else ""
    workers = len(os.sched_getaffinity(0))
    return (
        f"mnist-service `--workers 1{intra}{quiet}` pinned and `--workers {workers}{intra}{quiet}`"
        f" unpinned, other settings {'`' + ' '.join(extra) + '`' if extra else 'at their defaults'}"
        " (without its request log, since the baselines log nothing per call: the log costs about"
        " 20 us of CPU a call, see docs/operations.md); thread-pool baseline with 10 threads"
        " (grpcio's examples)"
    )


DOCS_HEADER = """# Benchmarks

Generated by `{command}` ({date}) on {cpu}; rerun it to refresh this page.

Method, in short: servers run pinned to one core (`taskset`), the load (h2load, or a grpcio
stream client) on another; each timed run lasts {seconds} s after {warmup} s of warm-up and is
bracketed by grpc-status checks from a grpcio client (h2load itself only sees HTTP statuses).
Predict rows with 1 call in flight measure latency, whose tail a burst of noise on a shared
machine decides: they run in {rounds} rounds of {round_seconds} s, alternating between the
servers, and give the median round's figures. Percentiles interpolate linearly between closest
ranks (numpy's default), the project's one definition (`mnist_service/loadgen/latency.py`).

What is sent (`bench/payloads.py`): real MNIST test digits, each made into a file
deterministically. In MNIST format, which skips almost all of the service's preprocessing,
through every RPC:

{mnist_kinds}

and as users send them, through Predict on every server at {user_levels} in flight, and mixed
in one PredictBatch of {batch} items that cycles through every kind above and below:

{user_kinds}

The service must answer every check with the digit's label, on every kind. Baselines live in
`bench/`: a grpcio thread-pool server and a grpc.aio server, both one inference per call,
Predict only. They preprocess naively (`bench/baseline_model.py`): 784 bytes are raw pixels;
anything else is decoded by Pillow in full, `convert("L")` (an alpha channel is dropped),
resized to 28x28 (bicubic) and scaled to 0-1, with no inversion, cropping or centring. So on
the kinds that are not MNIST format they decode and resize like any server must, but answer
mostly wrong (a black-on-transparent canvas becomes an all-black image): their labels are
checked only on MNIST-format kinds, and the wrong ones elsewhere are listed under each table,
not counted as errors.

"vs" columns divide images/s by the baseline's at the same kind and in-flight level;
PredictBatch and PredictStream rows divide by the baseline's Predict at its highest level, and
the mixed PredictBatch by the harmonic mean of the baseline's Predict at its highest level over
the kinds in the mix (the rate a baseline would reach on the same mix, one call per image).
"model only" rows are onnxruntime on one thread with no gRPC at all: the ceiling for that core.
The whole-machine rows run the service with one worker per core and the thread-pool baseline,
both unpinned, over {connections} connections (one HTTP/2 connection is served by one worker
process), on the MNIST-format kinds. "client CPU" is the load generator's own CPU use (h2load,
or the grpcio stream client): near 100% means the client, not the server, set the pace. "other
load" below is how busy the machine was without the benchmark; much above 0% and the numbers
are unreliable.

## Machine

{machine}

## Results

{tables}
"""


def _kind_list(kinds: Iterable[str]) -> str:
    return "\n".join(f"- `{kind}`: {KINDS[kind].description}" for kind in kinds)


def _share(fraction: float | None) -> str:
    return "?" if fraction is None else f"{fraction:.0%}"


def main(
    quick: Annotated[
        bool, typer.Option(help="A subset (conv; MNIST PNG and every user kind), ~2 minutes.")
    ] = False,
    smoke: Annotated[
        bool, typer.Option(help="Predict of raw and of a photo, service and a baseline (tests).")
    ] = False,
    seconds: Annotated[
        int | None, typer.Option(help="Timed seconds per scenario. [default: by mode]")
    ] = None,
    output: Annotated[
        Path | None, typer.Option(help="JSON file. [default: bench-results/bench-<time>.json]")
    ] = None,
    docs: Annotated[bool, typer.Option(help="Write docs/benchmarks.md (full runs only).")] = True,
    server_arg: Annotated[
        list[str] | None,
        typer.Option(
            help="Extra `mnist-service serve` argument, e.g. --server-arg=--max-batch-size=32."
        ),
    ] = None,
) -> None:
    """Benchmark mnist-service against the baselines; print tables, write JSON (and docs)."""
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C, so the ServerPool still stops servers.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    plan = SMOKE if smoke else QUICK if quick else FULL
    if seconds is not None:
        plan = replace(plan, seconds=seconds)
    started = datetime.now(UTC)
    # Other processes on the machine skew every number; say so rather than publish them quietly.
    busy_before = report.cpu_busy()
    rows, settings = run_plan(plan, server_arg or [])
    busy_after = report.cpu_busy()
    machine = {**report.machine(), "servers": str(settings["servers"])}
    machine["other load"] = (
        f"{_share(busy_before)} CPU busy before the run, {_share(busy_after)} after"
    )
    if max(busy_before or 0.0, busy_after or 0.0) > BUSY_WARNING:
        print(f"warning: the machine was busy ({machine['other load']}): numbers are unreliable",
              file=sys.stderr)  # fmt: skip
    text = report.tables(rows, plan.models, machine["cpu"])
    print(f"\n{report.markdown_machine(machine)}\n\n{text}")
    stamp = started.strftime("%Y%m%dT%H%M%SZ")
    output = output or ROOT / "bench-results" / f"bench-{stamp}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m bench.run " + " ".join(sys.argv[1:])
    output.write_text(json.dumps({
        "started": started.isoformat(), "command": command.strip(), "machine": machine,
        "settings": settings, "rows": [asdict(row) for row in rows],
    }, indent=2))  # fmt: skip
    print(f"\nwrote {output}")
    if docs and not (quick or smoke):
        page = ROOT / "docs" / "benchmarks.md"
        page.parent.mkdir(exist_ok=True)
        page.write_text(DOCS_HEADER.format(
            command="nox -s bench" if not sys.argv[1:] else command.strip(),
            date=started.strftime("%Y-%m-%d"), cpu=machine["cpu"], seconds=plan.seconds,
            warmup=plan.warmup_s, rounds=plan.latency_rounds, round_seconds=plan.round_seconds,
            mnist_kinds=_kind_list(plan.payloads), user_kinds=_kind_list(plan.user_payloads),
            user_levels=" and ".join(map(str, plan.user_in_flight)), batch=BATCH_IMAGES,
            connections=MACHINE_CONNECTIONS, machine=report.markdown_machine(machine), tables=text,
        ))  # fmt: skip
        print(f"wrote {page.relative_to(ROOT)}")


if __name__ == "__main__":
    typer.run(main)
