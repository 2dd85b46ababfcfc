"""The `mnist-service` command line: serve, predict, info, health, load. The only place that
wires things.

`serve` takes its options from the config's fields (see options.py); each also reads an
environment variable (shown in `--help`), which suits containers, and flags win over it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from grpclib.exceptions import GRPCError, StreamTerminatedError

from . import __version__, options
from .config import DEFAULT_HOST, DEFAULT_PORT, format_address
from .errors import MnistServiceError
from .tls import ClientTls

if TYPE_CHECKING:
    from .client import Prediction

app = typer.Typer(
    name="mnist-service",
    help="MNIST digit classification over gRPC.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

DEFAULT_ADDRESS = format_address(DEFAULT_HOST, DEFAULT_PORT)
AddressOption = Annotated[
    str, typer.Option("--address", "-a", envvar="MNIST_ADDRESS", help="Server HOST:PORT.")
]
TlsOption = Annotated[
    bool,
    typer.Option(
        "--tls", help="Connect over TLS, trusting the system's CAs (implied by --tls-ca etc.)."
    ),
]
TlsCaOption = Annotated[
    Path | None,
    typer.Option("--tls-ca", help="PEM CA bundle to trust for the server's certificate."),
]
TlsCertOption = Annotated[
    Path | None,
    typer.Option("--tls-cert", help="PEM client certificate, for mutual TLS (with --tls-key)."),
]
TlsKeyOption = Annotated[
    Path | None, typer.Option("--tls-key", help="PEM private key of --tls-cert.")
]
TlsServerNameOption = Annotated[
    str | None,
    typer.Option(
        "--tls-server-name",
        help="Name the server's certificate must carry. [default: the host of --address]",
        show_default=False,
    ),
]


def _fail(message: str) -> NoReturn:
    typer.echo(f"mnist-service: error: {message}", err=True)
    raise typer.Exit(code=1)


def _client_tls(
    tls: bool, ca: Path | None, cert: Path | None, key: Path | None, server_name: str | None
) -> ClientTls | None:
    """The client's TLS settings from its options; None (plaintext) when none is given."""
    if not (tls or ca or cert or key or server_name):
        return None
    try:
        return ClientTls(ca=ca, cert=cert, key=key, server_name=server_name)
    except MnistServiceError as exc:
        _fail(str(exc))


def _connection_error(exc: Exception, tls: ClientTls | None) -> str:
    """A client-side failure in one line, with a hint where TLS is the likely cause."""
    if isinstance(exc, GRPCError):
        return exc.message or exc.status.name
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"cannot verify the server's certificate: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed: {exc.reason or exc}; does the server serve TLS?"
    if isinstance(exc, StreamTerminatedError):
        if tls is None:
            hint = "if it serves TLS, pass --tls-ca (or --tls)"
        elif tls.cert is None:
            hint = "if it requires a client certificate, pass --tls-cert and --tls-key"
        else:
            hint = "it may not accept this client certificate"
        return f"the server closed the connection; {hint}"
    if isinstance(exc, OSError) and exc.errno:
        return f"cannot reach the server: {os.strerror(exc.errno).lower()}"
    return str(exc)


def _version(value: bool) -> None:
    if value:
        typer.echo(__version__)
        raise typer.Exit


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """MNIST digit classification over gRPC."""


@app.command()
@options.with_serve_options
def serve(
    *,
    print_config: Annotated[
        bool,
        typer.Option(
            "--print-config",
            help="Print the resolved configuration as JSON and exit, starting nothing.",
        ),
    ] = False,
    **settings: Any,
) -> None:
    """Serve the model over gRPC until SIGINT or SIGTERM.

    Every option also reads the environment variable shown with it; flags win.
    """
    try:
        config = options.build_config(settings)
    except MnistServiceError as exc:
        _fail(str(exc))
    if print_config:
        typer.echo(json.dumps(config.to_dict(), indent=2))
        return

    from .runtime import workers as worker_processes
    from .runtime.logs import configure_logging

    try:
        configure_logging(config.log_level, config.log_format)
        worker_processes.run(config)
    except MnistServiceError as exc:
        _fail(str(exc))


@app.command()
def predict(
    images: Annotated[list[Path], typer.Argument(help="Image files to classify.")],
    address: AddressOption = DEFAULT_ADDRESS,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON lines.")] = False,
    batch: Annotated[
        bool, typer.Option("--batch", help="Send all images in one PredictBatch call.")
    ] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per call.")] = 30.0,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Classify image files with a running server."""
    from .client import ItemFailure, MnistClient

    client_tls = _client_tls(tls, tls_ca, tls_cert, tls_key, tls_server_name)

    def failed(path: Path, reason: str | None) -> None:
        typer.echo(f"{path}: error: {reason}", err=True)

    async def run() -> int:
        failures = 0
        readable: list[tuple[Path, bytes]] = []
        for path in images:
            try:
                readable.append((path, path.read_bytes()))
            except OSError as exc:
                failures += 1
                failed(path, exc.strerror)
        async with MnistClient(address, timeout=timeout, tls=client_tls) as client:
            if batch:
                results = await client.predict_batch([data for _, data in readable])
            else:
                results = []
                for _, data in readable:
                    try:
                        results.append(await client.predict(data))
                    except GRPCError as exc:
                        results.append(ItemFailure(exc.status, exc.message or ""))
        for (path, _), result in zip(readable, results, strict=True):
            if isinstance(result, ItemFailure):
                failures += 1
                failed(path, result.message)
            else:
                _print_prediction(path, result, as_json=as_json)
        return failures

    try:
        failures = asyncio.run(run())
    except (MnistServiceError, OSError, GRPCError, StreamTerminatedError) as exc:
        _fail(_connection_error(exc, client_tls))
    if failures:
        raise typer.Exit(code=1)


def _print_prediction(path: Path, prediction: Prediction, *, as_json: bool) -> None:
    probabilities = [round(p, 6) for p in prediction.probabilities]
    if as_json:
        record = {"image": str(path), "label": prediction.label, "probabilities": probabilities}
        typer.echo(json.dumps(record))
    else:
        bars = "  ".join(f"{digit}:{p:.3f}" for digit, p in enumerate(probabilities))
        typer.echo(
            f"{path}  label={prediction.label}  confidence={prediction.confidence:.3f}  [{bars}]"
        )


@app.command()
def info(
    address: AddressOption = DEFAULT_ADDRESS,
    timeout: Annotated[float, typer.Option(help="Seconds to wait.")] = 10.0,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Print what a running server serves, as JSON."""
    from .client import MnistClient

    client_tls = _client_tls(tls, tls_ca, tls_cert, tls_key, tls_server_name)

    async def run() -> str:
        async with MnistClient(address, timeout=timeout, tls=client_tls) as client:
            return json.dumps(dataclasses.asdict(await client.model_info()), indent=2)

    try:
        typer.echo(asyncio.run(run()))
    except (MnistServiceError, OSError, GRPCError, StreamTerminatedError) as exc:
        _fail(_connection_error(exc, client_tls))


@app.command()
def health(
    address: AddressOption = DEFAULT_ADDRESS,
    service: Annotated[
        str, typer.Option(help='Service to ask about: "" (the whole server) or mnist.Mnist.')
    ] = "",
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answer.")] = 5.0,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Exit 0 only if the server reports SERVING (for container HEALTHCHECKs and exec probes).

    Prints the status; NOT_SERVING (draining), an unknown service or no answer exit 1.
    """
    from .client import MnistClient

    client_tls = _client_tls(tls, tls_ca, tls_cert, tls_key, tls_server_name)

    async def run() -> str:
        async with MnistClient(address, timeout=timeout, tls=client_tls) as client:
            return await client.health(service)

    try:
        status = asyncio.run(run())
    except TimeoutError:
        _fail(f"no answer from {address} within {timeout:g} s")
    except (MnistServiceError, OSError, GRPCError, StreamTerminatedError) as exc:
        _fail(_connection_error(exc, client_tls))
    typer.echo(status)
    if status != "SERVING":
        raise typer.Exit(1)


@app.command()
def load(
    address: AddressOption = DEFAULT_ADDRESS,
    mode: Annotated[
        str,
        typer.Option(help="unary (Predict), batch (PredictBatch) or stream (PredictStream)."),
    ] = "unary",
    concurrency: Annotated[
        int,
        typer.Option("--concurrency", "-c", help="Concurrent callers (streams, in stream mode)."),
    ] = 8,
    duration: Annotated[float, typer.Option("--duration", "-d", help="Seconds to run.")] = 10.0,
    batch_size: Annotated[int, typer.Option(help="Images per PredictBatch call.")] = 64,
    stream_window: Annotated[
        int, typer.Option(help="Images a stream may have unanswered at a time.")
    ] = 32,
    connections: Annotated[
        int | None,
        typer.Option(
            help="HTTP/2 connections the callers share. Each lands on one server process, so "
            "use several per server worker. [default: one per caller, at most 16]",
            show_default=False,
        ),
    ] = None,
    images: Annotated[
        list[Path] | None,
        typer.Option(
            "--images",
            help="An image file, or a directory of them, sent as is; repeatable. "
            "[default: the digits 0-9 drawn in MNIST form]",
            show_default=False,
        ),
    ] = None,
    raw: Annotated[
        bool, typer.Option("--raw", help="Send the drawn digits as 784 raw pixels, not PNG.")
    ] = False,
    model_check: Annotated[
        bool,
        typer.Option(
            "--model-check",
            help="Classify each image once first, then count answers under load that disagree.",
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    timeout: Annotated[float, typer.Option(help="Seconds per call.")] = 30.0,
    max_requests: Annotated[
        int | None,
        typer.Option(
            help="Stop after this many requests even if time is left."
            " [default: no practical bound; the duration ends the run]",
            show_default=False,
        ),
    ] = None,
    tls: TlsOption = False,
    tls_ca: TlsCaOption = None,
    tls_cert: TlsCertOption = None,
    tls_key: TlsKeyOption = None,
    tls_server_name: TlsServerNameOption = None,
) -> None:
    """Load a running server; report throughput, latency percentiles and errors."""
    import sys

    from . import loadgen

    client_tls = _client_tls(tls, tls_ca, tls_cert, tls_key, tls_server_name)

    if raw and images:
        _fail("--raw applies to the drawn digits; --images files are sent as they are")
    try:
        config = loadgen.LoadConfig(
            address=address,
            payloads=loadgen.load_images(images) if images else loadgen.generated_digits(raw=raw),
            mode=mode,  # type: ignore[arg-type]  # validated by LoadConfig
            concurrency=concurrency,
            duration_s=duration,
            batch_size=batch_size,
            stream_window=stream_window,
            connections=connections,
            call_timeout_s=timeout,
            model_check=model_check,
            tls=client_tls,
            **({"max_requests": max_requests} if max_requests is not None else {}),
        )
    except (MnistServiceError, OSError) as exc:
        _fail(str(exc))

    live = sys.stderr.isatty()

    def show(progress: loadgen.Progress) -> None:
        line = loadgen.format_progress(progress)
        if live:
            sys.stderr.write(f"\r\x1b[K{line}")
            sys.stderr.flush()
        else:
            typer.echo(line, err=True)

    try:
        report = loadgen.run(config, on_progress=show, progress_interval_s=0.25 if live else 5.0)
    except (MnistServiceError, OSError, GRPCError, StreamTerminatedError) as exc:
        _fail(f"cannot load {address}: {_connection_error(exc, client_tls)}")
    finally:
        if live:
            sys.stderr.write("\r\x1b[K")
    if as_json:
        typer.echo(json.dumps(report.to_json(), indent=2))
        if report.cpu_bound:
            typer.echo(
                "mnist-service: warning: the client was CPU-bound; see client.busy", err=True
            )
    else:
        typer.echo(loadgen.format_report(report))
    if report.interrupted:
        raise typer.Exit(code=130)


# `load`'s name until issue 22, when "bench" came to mean the benchmark suite (bench/, `nox -s
# bench`) alone: kept, unlisted, so that scripts which call it keep working unchanged.
app.command(
    "bench", hidden=True, help="The `load` command's former name (deprecated): the same options."
)(load)
