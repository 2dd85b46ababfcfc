"""TLS contexts for both ends of a connection: HTTP/2 over TLS 1.2 or later.

gRPC runs over HTTP/2, which TLS negotiates through ALPN: grpcio and grpc-go refuse a
server that does not select `h2`. The server's context is built in each server process (after
any fork) from the files `ServerConfig` names; a client's from a `ClientTls`. Files that
cannot be loaded raise a one-line `ConfigError`.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from pathlib import Path

from .config import ServerConfig
from .errors import ConfigError

ALPN_PROTOCOLS = ["h2"]
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"
"""TLS 1.2 suites that HTTP/2 allows (ephemeral key exchange, AEAD; RFC 9113 §9.2.2). TLS 1.3
suites are not affected by this string, and all of them are allowed."""


@dataclass(frozen=True, kw_only=True, slots=True)
class ClientTls:
    """How a client speaks TLS: whom it trusts, and the certificate it shows (mutual TLS)."""

    ca: Path | None = None
    """PEM CA bundle the server's certificate must chain to; None: the system's trust store."""
    cert: Path | None = None
    """PEM certificate chain to present, for servers that require one (mutual TLS)."""
    key: Path | None = None
    """PEM private key of `cert`."""
    server_name: str | None = None
    """The name the server's certificate must carry; None: the host of the address."""

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            raise ConfigError(
                "a client certificate needs its private key, and a key its certificate"
            )

    def context(self) -> ssl.SSLContext:
        """A client context: the server verified against `ca`, ALPN h2, TLS 1.2 or later."""
        context = _context(ssl.PROTOCOL_TLS_CLIENT)  # verifies the peer and its name
        try:
            if self.ca is None:
                context.load_default_certs(ssl.Purpose.SERVER_AUTH)
            else:
                context.load_verify_locations(cafile=self.ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(f"cannot load the TLS CA bundle {self.ca}: {_reason(exc)}") from exc
        if self.cert is not None and self.key is not None:
            _load_chain(context, self.cert, self.key)
        return context


def server_context(
    config: ServerConfig, *, alpn: tuple[str, ...] = tuple(ALPN_PROTOCOLS)
) -> ssl.SSLContext | None:
    """The server's context for `config` (None when it serves plaintext), offering `alpn`
    (h2 for gRPC; the HTTP listener offers http/1.1).

    With a client CA, a client must present a certificate signed by it (CERT_REQUIRED).
    """
    if config.tls_cert is None or config.tls_key is None:
        return None
    context = _context(ssl.PROTOCOL_TLS_SERVER, alpn)
    _load_chain(context, config.tls_cert, config.tls_key)
    if config.tls_client_ca is not None:
        try:
            context.load_verify_locations(cafile=config.tls_client_ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot load the TLS client CA {config.tls_client_ca}: {_reason(exc)}"
            ) from exc
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _context(protocol: int, alpn: tuple[str, ...] = tuple(ALPN_PROTOCOLS)) -> ssl.SSLContext:
    context = ssl.SSLContext(protocol)
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(CIPHERS)
    context.set_alpn_protocols(list(alpn))
    return context


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(
            f"cannot load the TLS certificate {cert} with key {key}: {_reason(exc)}"
        ) from exc


def _reason(exc: OSError) -> str:
    """OpenSSL's reason in words ("key values mismatch"), not its library codes."""
    if isinstance(exc, ssl.SSLError):
        if exc.reason:
            return str(exc.reason).lower().replace("_", " ")
        return "not a PEM file of the expected kind"
    return exc.strerror or str(exc)
