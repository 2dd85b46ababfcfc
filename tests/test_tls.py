"""TLS and mutual TLS, end to end: real servers, certificates made here, and three clients.

Our async client, grpcio (`ssl_channel_credentials`) and the grpcurl binary get predictions
over TLS, and with a client certificate under mutual TLS. Clients the server must refuse (no
certificate, one from another CA, plaintext to a TLS port) fail promptly, and the server
keeps serving without a traceback or warning in its log. Plaintext on an address other
machines can reach is served with one warning.
"""

from __future__ import annotations

import asyncio
import base64
import json
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from grpclib.client import Channel
from grpclib.config import Configuration
from grpclib.exceptions import StreamTerminatedError
from typer.testing import CliRunner

from mnist_service import ClientTls, MnistClient, Prediction
from mnist_service._proto.inference import GrpcInferenceServiceStub, RepositoryModelLoadRequest
from mnist_service.cli import app
from mnist_service.config import ServerConfig, shipped_weights
from mnist_service.errors import ConfigError

from .certificates import Authority, Issued
from .conftest import ROOT, MnistSplit, ServerProcess, png_bytes, run_grpcurl
from .test_end_to_end import serve_and_fail
from .test_model_repository import CONV, make_repository, pin, softer
from .test_workers import children, worker_pids_in_request_log

PROMPT_S = 5.0
"""A refused client must fail well within this (its call deadline is longer)."""
CALL_TIMEOUT_S = 20.0
LOG_WAIT_S = 10.0

runner = CliRunner()


@dataclass(frozen=True, slots=True)
class Pki:
    """The CA the servers trust, their certificate, a client's, and a stranger's."""

    ca: Path
    server: Issued
    client: Issued
    other_ca: Path
    stranger: Issued
    """A client certificate from `other_ca`, which no server here trusts."""


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    folder = tmp_path_factory.mktemp("pki")
    ca = Authority.create(folder, "ca")
    other = Authority.create(folder, "other-ca")
    return Pki(
        ca=ca.cert,
        server=ca.issue("server", server=True),
        client=ca.issue("client", server=False),
        other_ca=other.cert,
        stranger=other.issue("stranger", server=False),
    )


@pytest.fixture(scope="module")
def tls_server(pki: Pki) -> Iterator[ServerProcess]:
    """TLS on every address of the machine (`[::]`), one process; clients use `[::1]`."""
    process = ServerProcess(
        "--address",
        "[::]:0",
        "--workers",
        "1",
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
    )
    yield process
    assert process.stop() == 0


@pytest.fixture(scope="module")
def mtls_server(pki: Pki) -> Iterator[ServerProcess]:
    """Mutual TLS on loopback, two worker processes (each builds its own TLS context)."""
    process = ServerProcess(
        "--workers",
        "2",
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.server.key),
        "--tls-client-ca",
        str(pki.ca),
    )
    yield process
    assert process.stop() == 0


def client_tls(pki: Pki, who: Issued | None = None) -> ClientTls:
    """Trust the test CA; present `who`'s certificate, if given."""
    if who is None:
        return ClientTls(ca=pki.ca)
    return ClientTls(ca=pki.ca, cert=who.cert, key=who.key)


def grpcio_credentials(pki: Pki, who: Issued | None = None) -> Any:
    import grpc

    return grpc.ssl_channel_credentials(
        root_certificates=pki.ca.read_bytes(),
        private_key=who.key.read_bytes() if who else None,
        certificate_chain=who.cert.read_bytes() if who else None,
    )


def grpcurl_request(data: bytes) -> str:
    return json.dumps({"data": base64.b64encode(data).decode()})


def trouble(server: ServerProcess, since: int) -> list[dict[str, Any]]:
    """Log entries after the first `since` that a handshake failure must not cause."""
    return [
        entry
        for entry in server.logs[since:]
        if entry.get("level") in ("warning", "error", "critical", "raw")
        or "exception" in entry
        or "Traceback" in str(entry.get("message"))
    ]


async def still_serves(server: ServerProcess, tls: ClientTls, digit: bytes, since: int) -> None:
    """A good client is answered after whatever came before, and the server logged it."""
    async with MnistClient(server.address, timeout=CALL_TIMEOUT_S, tls=tls) as client:
        assert isinstance(await client.predict(digit), Prediction)
    deadline = time.monotonic() + LOG_WAIT_S
    while not any(
        e.get("logger") == "mnist_service.requests" for e in server.logs[since:]
    ):  # the request log line arrives through a pipe and a reader thread
        assert time.monotonic() < deadline, "the good call never reached the request log"
        await asyncio.sleep(0.05)


# -- TLS: three clients get predictions ------------------------------------------------------


async def test_async_client_predicts_over_tls(
    tls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set

    async with MnistClient(tls_server.address, timeout=CALL_TIMEOUT_S, tls=client_tls(pki)) as c:
        single = await c.predict(png_bytes(images[0]))
        batch = await c.predict_batch([png_bytes(image) for image in images[1:9]])
        streamed = [r async for r in c.predict_many(png_bytes(i) for i in images[9:13])]

    assert single.label == labels[0]
    assert [r.label for r in batch if isinstance(r, Prediction)] == list(labels[1:9])
    assert [r.label for r in streamed if isinstance(r, Prediction)] == list(labels[9:13])


def open_files() -> int:
    return len(list(Path("/proc/self/fd").iterdir()))


@pytest.mark.skipif(not Path("/proc/self/fd").is_dir(), reason="counts descriptors in /proc")
async def test_leaving_the_client_closes_its_tls_connection(
    tls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit
) -> None:
    """A TLS close takes a round trip (close_notify); the client waits for it."""
    before = open_files()

    async with MnistClient(tls_server.address, timeout=CALL_TIMEOUT_S, tls=client_tls(pki)) as c:
        await c.predict(png_bytes(mnist_test_set[0][0]))
        connected = open_files()

    assert connected == before + 1
    assert open_files() == before


def test_grpcio_client_predicts_over_tls(
    tls_server: ServerProcess,
    pki: Pki,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    with grpc.secure_channel(tls_server.address, grpcio_credentials(pki)) as channel:
        reply = pb2_grpc.MnistStub(channel).Predict(
            pb2.MnistImage(data=png_bytes(images[3])), timeout=CALL_TIMEOUT_S
        )

    assert reply.label == labels[3]


def test_grpcurl_trusts_the_server_with_cacert(
    tls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set

    result = run_grpcurl(
        "-cacert",
        str(pki.ca),
        "-import-path",
        str(ROOT),
        "-proto",
        "mnist.proto",
        "-d",
        "@",
        tls_server.address,
        "mnist.Mnist.Predict",
        stdin=grpcurl_request(png_bytes(images[4])),
    )
    untrusted = run_grpcurl(
        "-proto",
        "mnist.proto",
        "-import-path",
        str(ROOT),
        "-d",
        "@",
        tls_server.address,
        "mnist.Mnist.Predict",
        stdin=grpcurl_request(b""),
    )

    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["label"] == labels[4]
    assert untrusted.returncode != 0
    assert "certificate" in untrusted.stderr


def test_cli_predict_and_info_over_tls(
    tls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit, tmp_path: Path
) -> None:
    images, labels = mnist_test_set
    digit = tmp_path / "digit.png"
    digit.write_bytes(png_bytes(images[5]))
    tls = ["--address", tls_server.address, "--tls-ca", str(pki.ca)]

    predicted = runner.invoke(app, ["predict", "--json", str(digit), *tls])
    info = runner.invoke(app, ["info", *tls])
    wrong_name = runner.invoke(app, ["info", *tls, "--tls-server-name", "mnist.example.com"])
    plaintext = runner.invoke(app, ["info", "--address", tls_server.address, "--timeout", "5"])

    assert predicted.exit_code == 0, predicted.output
    assert json.loads(predicted.output)["label"] == labels[5]
    assert info.exit_code == 0, info.output
    assert json.loads(info.output)["architecture"] == "conv"
    assert wrong_name.exit_code == 1
    assert "cannot verify the server's certificate" in wrong_name.output
    assert "mnist.example.com" in wrong_name.output
    assert plaintext.exit_code == 1
    assert "pass --tls-ca" in plaintext.output


# -- mutual TLS ------------------------------------------------------------------------------


async def test_every_worker_serves_mutual_tls(
    mtls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    workers = children(mtls_server.process.pid)
    results: list[Prediction] = []
    for _ in range(5):  # connections land where the kernel hashes them: a few rounds at most
        clients = [
            MnistClient(
                mtls_server.address, timeout=CALL_TIMEOUT_S, tls=client_tls(pki, pki.client)
            )
            for _ in range(16)
        ]
        try:
            results += await asyncio.gather(*(c.predict(png_bytes(images[6])) for c in clients))
        finally:
            await asyncio.gather(*(client.aclose() for client in clients))
        if worker_pids_in_request_log(mtls_server) == workers:
            break

    assert len(workers) == 2
    assert {r.label for r in results} == {labels[6]}
    assert worker_pids_in_request_log(mtls_server) == workers


def test_grpcio_client_with_a_certificate_predicts_under_mutual_tls(
    mtls_server: ServerProcess,
    pki: Pki,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    images, labels = mnist_test_set
    credentials = grpcio_credentials(pki, pki.client)
    with grpc.secure_channel(mtls_server.address, credentials) as channel:
        reply = pb2_grpc.MnistStub(channel).Predict(
            pb2.MnistImage(data=png_bytes(images[7])), timeout=CALL_TIMEOUT_S
        )

    assert reply.label == labels[7]


def test_load_runs_against_a_mutual_tls_server(mtls_server: ServerProcess, pki: Pki) -> None:
    tls = ["--tls-ca", str(pki.ca), "--tls-cert", str(pki.client.cert)]
    tls += ["--tls-key", str(pki.client.key)]

    result = runner.invoke(
        app, ["load", "-a", mtls_server.address, "-d", "0.5", "-c", "2", "--raw", "--json", *tls]
    )

    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["requests"] > 0
    assert report["errors"] == {}


def test_grpcurl_with_cert_and_key_under_mutual_tls(
    mtls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    request = grpcurl_request(png_bytes(images[8]))
    common = ["-cacert", str(pki.ca), "-import-path", str(ROOT), "-proto", "mnist.proto"]

    with_cert = run_grpcurl(
        *common,
        "-cert",
        str(pki.client.cert),
        "-key",
        str(pki.client.key),
        "-d",
        "@",
        mtls_server.address,
        "mnist.Mnist.Predict",
        stdin=request,
    )
    without = run_grpcurl(
        *common, "-d", "@", mtls_server.address, "mnist.Mnist.Predict", stdin=request
    )

    assert with_cert.returncode == 0, with_cert.stderr
    assert json.loads(with_cert.stdout)["label"] == labels[8]
    assert without.returncode != 0


@pytest.mark.parametrize("who", ["no-certificate", "another-ca"])
async def test_mutual_tls_refuses_a_grpclib_client(
    mtls_server: ServerProcess, pki: Pki, mnist_test_set: MnistSplit, who: str
) -> None:
    digit = png_bytes(mnist_test_set[0][0])
    tls = client_tls(pki) if who == "no-certificate" else client_tls(pki, pki.stranger)
    since = len(mtls_server.logs)

    started = time.monotonic()
    async with MnistClient(mtls_server.address, timeout=CALL_TIMEOUT_S, tls=tls) as client:
        with pytest.raises((StreamTerminatedError, ssl.SSLError, ConnectionError)):
            await client.predict(digit)
    elapsed = time.monotonic() - started
    await still_serves(mtls_server, client_tls(pki, pki.client), digit, since)

    assert elapsed < PROMPT_S
    assert trouble(mtls_server, since) == []


@pytest.mark.parametrize("who", ["no-certificate", "another-ca"])
def test_mutual_tls_refuses_a_grpcio_client(
    mtls_server: ServerProcess,
    pki: Pki,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
    who: str,
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    credentials = grpcio_credentials(pki, None if who == "no-certificate" else pki.stranger)
    since = len(mtls_server.logs)

    with (
        grpc.secure_channel(mtls_server.address, credentials) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb2_grpc.MnistStub(channel).Predict(
            pb2.MnistImage(data=png_bytes(mnist_test_set[0][0])), timeout=CALL_TIMEOUT_S
        )
    good = client_tls(pki, pki.client)
    asyncio.run(still_serves(mtls_server, good, png_bytes(mnist_test_set[0][0]), since))

    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert trouble(mtls_server, since) == []


def test_cli_says_a_client_certificate_is_needed(mtls_server: ServerProcess, pki: Pki) -> None:
    result = runner.invoke(app, ["info", "--address", mtls_server.address, "--tls-ca", str(pki.ca)])

    assert result.exit_code == 1
    assert result.output.count("\n") == 1, result.output
    assert "pass --tls-cert and --tls-key" in result.output


# -- plaintext to a TLS port -----------------------------------------------------------------


async def test_plaintext_to_a_tls_port_fails_promptly_and_quietly(
    tls_server: ServerProcess,
    pki: Pki,
    mnist_test_set: MnistSplit,
    grpcio_modules: tuple[ModuleType, ModuleType],
) -> None:
    import grpc

    pb2, pb2_grpc = grpcio_modules
    digit = png_bytes(mnist_test_set[0][1])
    since = len(tls_server.logs)

    started = time.monotonic()
    async with MnistClient(tls_server.address, timeout=CALL_TIMEOUT_S) as plaintext:
        with pytest.raises((StreamTerminatedError, ConnectionError)):
            await plaintext.predict(digit)
    grpclib_s = time.monotonic() - started
    started = time.monotonic()
    with (
        grpc.insecure_channel(tls_server.address) as channel,
        pytest.raises(grpc.RpcError) as refused,
    ):
        pb2_grpc.MnistStub(channel).Predict(pb2.MnistImage(data=digit), timeout=CALL_TIMEOUT_S)
    grpcio_s = time.monotonic() - started
    await still_serves(tls_server, client_tls(pki), digit, since)

    assert grpclib_s < PROMPT_S
    assert grpcio_s < PROMPT_S
    assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
    assert trouble(tls_server, since) == []


# -- the plaintext warning -------------------------------------------------------------------


def plaintext_warnings(server: ServerProcess) -> list[dict[str, Any]]:
    return [
        e
        for e in server.logs
        if e.get("level") == "warning" and "no TLS on" in str(e.get("message"))
    ]


@pytest.mark.parametrize("address", ["0.0.0.0:0", "[::]:0"], ids=["ipv4-any", "ipv6-any"])
def test_plaintext_on_a_reachable_address_warns_once(address: str) -> None:
    process = ServerProcess("--address", address, "--workers", "2")
    assert process.stop() == 0

    warnings = plaintext_warnings(process)
    assert len(warnings) == 1, warnings
    assert warnings[0]["pid"] == process.process.pid  # the supervisor, not each worker
    assert "--tls-cert" in warnings[0]["message"]


def test_no_plaintext_warning_with_tls_or_on_loopback(
    tls_server: ServerProcess, mtls_server: ServerProcess, server: ServerProcess
) -> None:
    serving = next(e for e in tls_server.logs if str(e.get("message")).startswith("serving"))

    assert serving["address"].startswith("[::]:")
    assert serving["tls"] == "on"
    assert plaintext_warnings(tls_server) == []
    assert plaintext_warnings(mtls_server) == []
    assert plaintext_warnings(server) == []


# -- settings --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("settings", "fragment"),
    [
        pytest.param({"tls_cert": "server"}, "both a certificate and its private key", id="no-key"),
        pytest.param(
            {"tls_key": "server-key"}, "both a certificate and its private key", id="no-cert"
        ),
        pytest.param({"tls_client_ca": "ca"}, "needs the server's own certificate", id="ca-alone"),
        pytest.param(
            {"tls_cert": "server", "tls_key": "missing"}, "No such file", id="missing-key"
        ),
    ],
)
def test_tls_settings_are_checked(pki: Pki, settings: dict[str, str], fragment: str) -> None:
    paths = {
        "server": pki.server.cert,
        "server-key": pki.server.key,
        "ca": pki.ca,
        "missing": pki.ca.parent / "missing.pem",
    }
    with pytest.raises(ConfigError, match=fragment):
        ServerConfig(**{name: paths[value] for name, value in settings.items()})  # type: ignore[arg-type]


def test_client_certificate_needs_its_key(pki: Pki) -> None:
    with pytest.raises(ConfigError, match="needs its private key"):
        ClientTls(ca=pki.ca, cert=pki.client.cert)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_key_that_does_not_match_is_one_clear_line(pki: Pki, workers: str) -> None:
    result = serve_and_fail(
        "--address",
        "[::1]:0",
        "--workers",
        workers,
        "--tls-cert",
        str(pki.server.cert),
        "--tls-key",
        str(pki.client.key),
    )

    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"mnist-service: error: cannot load the TLS certificate {pki.server.cert} "
        f"with key {pki.client.key}: key values mismatch"
    ]


async def test_the_model_control_api_is_behind_mutual_tls(
    pki: Pki, tmp_path: Path, mnist_test_set: MnistSplit
) -> None:
    """The repository API shares the inference port, so mutual TLS guards it as it guards
    inference: a client with a certificate from the client CA loads a version, one with a
    certificate from another CA does not get to ask, and the old version serves on."""
    repository = make_repository(
        tmp_path / "models",
        {1: shipped_weights("conv").read_bytes(), 2: softer()},
        {"version_policy": {"specific": {"versions": [1]}}},
    )
    server = ServerProcess(
        "--workers", "1", "--tls-cert", str(pki.server.cert), "--tls-key", str(pki.server.key),
        "--tls-client-ca", str(pki.ca), "--http-address", "off",
        "--model-repository", str(repository), "--model-control", "explicit",
    )  # fmt: skip

    async def load_version_2(who: Issued) -> None:
        tls = client_tls(pki, who)
        channel = Channel(
            "::1",
            server.port,
            ssl=tls.context(),
            config=Configuration(ssl_target_name_override=tls.server_name),
        )
        try:
            await GrpcInferenceServiceStub(channel).repository_model_load(
                RepositoryModelLoadRequest(model_name=CONV, parameters=pin(2)),
                timeout=CALL_TIMEOUT_S * 4,
            )
        finally:
            channel.close()

    async def served_version() -> str:
        async with MnistClient(
            server.address, timeout=CALL_TIMEOUT_S, tls=client_tls(pki, pki.client)
        ) as client:
            info = await client.model_info()
        return info.metadata["model_version"]

    try:
        with pytest.raises((StreamTerminatedError, ssl.SSLError, ConnectionError)):
            await load_version_2(pki.stranger)
        assert await served_version() == "1"
        await load_version_2(pki.client)
        assert await served_version() == "2"
    finally:
        assert server.stop() == 0
