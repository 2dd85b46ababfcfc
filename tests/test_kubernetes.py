"""deploy/kubernetes agrees with the server: flags, variables, ports, probes and timings.

Every manifest is read with PyYAML and validated against the Kubernetes API schemas; the
container's command line goes through the real CLI parser; and one test starts the server with
exactly the Deployment's arguments and environment and asks it what the kubelet's probes ask.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from grpclib.client import Channel
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from mnist_service.config import parse_address
from mnist_service.runtime.workers import _STOP_MARGIN_S

from . import cli_contract
from .conftest import ServerProcess
from .test_image import DOCKERFILE, read_dockerfile

ROOT = Path(__file__).resolve().parent.parent
MANIFESTS = ROOT / "deploy" / "kubernetes"

OLDEST_KUBERNETES = "1.27.0"
"""gRPC probes are GA from 1.27 (beta and on by default since 1.24)."""


@pytest.fixture(scope="module")
def manifests() -> dict[str, dict[str, Any]]:
    """Every object in deploy/kubernetes, by kind (one of each)."""
    objects: dict[str, dict[str, Any]] = {}
    for path in sorted(MANIFESTS.glob("*.yaml")):
        if path.name == "kustomization.yaml":
            continue
        for document in yaml.safe_load_all(path.read_text()):
            assert document["kind"] not in objects, f"a second {document['kind']} in {path}"
            objects[document["kind"]] = document
    return objects


@pytest.fixture(scope="module")
def pod(manifests: dict[str, dict[str, Any]]) -> dict[str, Any]:
    template: dict[str, Any] = manifests["Deployment"]["spec"]["template"]
    return template


@pytest.fixture(scope="module")
def container(pod: dict[str, Any]) -> dict[str, Any]:
    (only,) = pod["spec"]["containers"]
    return dict(only)


def container_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container.get("env", [])}


@pytest.fixture(scope="module")
def serve(container: dict[str, Any]) -> dict[str, Any]:
    """The container's serve options, resolved by the real CLI parser (flags, then env)."""
    assert container["args"][0] == "serve"
    return cli_contract.parse(container["args"], container_env(container))


def grpc_probes(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {
        kind: container[kind]
        for kind in ("startupProbe", "readinessProbe", "livenessProbe")
        if kind in container
    }


def cpus(quantity: str) -> float:
    return int(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def test_the_kustomization_names_every_manifest_and_the_image() -> None:
    kustomization = yaml.safe_load((MANIFESTS / "kustomization.yaml").read_text())
    files = {p.name for p in MANIFESTS.glob("*.yaml")} - {"kustomization.yaml"}

    assert set(kustomization["resources"]) == files
    deployment = yaml.safe_load((MANIFESTS / "deployment.yaml").read_text())
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert [image["name"] for image in kustomization["images"]] == [container["image"]]


@pytest.mark.parametrize("version", [OLDEST_KUBERNETES, "latest"])
def test_every_manifest_is_valid_for_the_kubernetes_api(
    manifests: dict[str, dict[str, Any]], version: str
) -> None:
    kubernetes_validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the test extra"
    )
    version = kubernetes_validate.latest_version() if version == "latest" else version
    for manifest in manifests.values():
        kubernetes_validate.validate(manifest, version, strict=True)  # unknown fields fail too


@pytest.mark.skipif(not shutil.which("kubectl"), reason="kubectl is not installed")
def test_kustomize_builds_the_manifests(manifests: dict[str, dict[str, Any]]) -> None:
    built = subprocess.run(
        ["kubectl", "kustomize", str(MANIFESTS)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    kinds = [document["kind"] for document in yaml.safe_load_all(built)]
    assert sorted(kinds) == sorted(manifests)


def test_the_container_runs_the_images_entrypoint_with_options_the_cli_knows(
    container: dict[str, Any], serve: dict[str, Any]
) -> None:
    assert "command" not in container  # the image's ENTRYPOINT: python -m mnist_service
    assert set(container_env(container)) <= cli_contract.envvars("serve")
    assert serve["--address"] != cli_contract.parse(["serve"])["--address"]  # not loopback


def test_workers_match_the_cpus_the_pod_gets(
    container: dict[str, Any], serve: dict[str, Any]
) -> None:
    """The default (usable cores) sees the node's cores, not the pod's CPU quota."""
    resources = container["resources"]
    assert serve["--workers"] is not None
    assert serve["--workers"] == cpus(resources["requests"]["cpu"])
    assert serve["--workers"] == cpus(resources["limits"]["cpu"])
    assert resources["requests"]["memory"] == resources["limits"]["memory"]


def test_the_probes_ask_the_served_port(container: dict[str, Any], serve: dict[str, Any]) -> None:
    _, port = parse_address(serve["--address"])
    (container_port,) = [p for p in container["ports"] if p["name"] == "grpc"]
    probes = grpc_probes(container)

    assert container_port["containerPort"] == port
    assert {"readinessProbe", "livenessProbe"} <= set(probes)
    for probe in probes.values():
        assert probe["grpc"]["port"] == port
        assert probe["grpc"].get("service", "") in {"", "mnist.Mnist"}
    liveness = probes["livenessProbe"]
    assert liveness["timeoutSeconds"] * liveness["failureThreshold"] >= 10


def test_the_pod_outlasts_prestop_and_the_drain(pod: dict[str, Any], serve: dict[str, Any]) -> None:
    """The kubelet runs preStop, then sends SIGTERM, and kills at the grace period's end."""
    (container,) = pod["spec"]["containers"]
    pre_stop = container["lifecycle"]["preStop"]
    if "sleep" in pre_stop:
        pause = float(pre_stop["sleep"]["seconds"])
    else:
        sleep, seconds = pre_stop["exec"]["command"]
        assert sleep == "sleep"
        pause = float(seconds)

    assert pause > 0
    # the supervisor gives workers the grace period plus its stop margin before killing them
    drain = serve["--grace-period"] + _STOP_MARGIN_S
    assert pod["spec"]["terminationGracePeriodSeconds"] > pause + drain


def test_the_pod_runs_unprivileged_as_the_images_user(pod: dict[str, Any]) -> None:
    (container,) = pod["spec"]["containers"]
    image_user = read_dockerfile(DOCKERFILE)[-1].last("USER").text

    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert pod["spec"]["securityContext"]["runAsUser"] == int(image_user.partition(":")[0])
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"]["drop"] == ["ALL"]


def test_the_headless_service_selects_the_pods_and_their_grpc_port(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    service = manifests["Service"]["spec"]
    ports = {port["name"]: port for port in service["ports"]}
    container_ports = {port["name"]: port for port in container["ports"]}

    assert service["clusterIP"] == "None"
    assert service["selector"].items() <= pod["metadata"]["labels"].items()
    assert ports.keys() == container_ports.keys() == {"grpc", "http"}
    for name, port in ports.items():
        container_port = container_ports[name]
        # a headless Service translates no ports: clients dial the pod's own
        assert port["port"] == container_port["containerPort"]
        assert port["targetPort"] in (container_port["name"], container_port["containerPort"])
    assert ports["grpc"]["appProtocol"] == "kubernetes.io/h2c"


def test_the_container_ports_are_the_ones_it_serves(
    container: dict[str, Any], serve: dict[str, Any]
) -> None:
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    assert parse_address(serve["--address"])[1] == ports["grpc"]
    assert parse_address(serve["--http-address"])[1] == ports["http"]


def test_the_disruption_budget_and_autoscaler_govern_the_deployment(
    manifests: dict[str, dict[str, Any]], pod: dict[str, Any], container: dict[str, Any]
) -> None:
    deployment = manifests["Deployment"]
    budget = manifests["PodDisruptionBudget"]["spec"]
    autoscaler = manifests["HorizontalPodAutoscaler"]["spec"]

    assert budget["selector"] == deployment["spec"]["selector"]
    assert (
        deployment["spec"]["selector"]["matchLabels"].items() <= pod["metadata"]["labels"].items()
    )
    target = autoscaler["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"]) == (deployment["apiVersion"], "Deployment")
    assert target["name"] == deployment["metadata"]["name"]
    (metric,) = autoscaler["metrics"]
    assert metric["resource"]["name"] == "cpu"
    assert "cpu" in container["resources"]["requests"]  # Utilization is a share of the request
    # a node drain can always evict one pod, and the autoscaler, not apply, owns the count
    assert budget["minAvailable"] < autoscaler["minReplicas"]
    assert "replicas" not in deployment["spec"]


async def test_the_deployments_command_line_serves_and_passes_the_kubelets_probes(
    container: dict[str, Any], serve: dict[str, Any]
) -> None:
    """Exactly the container's arguments and environment, only the address moved to loopback."""
    args = list(container["args"][1:])
    for flag in ("--address", "--http-address"):
        args[args.index(flag) + 1] = "[::1]:0"
    server = ServerProcess(*args, env=container_env(container))
    try:
        (serving,) = [e for e in server.logs if str(e.get("message", "")).startswith("serving")]
        assert serving["workers"] == serve["--workers"]

        assert server.port is not None
        channel = Channel("::1", server.port)
        try:
            health = HealthStub(channel)
            for probe in grpc_probes(container).values():
                # the request a kubelet's gRPC probe sends: Check with the probe's service
                request = HealthCheckRequest(service=probe["grpc"].get("service", ""))
                reply = await health.Check(request, timeout=probe.get("timeoutSeconds", 1))
                assert reply.status == HealthCheckResponse.SERVING
        finally:
            channel.close()
    finally:
        assert server.stop() == 0
