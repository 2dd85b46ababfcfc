"""New weights without downtime (issue 24): the model repository, the control API, the safe
swap in every worker, and the versions visible in answers.

The versions are made here, at test time, from the shipped ConvNet with the `onnx` package:
version 2 has its logits quartered (the last layer's weights and bias: the same argmax, so
the same accuracy, but softer probabilities: an answer says which weights made it), and the
bad ones are not ONNX, take a flat [N, 784] input, or have the last layer's rows shuffled
(about 10 % right on the golden digits). Servers are real processes; the clients are grpclib
on the generated stubs, plain HTTP, and tritonclient in its own virtualenv.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnx
import onnxruntime as ort
import psutil
import pytest
from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from onnx import helper, numpy_helper

from mnist_service._proto.inference import (
    GrpcInferenceServiceStub,
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
    ModelMetadataRequest,
    ModelRepositoryParameter,
    RepositoryIndexRequest,
    RepositoryModelLoadRequest,
    RepositoryModelUnloadRequest,
)
from mnist_service._proto.mnist import MnistStub, ModelInfoRequest
from mnist_service.config import shipped_weights
from mnist_service.constants import INPUT_NAME, PROBABILITIES_NAME
from mnist_service.engine.repository import Repository
from mnist_service.errors import ModelNotFoundError, RepositoryError

from .conftest import MnistSplit, ServerProcess
from .test_oip_clients import CLIENTS, TRITONCLIENT, client_venv
from .waiting import eventually, wait_until, within

CONV = "mnist_convnet"
IN_FLIGHT = 64
SWAPS = 10
LOAD_RUN_MAX_S = 120.0
"""The load run's bound in time (it needs about 10-20 s); calls are bounded by it too."""


def pin_config(version: int) -> dict[str, Any]:
    """A config.json that serves exactly `version`."""
    return {"version_policy": {"specific": {"versions": [version]}}}


def pin(version: int) -> dict[str, ModelRepositoryParameter]:
    """The `config` parameter of a load that serves exactly `version`."""
    return {"config": ModelRepositoryParameter(string_param=json.dumps(pin_config(version)))}


# -- test models, made from the shipped weights ---------------------------------------------


def convnet() -> onnx.ModelProto:
    return onnx.load(str(shipped_weights("conv")))


def with_last_layer(transform: Any) -> bytes:
    """The ConvNet with `transform` applied to its last layer's weights [10, 128] and bias."""
    model = convnet()
    for tensor in model.graph.initializer:
        if tensor.name in ("net.linear_2.weight", "net.linear_2.bias"):
            weights = transform(numpy_helper.to_array(tensor)).astype(np.float32)
            tensor.CopyFrom(numpy_helper.from_array(weights, tensor.name))
    return model.SerializeToString()


def softer() -> bytes:
    """Version 2: the logits quartered. The same labels, other probabilities."""
    return with_last_layer(lambda w: w * 0.25)


def shuffled() -> bytes:
    """The last layer's rows (the classes) shuffled: about 1 golden digit in 10 right."""
    return with_last_layer(lambda w: w[np.random.default_rng(0).permutation(10)])


def flat_input() -> bytes:
    """A working ConvNet whose input is [N, 784]: it breaks the model contract."""
    model = convnet()
    graph = model.graph
    old = graph.input[0].name
    flat = helper.make_tensor_value_info("flat", onnx.TensorProto.FLOAT, ["N", 784])
    shape = numpy_helper.from_array(np.array([-1, 1, 28, 28], np.int64), "to_image_shape")
    graph.initializer.append(shape)
    graph.node.insert(0, helper.make_node("Reshape", ["flat", "to_image_shape"], [old]))
    graph.input.remove(graph.input[0])
    graph.input.insert(0, flat)
    return model.SerializeToString()


BAD_VERSIONS = {
    "not-onnx": (lambda: b"these bytes are not an ONNX model\n", "not a loadable ONNX model"),
    "wrong-input-shape": (flat_input, "takes input shape [-1, 784]"),
    "golden-below-floor": (shuffled, "golden MNIST digits right; the floor is"),
}


def make_repository(root: Path, versions: dict[int, bytes], config: dict[str, Any] | None) -> Path:
    for version, model in versions.items():
        (root / CONV / str(version)).mkdir(parents=True, exist_ok=True)
        (root / CONV / str(version) / "model.onnx").write_bytes(model)
    if config is not None:
        (root / CONV / "config.json").write_text(json.dumps(config))
    return root


@pytest.fixture(scope="module")
def v2_model() -> bytes:
    return softer()


@pytest.fixture
def repository(tmp_path: Path, v2_model: bytes) -> Path:
    """Versions 1 (the shipped ConvNet) and 2 (softer), config.json serving version 1."""
    return make_repository(
        tmp_path / "models",
        {1: shipped_weights("conv").read_bytes(), 2: v2_model},
        {"version_policy": {"specific": {"versions": [1]}}},
    )


@pytest.fixture(scope="module")
def digits(mnist_test_set: MnistSplit) -> npt.NDArray[np.float32]:
    """64 real MNIST test digits as model input."""
    images, _ = mnist_test_set
    return np.asarray(images[:IN_FLIGHT] / 255, dtype=np.float32).reshape(-1, 1, 28, 28)


@pytest.fixture(scope="module")
def expected(digits: npt.NDArray[np.float32], v2_model: bytes) -> dict[str, npt.NDArray[Any]]:
    """Each version's probabilities for `digits`, by onnxruntime offline."""
    answers = {}
    for version, model in (("1", shipped_weights("conv").read_bytes()), ("2", v2_model)):
        session = ort.InferenceSession(model, providers=["CPUExecutionProvider"])
        (answers[version],) = session.run([PROBABILITIES_NAME], {INPUT_NAME: digits})
    # The versions must tell apart on every digit, or an answer could not say whose it is.
    assert np.abs(answers["1"] - answers["2"]).max(axis=1).min() > 1e-4
    return answers


def infer_request(digit: npt.NDArray[np.float32], version: str = "") -> ModelInferRequest:
    return ModelInferRequest(
        model_name=CONV,
        model_version=version,
        inputs=[
            ModelInferRequestInferInputTensor(name="image", datatype="FP32", shape=[1, 1, 28, 28])
        ],
        raw_input_contents=[digit.astype("<f4").tobytes()],
    )


def probabilities(response: Any) -> npt.NDArray[np.float32]:
    return np.frombuffer(response.raw_output_contents[0], "<f4")


def http(server: ServerProcess, method: str, path: str, body: Any = None) -> tuple[int, Any]:
    """A request to the server's HTTP listener: the status and the JSON body (None: empty)."""
    address = next(e["http_port"] for e in server.logs if "http_port" in e)
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(f"http://[::1]:{address}{path}", data=data, method=method)
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            text = answer.read()
            return answer.status, json.loads(text) if text else None
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


# -- the repository on disk -----------------------------------------------------------------


def test_a_repository_serves_the_versions_its_policy_chooses(repository: Path) -> None:
    repo = Repository(repository)
    assert repo.plan(CONV).version_numbers == ("1",)
    policies: dict[str, tuple[dict[str, Any], tuple[str, ...]]] = {
        "latest 1": ({"version_policy": {"latest": {"num_versions": 1}}}, ("2",)),
        "latest 5": ({"version_policy": {"latest": {"num_versions": 5}}}, ("1", "2")),
        "all": ({"version_policy": {"all": {}}}, ("1", "2")),
        "default": ({}, ("2",)),
        "specific": ({"version_policy": {"specific": {"versions": [2]}}}, ("2",)),
    }
    for config, versions in policies.values():
        assert repo.plan(CONV, config).version_numbers == versions
    plan = repo.plan(CONV, {"max_batch_size": 8, "golden_accuracy_floor": 0.9})
    assert (plan.max_batch_size, plan.accuracy_floor) == (8, 0.9)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"version_policy": {"specific": {"versions": [3]}}}, "does not hold (it holds 1, 2)"),
        ({"max_batch_size": 0}, "max_batch_size must be an integer of at least 1"),
        ({"instance_group": []}, "unknown key(s) instance_group"),
        ({"architecture": "mlp"}, "is a 'conv' model"),
        ({"golden_accuracy_floor": 2}, "golden_accuracy_floor must be a number in [0, 1]"),
    ],
    ids=["missing-version", "bad-batch", "unknown-key", "wrong-architecture", "bad-floor"],
)
def test_a_bad_config_is_refused_saying_why(
    repository: Path, config: dict[str, Any], message: str
) -> None:
    with pytest.raises(RepositoryError, match=None) as caught:
        Repository(repository).plan(CONV, config)
    assert message in str(caught.value)


def test_paths_stay_inside_the_repository(repository: Path, tmp_path: Path) -> None:
    repo = Repository(repository)
    for name in ("../models", "..", "mnist_convnet/../mnist_convnet", ".hidden"):
        with pytest.raises(RepositoryError, match="is not a model name"):
            repo.plan(name)
    outside = tmp_path / "outside.onnx"
    outside.write_bytes(shipped_weights("conv").read_bytes())
    (repository / CONV / "3").mkdir()
    (repository / CONV / "3" / "model.onnx").symlink_to(outside)
    with pytest.raises(RepositoryError, match="leads out of the model repository"):
        repo.plan(CONV)
    (repository / CONV / "3" / "model.onnx").unlink()
    (repository / CONV / "3" / "model.onnx").symlink_to(repository / CONV / "1" / "model.onnx")
    assert repo.plan(CONV, {"version_policy": {"all": {}}}).version_numbers == ("1", "2", "3")

    elsewhere = make_repository(tmp_path / "elsewhere", {1: b"x"}, None)
    linked = tmp_path / "linked"
    linked.mkdir()
    (linked / CONV).symlink_to(elsewhere / CONV)
    with pytest.raises(RepositoryError, match="leads out of the model repository"):
        Repository(linked).plan(CONV)
    with pytest.raises(ModelNotFoundError, match="unknown model 'mnist_resnet'"):
        repo.plan("mnist_resnet")


# -- the control API ------------------------------------------------------------------------


async def test_the_control_api_is_refused_unless_explicit(repository: Path) -> None:
    server = ServerProcess("--workers", "1", "--model-repository", str(repository))
    async with Channel("::1", server.port) as channel:
        stub = GrpcInferenceServiceStub(channel)
        index = await stub.repository_index(RepositoryIndexRequest())
        assert [(m.name, m.version, m.state) for m in index.models] == [(CONV, "1", "READY")]
        for call in (
            stub.repository_model_load(RepositoryModelLoadRequest(model_name=CONV)),
            stub.repository_model_unload(RepositoryModelUnloadRequest(model_name=CONV)),
        ):
            with pytest.raises(GRPCError) as caught:
                await call
            assert caught.value.status is Status.UNAVAILABLE
            assert "explicit model load / unload is not allowed" in str(caught.value.message)
        status, body = await asyncio.to_thread(
            http, server, "POST", f"/v2/repository/models/{CONV}/load"
        )
        assert status == 503
        assert "--model-control explicit" in body["error"]
    refused = server.log_entry(message=f"model control: load {CONV} refused")
    assert refused["level"] == "warning"
    assert refused["peer"].startswith("::1")
    assert server.stop() == 0


async def test_load_swap_unload_and_versions_everywhere(
    repository: Path, digits: npt.NDArray[np.float32], expected: dict[str, Any]
) -> None:
    server = ServerProcess(
        "--workers", "1", "--model-repository", str(repository), "--model-control", "explicit"
    )
    async with Channel("::1", server.port) as channel:
        oip, mnist = GrpcInferenceServiceStub(channel), MnistStub(channel)
        answer = await oip.model_infer(infer_request(digits[0]))
        assert answer.model_version == "1"
        np.testing.assert_allclose(probabilities(answer), expected["1"][0], atol=1e-6)

        await oip.repository_model_load(
            RepositoryModelLoadRequest(model_name=CONV, parameters=pin(2))
        )
        answer = await oip.model_infer(infer_request(digits[1]))
        assert answer.model_version == "2"
        np.testing.assert_allclose(probabilities(answer), expected["2"][1], atol=1e-6)
        metadata = await oip.model_metadata(ModelMetadataRequest(name=CONV))
        assert metadata.versions == ["2"]
        info = await mnist.get_model_info(ModelInfoRequest())
        assert (info.metadata["model_version"], info.metadata["served_versions"]) == ("2", "2")
        with pytest.raises(GRPCError) as caught:
            await oip.model_infer(infer_request(digits[0], version="1"))
        assert caught.value.status is Status.NOT_FOUND

        # Both versions served: an unversioned call takes the highest, a versioned one its own.
        both = json.dumps({"version_policy": {"all": {}}})
        await oip.repository_model_load(
            RepositoryModelLoadRequest(
                model_name=CONV, parameters={"config": ModelRepositoryParameter(string_param=both)}
            )
        )
        for version in ("1", "2"):
            answer = await oip.model_infer(infer_request(digits[2], version=version))
            assert answer.model_version == version
            np.testing.assert_allclose(probabilities(answer), expected[version][2], atol=1e-6)
        assert (await oip.model_metadata(ModelMetadataRequest(name=CONV))).versions == ["1", "2"]

        await oip.repository_model_unload(RepositoryModelUnloadRequest(model_name=CONV))
        with pytest.raises(GRPCError) as caught:
            await oip.model_infer(infer_request(digits[0]))
        assert caught.value.status is Status.NOT_FOUND
        assert "unloaded" in str(caught.value.message)
        index = await oip.repository_index(RepositoryIndexRequest())
        assert [(m.name, m.state, m.reason) for m in index.models] == [
            (CONV, "UNAVAILABLE", "unloaded")
        ]
        status, body = await asyncio.to_thread(
            http, server, "POST", f"/v2/repository/models/{CONV}/load"
        )
        assert (status, body) == (200, None)  # config.json's version: 1
        answer = await oip.model_infer(infer_request(digits[3]))
        assert answer.model_version == "1"
        status, body = await asyncio.to_thread(http, server, "POST", "/v2/repository/index", {})
        assert body == [{"name": CONV, "version": "1", "state": "READY", "reason": ""}]
    logged = server.log_entry(message=f"model control: unload {CONV} done")
    assert logged["outcome"] == "done"
    call = server.log_entry(message="call /inference.GRPCInferenceService/ModelInfer OK")
    assert call["version"] == "1"
    assert server.stop() == 0


@pytest.mark.parametrize("bad", list(BAD_VERSIONS), ids=list(BAD_VERSIONS))
async def test_a_bad_version_is_refused_everywhere_and_the_old_one_serves_on(
    repository: Path, digits: npt.NDArray[np.float32], expected: dict[str, Any], bad: str
) -> None:
    make, reason = BAD_VERSIONS[bad]
    make_repository(repository, {3: make()}, None)
    server = ServerProcess(
        "--workers", "2", "--model-repository", str(repository), "--model-control", "explicit",
        "--metrics-address", "[::1]:0",
    )  # fmt: skip
    async with Channel("::1", server.port) as channel:
        oip = GrpcInferenceServiceStub(channel)
        with pytest.raises(GRPCError) as caught:
            await oip.repository_model_load(
                RepositoryModelLoadRequest(model_name=CONV, parameters=pin(3))
            )
        assert caught.value.status is Status.INVALID_ARGUMENT
        assert "version 3" in str(caught.value.message)
        assert reason in str(caught.value.message)
        for digit in range(8):
            answer = await oip.model_infer(infer_request(digits[digit]))
            assert answer.model_version == "1"
            np.testing.assert_allclose(probabilities(answer), expected["1"][digit], atol=1e-6)
    assert server.log_entry(message=f"model control: load {CONV} refused")["level"] == "warning"
    metrics_port = next(e["metrics_port"] for e in server.logs if "metrics_port" in e)
    scrape = urllib.request.urlopen(f"http://[::1]:{metrics_port}/metrics", timeout=30).read()
    assert (
        f'mnist_model_loads_total{{action="load",model="{CONV}",outcome="refused"}} 1.0'
        in scrape.decode()
    )
    assert server.stop() == 0


def test_sighup_rescans_the_repository(repository: Path, digits: npt.NDArray[np.float32]) -> None:
    server = ServerProcess("--workers", "2", "--model-repository", str(repository))

    async def versions() -> set[str]:
        async with Channel("::1", server.port) as channel:
            oip = GrpcInferenceServiceStub(channel)
            answers = [await oip.model_infer(infer_request(digits[0])) for _ in range(4)]
        return {a.model_version for a in answers}

    assert asyncio.run(versions()) == {"1"}
    (repository / CONV / "config.json").write_text("{}")  # latest 1: version 2
    server.process.send_signal(signal.SIGHUP)
    server.log_entry(message="model control: rescan: model 'mnist_convnet' serves 2 in 2 workers")
    # New connections land on either worker; each serves version 2 now.
    wait_until(lambda: all(asyncio.run(versions()) == {"2"} for _ in range(4)), "version 2")
    assert server.stop() == 0


def test_a_worker_killed_during_a_swap_comes_back_on_the_served_version(
    repository: Path, digits: npt.NDArray[np.float32]
) -> None:
    server = ServerProcess(
        "--workers", "2", "--model-repository", str(repository), "--model-control", "explicit"
    )
    workers = psutil.Process(server.process.pid).children()
    assert len(workers) == 2

    async def load() -> str:
        async with Channel("::1", server.port) as channel:
            try:
                await GrpcInferenceServiceStub(channel).repository_model_load(
                    RepositoryModelLoadRequest(model_name=CONV, parameters=pin(2))
                )
            except GRPCError as exc:
                return str(exc.message)
            return "loaded"

    async def kill_during_load() -> str:
        loading = asyncio.ensure_future(load())
        await eventually(
            lambda: any(e.get("message", "").startswith("preparing model") for e in server.logs),
            "the workers to start preparing",
        )
        # Not the worker that took the load call (its connection would die with it).
        assert server.port is not None
        victim = next(w for w in workers if not holds_a_connection(w, server.port))
        os.kill(victim.pid, signal.SIGKILL)  # mid-preparation (it takes ~0.3 s)
        victims.append(victim)
        return await within(loading, "the load's answer", timeout=60)

    victims: list[psutil.Process] = []

    outcome = asyncio.run(kill_during_load())
    served = "2" if outcome == "loaded" else "1"
    if outcome != "loaded":
        assert "exited during the swap" in outcome
    restarted = server.log_entry(worker_pid=victims[0].pid, timeout=30)
    assert "exited unexpectedly; restarting it" in restarted["message"]
    wait_until(
        lambda: len(psutil.Process(server.process.pid).children()) == 2, "the worker's restart"
    )

    async def versions() -> set[str]:
        found: set[str] = set()
        for _ in range(16):  # new connections: SO_REUSEPORT spreads them over both workers
            async with Channel("::1", server.port) as channel:
                answer = await GrpcInferenceServiceStub(channel).model_infer(
                    infer_request(digits[0])
                )
                found.add(answer.model_version)
        return found

    # The restarted worker answers once it is ready; every answer is the served version.
    wait_until(lambda: asyncio.run(versions()) == {served}, f"version {served} everywhere")
    assert server.stop() == 0


def holds_a_connection(worker: psutil.Process, port: int) -> bool:
    return any(
        c.laddr and c.laddr.port == port and c.status == psutil.CONN_ESTABLISHED
        for c in worker.net_connections(kind="tcp")
    )


# -- the load run ---------------------------------------------------------------------------


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


async def test_swapping_under_load_in_two_workers_fails_no_call(
    repository: Path, digits: npt.NDArray[np.float32], expected: dict[str, Any]
) -> None:
    """64 calls in flight over 8 connections while versions 1 and 2 swap 10 times: no call
    fails, each answer is the probabilities of the version it names, every call started
    after a load returned is answered by the version loaded, and health says SERVING
    throughout (the server's and the MNIST service's)."""
    server = ServerProcess(
        "--workers", "2", "--model-repository", str(repository), "--model-control", "explicit"
    )
    workers = [c.pid for c in psutil.Process(server.process.pid).children()]
    channels = [Channel("::1", server.port) for _ in range(8)]
    stubs = [GrpcInferenceServiceStub(c) for c in channels]
    answers: list[tuple[float, float, int, str, npt.NDArray[np.float32]]] = []
    failures: list[BaseException] = []
    stop = asyncio.Event()
    deadline = time.monotonic() + LOAD_RUN_MAX_S

    async def caller(index: int) -> None:
        stub = stubs[index % len(stubs)]
        while not stop.is_set() and time.monotonic() < deadline:
            started = time.monotonic()
            try:
                answer = await stub.model_infer(infer_request(digits[index]), timeout=30)
            except Exception as exc:
                failures.append(exc)
                continue
            finished = time.monotonic()
            answers.append((started, finished, index, answer.model_version, probabilities(answer)))

    rss = {pid: [rss_mb(pid)] for pid in workers}

    async def sample_rss() -> None:
        while not stop.is_set():
            for pid in workers:
                rss[pid].append(rss_mb(pid))
            await asyncio.sleep(0.05)

    health_channel = Channel("::1", server.port)
    health = HealthStub(health_channel)
    statuses: list[int] = []

    async def watch_health() -> None:
        while not stop.is_set():
            for service in ("", "mnist.Mnist"):
                answer = await health.Check(HealthCheckRequest(service=service), timeout=30)
                statuses.append(answer.status)
            await asyncio.sleep(0.01)

    def answered(count: int) -> Callable[[], bool]:
        return lambda: len(answers) >= count

    callers = [asyncio.ensure_future(caller(i)) for i in range(IN_FLIGHT)]
    sampler = asyncio.ensure_future(sample_rss())
    watcher = asyncio.ensure_future(watch_health())
    swaps: list[tuple[float, float, str]] = []  # (load called, load returned, version)
    try:
        await eventually(lambda: len(answers) >= IN_FLIGHT, "the first answers")
        for swap in range(SWAPS):
            target = 2 if swap % 2 == 0 else 1
            called = time.monotonic()
            await within(
                stubs[0].repository_model_load(
                    RepositoryModelLoadRequest(model_name=CONV, parameters=pin(target))
                ),
                f"swap {swap} to version {target}",
                timeout=60,
            )
            swaps.append((called, time.monotonic(), str(target)))
            await eventually(answered(len(answers) + IN_FLIGHT), "answers after a swap")
    finally:
        stop.set()
        await within(asyncio.gather(*callers, sampler, watcher), "the callers to stop", timeout=60)
        for channel in [*channels, health_channel]:
            channel.close()

    assert failures == []
    assert len(statuses) > 2 * SWAPS
    assert set(statuses) == {HealthCheckResponse.SERVING}
    for started, finished, index, version, row in answers:
        np.testing.assert_allclose(row, expected[version][index], atol=1e-6)
        done = [v for (_, returned, v) in swaps if returned <= started]
        if done:  # the last load done before the call, or one called while it ran
            allowed = {done[-1]} | {v for (called, _, v) in swaps[len(done) :] if called < finished}
            assert version in allowed, "a call started after a load was answered by another"
    first = [
        min(f for s, f, _, v, _ in answers if s >= called and v == version) - called
        for called, _, version in swaps
    ]
    report = {
        "answers": len(answers),
        "failures": len(failures),
        "swaps": len(swaps),
        "load_call_to_first_new_answer_s": {
            "median": float(np.median(first)),
            "max": float(max(first)),
        },
        "rss_mb_per_worker": {
            str(pid): {"before": round(v[0], 1), "max": round(max(v), 1)} for pid, v in rss.items()
        },
    }
    print(json.dumps(report))
    out = os.environ.get("MNIST_SWAP_REPORT")
    if out:
        Path(out).write_text(json.dumps(report, indent=2))
    assert server.stop() == 0


def test_a_load_whose_client_leaves_is_still_carried_out(repository: Path) -> None:
    """A client that asks for a load and disconnects while it is prepared (its HTTP request
    is cancelled then) does not abandon the load half-way: it is finished, committed and
    logged, as in `--workers N`, where the supervisor drives every load."""
    server = ServerProcess(
        "--workers", "1", "--model-repository", str(repository), "--model-control", "explicit"
    )  # fmt: skip
    port = next(e["http_port"] for e in server.logs if "http_port" in e)
    body = json.dumps({"parameters": {"config": json.dumps(pin_config(2))}}).encode()
    client = socket.create_connection(("::1", port), timeout=30)
    try:
        client.sendall(
            f"POST /v2/repository/models/{CONV}/load HTTP/1.1\r\nHost: x\r\n".encode()
            + f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        server.log_entry(message=f"preparing model {CONV} version(s) 2")
        client.close()  # while version 2 loads, warms up and is checked
        server.log_entry(message=f"model {CONV} now serves 2")
        logged = server.log_entry(message=f"model control: load {CONV} done")
        assert logged["outcome"] == "done"
    finally:
        client.close()
        assert server.stop() == 0


# -- tritonclient ---------------------------------------------------------------------------


def test_tritonclient_repository_calls_work_unchanged(
    repository: Path, digits: npt.NDArray[np.float32], expected: dict[str, Any], tmp_path: Path
) -> None:
    python = client_venv("tritonclient", TRITONCLIENT)
    server = ServerProcess(
        "--workers", "2", "--model-repository", str(repository), "--model-control", "explicit"
    )
    images = tmp_path / "images.npy"
    np.save(images, digits[:4])
    output = tmp_path / "facts.json"
    done = subprocess.run(
        [str(python), str(CLIENTS / "run_tritonclient_repository.py"), server.address,
         str(images), str(output)],
        capture_output=True, text=True, timeout=300, check=False, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    facts = json.loads(output.read_text())
    ready = {"name": CONV, "version": "1", "state": "READY"}
    assert facts["index_before"] == {"models": [ready]}
    assert facts["first"]["version"] == "1"
    np.testing.assert_allclose(facts["first"]["probabilities"], expected["1"][:4], atol=1e-6)
    assert (facts["ready_2"], facts["ready_1"], facts["metadata_versions"]) == (True, False, ["2"])
    assert facts["after_load"]["version"] == "2"
    np.testing.assert_allclose(facts["after_load"]["probabilities"], expected["2"][:4], atol=1e-6)
    assert facts["index_after_load"] == {"models": [{**ready, "version": "2"}]}
    assert facts["missing_version"]["status"] == "StatusCode.INVALID_ARGUMENT"
    assert "version(s) 7" in facts["missing_version"]["message"]
    assert facts["still_serving"] == "2"
    assert facts["ready_after_unload"] is False
    assert facts["infer_after_unload"]["status"] == "StatusCode.NOT_FOUND"
    assert facts["index_after_unload"] == {
        "models": [{"name": CONV, "state": "UNAVAILABLE", "reason": "unloaded"}]
    }
    assert facts["after_reload"] == "1"
    assert server.stop() == 0


def test_the_shipped_weights_are_a_read_only_repository() -> None:
    plan = Repository(builtin={CONV: shipped_weights("conv")}).plan(CONV)
    assert plan.version_numbers == ("1",)
    with pytest.raises(RepositoryError, match="does not hold"):
        Repository(builtin={CONV: shipped_weights("conv")}).plan(
            CONV, {"version_policy": {"specific": {"versions": [2]}}}
        )
