"""deploy/kserve/inferenceservice.yaml agrees with the server and with KServe's conventions:
a custom predictor container serving REST on 8080 and gRPC on 8081, flags the real CLI
parses, REST health probes of the Open Inference Protocol, a drain that fits the termination
grace period; and the container's exact command line (addresses moved to loopback) answers
what KServe's probes and clients ask."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from mnist_service.config import parse_address
from mnist_service.runtime.workers import _STOP_MARGIN_S

from . import cli_contract
from .conftest import ServerProcess
from .http_client import base_url, post_json, request

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "kserve" / "inferenceservice.yaml"
PRESTOP_S = 10


@pytest.fixture(scope="module")
def service() -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load(MANIFEST.read_text())
    return document


@pytest.fixture(scope="module")
def container(service: dict[str, Any]) -> dict[str, Any]:
    (container,) = service["spec"]["predictor"]["containers"]
    return dict(container)


def env_of(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


def test_it_is_an_inference_service_with_kserves_container_and_ports(
    service: dict[str, Any], container: dict[str, Any]
) -> None:
    assert service["apiVersion"] == "serving.kserve.io/v1beta1"
    assert service["kind"] == "InferenceService"
    assert container["name"] == "kserve-container"
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert ports == {"http1": 8080, "h2c": 8081}

    serve = cli_contract.parse(container["args"], env_of(container))
    assert container["args"][0] == "serve"
    assert parse_address(serve["--http-address"])[1] == ports["http1"]
    assert parse_address(serve["--address"])[1] == ports["h2c"]
    assert set(env_of(container)) <= cli_contract.envvars("serve")


def test_the_probes_are_the_protocols_rest_health_routes(container: dict[str, Any]) -> None:
    assert container["readinessProbe"]["httpGet"] == {"path": "/v2/health/ready", "port": 8080}
    assert container["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": 8080}


def test_the_pod_outlasts_prestop_and_the_drain(
    service: dict[str, Any], container: dict[str, Any]
) -> None:
    serve = cli_contract.parse(container["args"], env_of(container))
    predictor = service["spec"]["predictor"]
    assert container["lifecycle"]["preStop"]["exec"]["command"] == ["sleep", str(PRESTOP_S)]
    drain = PRESTOP_S + float(serve["--grace-period"]) + _STOP_MARGIN_S
    assert predictor["terminationGracePeriodSeconds"] > drain


def test_its_command_line_serves_what_kserve_asks(container: dict[str, Any]) -> None:
    args = list(container["args"][1:])
    for flag in ("--address", "--http-address"):
        args[args.index(flag) + 1] = "[::1]:0"
    server = ServerProcess(*args, env=env_of(container))
    try:
        url = base_url(server)
        for probe in ("readinessProbe", "livenessProbe"):
            assert request(url + container[probe]["httpGet"]["path"]).status == 200
        assert request(url + "/v2/models/mnist_mlp/ready").status == 200
        pixels = {"name": "pixels", "datatype": "UINT8", "shape": [1, 28, 28],
                  "data": [0] * 300 + [255] * 184 + [0] * 300}  # fmt: skip
        answer = post_json(url + "/v2/models/mnist_convnet/infer", {"inputs": [pixels]})
        assert answer.status == 200
    finally:
        assert server.stop() == 0
