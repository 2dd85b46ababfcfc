"""The server's settings: one frozen, validated object built once by the CLI.

Nothing deeper in the package reads the environment; everything it needs is passed down from
here. Defaults live on the dataclasses so the CLI, tests and the library agree on them.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import ipaddress
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from .constants import ARCHITECTURES, WEIGHT_FILES, Architecture
from .errors import ConfigError

Device = Literal["auto", "cpu", "cuda"]
DEVICES: tuple[Device, ...] = ("auto", "cpu", "cuda")
LogFormat = Literal["pretty", "json"]
LOG_FORMATS: tuple[LogFormat, ...] = ("pretty", "json")
LOG_LEVELS = ("debug", "info", "warning", "error")

DEFAULT_HOST = "::1"
DEFAULT_PORT = 50051


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What one request may cost the server; requests beyond these are refused."""

    max_message_bytes: int = 4 * 1024 * 1024
    """Largest request message accepted (gRPC's customary default, 4 MiB)."""

    max_connection_bytes: int | None = None
    """Most bytes of request messages one connection may have arriving at once (None: four
    times `max_message_bytes`, 16 MiB by default). See `connection_bytes`."""

    max_message_seconds: float = 10.0
    """How long a request message's body may take to arrive once its prefix has."""

    max_image_pixels: int = 4096 * 4096
    """Largest image (width × height) decoded; checked from the header, before decoding."""

    max_stream_in_flight: int = 64
    """Images of one PredictStream call being worked on at once (back-pressure beyond it)."""

    max_batch_images: int = 1024
    """Images one PredictBatch call may carry; more is INVALID_ARGUMENT."""

    max_queue: int = 2048
    """Images a worker may have taken into preprocessing and inference and not yet answered;
    past it, new work is refused at once (RESOURCE_EXHAUSTED) rather than queued. About a
    second of ConvNet work on one core."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if value is None:
                continue
            if isinstance(value, float) and value <= 0:
                raise ConfigError(f"{f.name} must be positive, got {value}")
            if isinstance(value, int) and value < 1:
                raise ConfigError(f"{f.name} must be at least 1, got {value}")
        if self.max_queue < self.max_batch_images:
            raise ConfigError(
                f"max_queue ({self.max_queue}) must be at least max_batch_images "
                f"({self.max_batch_images}), or the largest PredictBatch could never be taken"
            )
        if self.connection_bytes < self.max_message_bytes:
            raise ConfigError(
                f"max_connection_bytes ({self.connection_bytes}) must be at least "
                f"max_message_bytes ({self.max_message_bytes})"
            )

    @property
    def connection_bytes(self) -> int:
        """`max_connection_bytes`, resolved."""
        return self.max_connection_bytes or 4 * self.max_message_bytes


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Everything `serve` needs, validated on construction."""

    host: str = DEFAULT_HOST
    port: int = DEFAULT_PORT
    model_architecture: Architecture = "conv"
    model_weights: Path | None = None
    """An ONNX file; None serves the shipped weights of `model_architecture`."""
    models: tuple[Architecture, ...] = ()
    """The models the Open Inference Protocol serves, each loaded with its own batcher (empty:
    `model_architecture`'s alone). Must include `model_architecture`, whose model the MNIST API
    serves; the others use their shipped weights."""
    device: Device = "auto"
    workers: int = field(default_factory=lambda: usable_cores())
    """Server processes sharing the port, each with its own event loop and model session."""
    reuse_port: bool = hasattr(socket, "SO_REUSEPORT")
    """Workers get a SO_REUSEPORT socket each (the kernel spreads connections over them)
    instead of sharing one listening socket, where one busy worker tends to accept them all."""
    intra_op_threads: int = 1
    """onnxruntime threads per model run; more helps only big batches on spare cores."""
    decode_threads: int = 1
    """Threads per process that decode big images (small ones are decoded inline)."""
    max_batch_size: int = 32
    """Most images one model run takes; concurrent requests are batched up to it."""
    max_batch_delay_us: int = 0
    """How long an incomplete batch may wait for more requests (0: never wait)."""
    busy_poll_us: int = 200
    """How long an idle event loop polls for more work before it sleeps, in microseconds, when
    traffic is dense (0: always sleep). See `runtime/eventloop.py`."""
    grace_period: float = 10.0
    """Seconds in-flight calls get to finish after SIGTERM/SIGINT."""
    limits: Limits = field(default_factory=Limits)
    tls_cert: Path | None = None
    """PEM certificate chain the server presents; with `tls_key`, the server speaks only TLS."""
    tls_key: Path | None = None
    """PEM private key of `tls_cert`."""
    tls_client_ca: Path | None = None
    """PEM CA bundle: clients must present a certificate it signed (mutual TLS)."""
    access_log: bool = True
    """One log line per call at info level (server faults are logged either way)."""
    metrics_host: str | None = None
    """Where Prometheus metrics are served over HTTP (None: no metrics)."""
    metrics_port: int = 9090
    log_level: str = "info"
    log_format: LogFormat = "pretty"

    def __post_init__(self) -> None:
        if self.model_architecture not in ARCHITECTURES:
            raise ConfigError(
                f"model architecture must be one of {', '.join(ARCHITECTURES)}, "
                f"got {self.model_architecture!r}"
            )
        for model in self.models:
            if model not in ARCHITECTURES:
                raise ConfigError(f"models must be among {', '.join(ARCHITECTURES)}, got {model!r}")
        if len(set(self.models)) != len(self.models):
            raise ConfigError(f"models lists a model twice: {', '.join(self.models)}")
        if self.models and self.model_architecture not in self.models:
            raise ConfigError(
                f"models ({', '.join(self.models)}) must include the model architecture "
                f"({self.model_architecture}), which the MNIST API serves"
            )
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        for name in ("port", "metrics_port"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ConfigError(f"{name} must be in 0-65535, got {getattr(self, name)}")
        for name in ("workers", "intra_op_threads", "decode_threads", "max_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("max_batch_delay_us", "busy_poll_us"):
            if getattr(self, name) < 0:
                raise ConfigError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.grace_period < 0:
            raise ConfigError(f"grace period must not be negative, got {self.grace_period}")
        self._check_tls_files()

    def _check_tls_files(self) -> None:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ConfigError(
                "TLS needs both a certificate and its private key (tls_cert, tls_key)"
            )
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ConfigError(
                "a client CA (mutual TLS) needs the server's own certificate and key as well"
            )
        for what, path in (
            ("TLS certificate", self.tls_cert),
            ("TLS key", self.tls_key),
            ("TLS client CA", self.tls_client_ca),
        ):
            if path is not None:
                _check_readable(path, what)

    @property
    def tls(self) -> bool:
        """Whether the server speaks TLS (else plaintext HTTP/2)."""
        return self.tls_cert is not None

    @property
    def weights_path(self) -> Path:
        """The ONNX file to serve: the given one, or the shipped one for the architecture."""
        return self.model_weights or shipped_weights(self.model_architecture)

    @property
    def served_models(self) -> tuple[Architecture, ...]:
        """The models to load: `models`, or `model_architecture`'s alone."""
        return self.models or (self.model_architecture,)

    def weights_for(self, architecture: Architecture) -> Path:
        """The ONNX file of one served model (`model_weights` is `model_architecture`'s)."""
        if architecture == self.model_architecture:
            return self.weights_path
        return shipped_weights(architecture)

    @property
    def address(self) -> str:
        """The configured address in `HOST:PORT` form, IPv6 hosts in brackets."""
        return format_address(self.host, self.port)


def usable_cores() -> int:
    """The cores this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def _check_readable(path: Path, what: str) -> None:
    try:
        with path.open("rb"):
            pass
    except OSError as exc:
        raise ConfigError(f"cannot read the {what} {path}: {exc.strerror}") from exc


def is_loopback(host: str) -> bool:
    """Whether `host` (an IP address or a name) reaches only this machine."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    return bool(infos) and all(
        ipaddress.ip_address(str(info[4][0]).partition("%")[0]).is_loopback for info in infos
    )


def parse_address(address: str) -> tuple[str, int]:
    """Split `HOST:PORT` (IPv6 hosts in brackets, e.g. `[::1]:50051`) into its parts."""
    host, sep, port_text = address.rpartition(":")
    if not sep or not host or not port_text.isdigit():
        raise ConfigError(f"address must look like HOST:PORT or [IPv6]:PORT, got {address!r}")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ConfigError(f"{host!r} in {address!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ConfigError(f"IPv6 hosts go in brackets, e.g. [{host}]:{port_text}")
    port = int(port_text)
    if port > 65535:
        raise ConfigError(f"port must be in 0-65535, got {port}")
    return host, port


def format_address(host: str, port: int) -> str:
    """The inverse of `parse_address`."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def shipped_weights(architecture: Architecture) -> Path:
    """The ONNX file shipped for `architecture`: inside the wheel, or in a source checkout."""
    name = WEIGHT_FILES[architecture]
    packaged = importlib.resources.files("mnist_service") / "weights" / name
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "weights" / name
