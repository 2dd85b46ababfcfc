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
ModelControlMode = Literal["none", "explicit"]
MODEL_CONTROL_MODES: tuple[ModelControlMode, ...] = ("none", "explicit")

DEFAULT_HOST = "::1"
DEFAULT_PORT = 50051
DEFAULT_HTTP_PORT = 8080


Group = Literal["Model", "Network", "Performance", "Limits", "TLS", "Observability"]
GROUPS: tuple[Group, ...] = ("Model", "Network", "Performance", "Limits", "TLS", "Observability")
"""The `serve --help` panels, in the order they are shown."""

SETTING = "setting"
"""The key of a field's `Setting` in its metadata."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Setting:
    """How a field is set from the `serve` command line and the environment."""

    help: str
    group: Group
    flag: str | None = None
    """The option's name without dashes where it is not the field's (`busy-poll` for
    `busy_poll_us`); the environment variable is named after it (`MNIST_BUSY_POLL`)."""
    shown_default: str | None = None
    """Said instead of the default where the value is computed or would mislead."""


def setting(
    help: str, group: Group, *, flag: str | None = None, shown_default: str | None = None
) -> dict[str, Setting]:
    """Field metadata that makes the field a `serve` option."""
    return {SETTING: Setting(help=help, group=group, flag=flag, shown_default=shown_default)}


@dataclass(frozen=True, kw_only=True, slots=True)
class AddressSetting:
    """One `HOST:PORT` option that sets a host field and a port field of `ServerConfig`."""

    flag: str
    host: str
    port: str
    help: str
    group: Group
    shown_default: str | None = None
    can_be_off: bool = False
    """An empty value sets the host to None: the listener is off."""


@dataclass(frozen=True, kw_only=True, slots=True)
class Limits:
    """What one request may cost the server; requests beyond these are refused."""

    max_message_bytes: int = field(
        default=4 * 1024 * 1024,
        metadata=setting(
            "Largest request message, in bytes (gRPC's customary 4 MiB); larger ones get"
            " RESOURCE_EXHAUSTED from their announced size.",
            "Limits",
        ),
    )
    max_connection_bytes: int | None = field(
        default=None,
        metadata=setting(
            "Most bytes of request messages one connection may have arriving at once.",
            "Limits",
            shown_default="4 × --max-message-bytes",
        ),
    )
    """None: four times `max_message_bytes`. See `connection_bytes`."""
    max_message_seconds: float = field(
        default=10.0,
        metadata=setting(
            "Seconds a request message's body may take to arrive once its prefix has.", "Limits"
        ),
    )
    max_image_pixels: int = field(
        default=4096 * 4096,
        metadata=setting(
            "Largest image (width × height) decoded; checked from its header, before decoding.",
            "Limits",
        ),
    )
    max_stream_in_flight: int = field(
        default=64,
        metadata=setting(
            "Images of one PredictStream call worked on at once; beyond it the stream stops"
            " reading (back-pressure).",
            "Limits",
        ),
    )
    max_batch_images: int = field(
        default=1024,
        metadata=setting(
            "Most images one PredictBatch call may carry; more is INVALID_ARGUMENT.", "Limits"
        ),
    )
    max_decode_bytes: int = field(
        default=64 * 1024 * 1024,
        metadata=setting(
            "Bytes of big images (over 320×320) a worker may have waiting for its decode pool;"
            " past it, new ones get RESOURCE_EXHAUSTED at once (one image is always taken).",
            "Limits",
        ),
    )
    max_connections: int = field(
        default=256,
        metadata=setting(
            "Connections one worker keeps open; more are told GOAWAY (ENHANCE_YOUR_CALM) and"
            " closed at once.",
            "Limits",
        ),
    )
    """With the other limits it bounds what requests can make a worker hold."""
    max_queue: int = field(
        default=2048,
        metadata=setting(
            "Images a worker may have taken in and not yet answered, for each served model (its"
            " versions together); past it, new work gets RESOURCE_EXHAUSTED at once rather"
            " than queueing.",
            "Limits",
        ),
    )
    """About a second of ConvNet work on one core."""

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

    def to_dict(self) -> dict[str, object]:
        """The limits and the resolved connection budget, as JSON values."""
        values: dict[str, object] = {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self)
        }
        values["connection_bytes"] = self.connection_bytes
        return values


@dataclass(frozen=True, kw_only=True, slots=True)
class ServerConfig:
    """Everything `serve` needs, validated on construction."""

    host: str = DEFAULT_HOST
    """Set with `port` by `--address` (see ADDRESS_SETTINGS)."""
    port: int = DEFAULT_PORT
    """0 picks a free port."""
    http_host: str | None = DEFAULT_HOST
    """Set with `http_port` by `--http-address`; None: no HTTP listener."""
    http_port: int = DEFAULT_HTTP_PORT
    cors_allow_origins: tuple[str, ...] = field(
        default=(),
        metadata=setting(
            "Origins whose pages may call the HTTP API (CORS), comma-separated"
            " (https://app.example.com,http://localhost:3000), or * for any.",
            "Network",
            flag="cors-allow-origin",
            shown_default="none",
        ),
    )
    web_ui: bool = field(
        default=True,
        metadata=setting(
            "Serve the draw-a-digit page at / on the HTTP address.",
            "Network",
        ),
    )
    model_architecture: Architecture = field(
        default="conv", metadata=setting("Which network the weights hold.", "Model")
    )
    model_weights: Path | None = field(
        default=None,
        metadata=setting(
            "An ONNX model file that keeps the model contract.",
            "Model",
            shown_default="the shipped weights of the architecture",
        ),
    )
    """None serves the shipped weights of `model_architecture`."""
    model_repository: Path | None = field(
        default=None,
        metadata=setting(
            "A model repository in Triton's layout (DIR/mnist_convnet/2/model.onnx, an optional"
            " DIR/NAME/config.json): each served model's versions come from it, and can be"
            " reloaded at run time (docs/model-repository.md).",
            "Model",
            shown_default="the shipped weights, read-only",
        ),
    )
    """None: the built-in repository, the shipped weights (or `model_weights`) as version 1."""
    model_control: ModelControlMode = field(
        default="none",
        metadata=setting(
            "explicit: the repository API (gRPC RepositoryModelLoad/Unload, HTTP"
            " /v2/repository/...) may load and unload models at run time; none refuses them"
            " (SIGHUP rescans either way).",
            "Model",
        ),
    )
    models: tuple[Architecture, ...] = field(
        default=(),
        metadata=setting(
            "Models the Open Inference Protocol serves, comma-separated (conv,mlp), each with"
            " its own batcher; must include --model-architecture, whose model the MNIST API"
            " serves (the others use their shipped weights).",
            "Model",
            shown_default="the --model-architecture one",
        ),
    )
    shift_views: bool = field(
        default=True,
        metadata=setting(
            "Reread a digit the preprocessing redrew (a drawing, a photo: not MNIST format) that"
            " the model is unsure of as the mean over it and four copies shifted by a pixel;"
            " four more model rows each, for about 1 image in 100.",
            "Model",
        ),
    )
    device: Device = field(
        default="auto",
        metadata=setting(
            "Where the model runs; auto is CUDA when onnxruntime offers it, else the CPU.",
            "Model",
        ),
    )
    workers: int = field(
        default_factory=lambda: usable_cores(),
        metadata=setting(
            "Server processes sharing the port, each with its own event loop and model session.",
            "Performance",
            shown_default="usable cores",
        ),
    )
    reuse_port: bool = field(
        default=hasattr(socket, "SO_REUSEPORT"),
        metadata=setting(
            "Each worker gets its own SO_REUSEPORT socket (the kernel spreads connections over"
            " them) instead of all sharing one, where one busy worker tends to accept them all.",
            "Performance",
            shown_default="on where the OS has SO_REUSEPORT",
        ),
    )
    intra_op_threads: int = field(
        default=1,
        metadata=setting(
            "onnxruntime threads per model run, per worker; more helps only big batches on"
            " spare cores.",
            "Performance",
        ),
    )
    decode_threads: int = field(
        default=1,
        metadata=setting(
            "Threads per worker that decode big images (small ones are decoded inline).",
            "Performance",
        ),
    )
    max_batch_size: int = field(
        default=32,
        metadata=setting(
            "Most images one model run takes; concurrent requests are batched up to it.",
            "Performance",
        ),
    )
    max_batch_delay_us: int = field(
        default=0,
        metadata=setting(
            "Microseconds an incomplete batch may wait for more requests (0: never wait).",
            "Performance",
            flag="max-batch-delay",
        ),
    )
    busy_poll_us: int = field(
        default=200,
        metadata=setting(
            "Microseconds an idle worker polls for more calls before it sleeps, while calls"
            " come close together (0: always sleep; saves CPU under a CPU quota).",
            "Performance",
            flag="busy-poll",
        ),
    )
    """See `runtime/eventloop.py`."""
    grace_period: float = field(
        default=10.0,
        metadata=setting("Seconds in-flight calls get to finish after SIGTERM/SIGINT.", "Network"),
    )
    limits: Limits = field(default_factory=Limits)
    """Each field is an option of its own."""
    tls_cert: Path | None = field(
        default=None,
        metadata=setting(
            "PEM certificate chain the server presents; with --tls-key, it speaks only TLS.",
            "TLS",
            shown_default="plaintext",
        ),
    )
    tls_key: Path | None = field(
        default=None, metadata=setting("PEM private key of --tls-cert.", "TLS")
    )
    tls_client_ca: Path | None = field(
        default=None,
        metadata=setting(
            "PEM CA bundle: clients must present a certificate it signed (mutual TLS).", "TLS"
        ),
    )
    access_log: bool = field(
        default=True,
        metadata=setting(
            "One log line per call at info level: method, status, latency, batch, peer and"
            " request id (server faults are logged either way).",
            "Observability",
        ),
    )
    metrics_host: str | None = None
    """Set with `metrics_port` by `--metrics-address`; None: no metrics."""
    metrics_port: int = 9090
    log_level: str = field(
        default="info",
        metadata=setting(f"Least severe records logged: {', '.join(LOG_LEVELS)}.", "Observability"),
    )
    log_format: LogFormat = field(
        default="pretty",
        metadata=setting(
            "pretty for people; json for collectors (one object per line, with the process id).",
            "Observability",
        ),
    )

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
        if self.model_control not in MODEL_CONTROL_MODES:
            raise ConfigError(
                f"model control must be one of {', '.join(MODEL_CONTROL_MODES)}, "
                f"got {self.model_control!r}"
            )
        if self.model_repository is not None:
            if self.model_weights is not None:
                raise ConfigError(
                    "--model-weights and --model-repository exclude each other: put the file in"
                    " the repository as NAME/1/model.onnx"
                )
            if not self.model_repository.is_dir():
                raise ConfigError(f"the model repository {self.model_repository} is not a folder")
        if self.device not in DEVICES:
            raise ConfigError(f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        if self.log_format not in LOG_FORMATS:
            raise ConfigError(f"log format must be one of {', '.join(LOG_FORMATS)}")
        if self.log_level.lower() not in LOG_LEVELS:
            raise ConfigError(f"log level must be one of {', '.join(LOG_LEVELS)}")
        for origin in self.cors_allow_origins:
            if origin != "*" and not _is_origin(origin):
                raise ConfigError(
                    f"a CORS origin is a scheme, a host and an optional port "
                    f"(https://app.example.com:8443) or *, got {origin!r}"
                )
        for name in ("port", "metrics_port", "http_port"):
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

    @property
    def http_address(self) -> str | None:
        """The HTTP listener's `HOST:PORT` (None: off)."""
        return None if self.http_host is None else format_address(self.http_host, self.http_port)

    def to_dict(self) -> dict[str, object]:
        """Every setting and the values derived from them, as JSON values (paths as strings)."""
        values: dict[str, object] = {}
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if isinstance(value, Limits):
                value = value.to_dict()
            elif isinstance(value, Path):
                value = str(value)
            values[f.name] = value
        values["address"] = self.address
        values["http_address"] = self.http_address
        values["weights_path"] = str(self.weights_path)
        values["tls"] = self.tls
        return values


ADDRESS_SETTINGS: tuple[AddressSetting, ...] = (
    AddressSetting(
        flag="address",
        host="host",
        port="port",
        help="Listen on HOST:PORT, IPv6 hosts in brackets; port 0 picks a free one.",
        group="Network",
    ),
    AddressSetting(
        flag="http-address",
        host="http_host",
        port="http_port",
        help="Serve HTTP/1.1 on HOST:PORT: the JSON API, the Open Inference Protocol's REST"
        " API and the page; off (or an empty value) turns it off.",
        group="Network",
        can_be_off=True,
    ),
    AddressSetting(
        flag="metrics-address",
        host="metrics_host",
        port="metrics_port",
        help="Serve Prometheus metrics at http://HOST:PORT/metrics (all workers in one scrape);"
        " port 0 picks a free one.",
        group="Observability",
        shown_default="no metrics",
    ),
)
"""The options that set two fields of `ServerConfig` at once."""


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


def _is_origin(origin: str) -> bool:
    """Whether `origin` is a web origin as browsers send it: scheme://host[:port], no path."""
    scheme, sep, rest = origin.partition("://")
    return (
        scheme in ("http", "https")
        and bool(sep)
        and bool(rest)
        and "/" not in rest
        and rest.isascii()
        and rest.isprintable()
        and " " not in rest
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
