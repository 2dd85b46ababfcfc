"""The `mnist-service` command line: serve, predict, info. The only place that wires things.

Every option can also come from an environment variable (shown in `--help`), which suits
containers; flags win over the environment.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, NoReturn

import typer
from grpclib.exceptions import GRPCError, StreamTerminatedError

from . import __version__
from .config import DEFAULT_HOST, DEFAULT_PORT, Limits, ServerConfig, format_address, parse_address
from .constants import Architecture
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
_limits = Limits()
_config = ServerConfig()
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
def serve(
    model_architecture: Annotated[
        Architecture,
        typer.Option(envvar="MNIST_MODEL_ARCHITECTURE", help="Which network: mlp or conv."),
    ] = "conv",
    model_weights: Annotated[
        Path | None,
        typer.Option(
            envvar="MNIST_MODEL_WEIGHTS",
            help="An ONNX model file. [default: the shipped weights of the architecture]",
            show_default=False,
        ),
    ] = None,
    models: Annotated[
        str | None,
        typer.Option(
            envvar="MNIST_MODELS",
            help="Models the Open Inference Protocol serves, comma-separated (e.g. conv,mlp);"
            " must include --model-architecture. [default: the --model-architecture one]",
            show_default=False,
        ),
    ] = None,
    address: Annotated[
        str,
        typer.Option(envvar="MNIST_ADDRESS", help="Listen on HOST:PORT; port 0 picks a free one."),
    ] = DEFAULT_ADDRESS,
    device: Annotated[
        str,
        typer.Option(
            envvar="MNIST_DEVICE",
            help="auto (CUDA when onnxruntime offers it, else CPU), cpu or cuda.",
        ),
    ] = "auto",
    workers: Annotated[
        int | None,
        typer.Option(
            envvar="MNIST_WORKERS",
            help="Server processes sharing the port. [default: usable cores]",
            show_default=False,
        ),
    ] = None,
    reuse_port: Annotated[
        bool,
        typer.Option(
            envvar="MNIST_REUSE_PORT",
            help="Each worker gets its own SO_REUSEPORT socket (balances connections better"
            " than one shared socket).",
        ),
    ] = _config.reuse_port,
    intra_op_threads: Annotated[
        int,
        typer.Option(envvar="MNIST_INTRA_OP_THREADS", help="onnxruntime threads per model run."),
    ] = _config.intra_op_threads,
    decode_threads: Annotated[
        int,
        typer.Option(
            envvar="MNIST_DECODE_THREADS",
            help="Threads per worker for big images (small ones decode inline).",
        ),
    ] = _config.decode_threads,
    max_batch_size: Annotated[
        int,
        typer.Option(envvar="MNIST_MAX_BATCH_SIZE", help="Most images one model run takes."),
    ] = _config.max_batch_size,
    max_batch_delay: Annotated[
        int,
        typer.Option(
            envvar="MNIST_MAX_BATCH_DELAY",
            help="Microseconds an incomplete batch may wait for more requests (0: never).",
        ),
    ] = _config.max_batch_delay_us,
    busy_poll: Annotated[
        int,
        typer.Option(
            envvar="MNIST_BUSY_POLL",
            help="Microseconds an idle worker polls for more calls before it sleeps, while"
            " traffic is dense (0: always sleep; saves CPU under a CPU quota).",
        ),
    ] = _config.busy_poll_us,
    max_batch_images: Annotated[
        int,
        typer.Option(
            envvar="MNIST_MAX_BATCH_IMAGES", help="Most images one PredictBatch call may carry."
        ),
    ] = _limits.max_batch_images,
    max_queue: Annotated[
        int,
        typer.Option(
            envvar="MNIST_MAX_QUEUE",
            help="Images a worker may have waiting; past it new work gets RESOURCE_EXHAUSTED.",
        ),
    ] = _limits.max_queue,
    grace_period: Annotated[
        float,
        typer.Option(envvar="MNIST_GRACE_PERIOD", help="Seconds to drain on SIGTERM/SIGINT."),
    ] = 10.0,
    max_message_bytes: Annotated[
        int, typer.Option(envvar="MNIST_MAX_MESSAGE_BYTES", help="Largest request message.")
    ] = _limits.max_message_bytes,
    max_connection_bytes: Annotated[
        int | None,
        typer.Option(
            envvar="MNIST_MAX_CONNECTION_BYTES",
            help="Most bytes of request messages one connection may have arriving at once."
            " [default: 4 × --max-message-bytes]",
            show_default=False,
        ),
    ] = None,
    max_message_seconds: Annotated[
        float,
        typer.Option(
            envvar="MNIST_MAX_MESSAGE_SECONDS",
            help="Seconds a request message's body may take to arrive.",
        ),
    ] = _limits.max_message_seconds,
    max_image_pixels: Annotated[
        int,
        typer.Option(envvar="MNIST_MAX_IMAGE_PIXELS", help="Largest image (width × height)."),
    ] = _limits.max_image_pixels,
    tls_cert: Annotated[
        Path | None,
        typer.Option(
            envvar="MNIST_TLS_CERT",
            help="PEM certificate chain: serve TLS only (with --tls-key). [default: plaintext]",
            show_default=False,
        ),
    ] = None,
    tls_key: Annotated[
        Path | None,
        typer.Option(envvar="MNIST_TLS_KEY", help="PEM private key of --tls-cert."),
    ] = None,
    tls_client_ca: Annotated[
        Path | None,
        typer.Option(
            envvar="MNIST_TLS_CLIENT_CA",
            help="PEM CA bundle: require client certificates it signed (mutual TLS).",
        ),
    ] = None,
    metrics_address: Annotated[
        str | None,
        typer.Option(
            envvar="MNIST_METRICS_ADDRESS",
            help="Serve Prometheus metrics at http://HOST:PORT/metrics (all workers in one"
            " scrape); port 0 picks a free one. [default: no metrics]",
            show_default=False,
        ),
    ] = None,
    access_log: Annotated[
        bool,
        typer.Option(
            envvar="MNIST_ACCESS_LOG",
            help="One log line per call (method, status, latency, batch, peer, request id).",
        ),
    ] = _config.access_log,
    log_level: Annotated[
        str, typer.Option(envvar="MNIST_LOG_LEVEL", help="debug, info, warning or error.")
    ] = "info",
    log_format: Annotated[
        str, typer.Option(envvar="MNIST_LOG_FORMAT", help="pretty or json.")
    ] = "pretty",
) -> None:
    """Serve the model over gRPC until SIGINT or SIGTERM."""
    from .runtime import workers as worker_processes
    from .runtime.logs import configure_logging

    try:
        host, port = parse_address(address)
        metrics_host, metrics_port = (
            parse_address(metrics_address) if metrics_address is not None else (None, 0)
        )
        config = ServerConfig(
            host=host,
            port=port,
            model_architecture=model_architecture,
            model_weights=model_weights,
            models=tuple(
                m.strip()  # type: ignore[misc]  # validated by ServerConfig
                for m in (models or "").split(",")
                if m.strip()
            ),
            device=device,  # type: ignore[arg-type]  # validated by ServerConfig
            reuse_port=reuse_port,
            intra_op_threads=intra_op_threads,
            decode_threads=decode_threads,
            max_batch_size=max_batch_size,
            max_batch_delay_us=max_batch_delay,
            busy_poll_us=busy_poll,
            grace_period=grace_period,
            limits=Limits(
                max_message_bytes=max_message_bytes,
                max_connection_bytes=max_connection_bytes,
                max_message_seconds=max_message_seconds,
                max_image_pixels=max_image_pixels,
                max_batch_images=max_batch_images,
                max_queue=max_queue,
            ),
            tls_cert=tls_cert,
            tls_key=tls_key,
            tls_client_ca=tls_client_ca,
            access_log=access_log,
            metrics_host=metrics_host,
            metrics_port=metrics_port,
            log_level=log_level,
            log_format=log_format,  # type: ignore[arg-type]  # validated by ServerConfig
            **({"workers": workers} if workers is not None else {}),
        )
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
            return (await client.model_info()).to_json(indent=2)

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
def bench(
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
