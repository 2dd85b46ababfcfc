"""Loading and unloading models at run time: the `ModelControl` behind the repository APIs
and SIGHUP.

A load goes in two steps. Prepare: resolve the plan (`engine.repository`), wait until no
retired version of the model is still held (two versions resident at most), then load each
version's ONNX file, warm it up and run the golden check, in a thread, while the event loop
serves on. Commit: swap the model's served versions in one step (`engine.versions`). A
failed prepare changes nothing: the old version serves on, and the failure is the API
call's answer, a warning in the log and `mnist_model_loads_total{outcome="refused"}`.

One process (`Link` None) does both steps itself. A worker of `--workers N` (`Link` to the
supervisor) hands the request to the supervisor instead, which plans once and asks every
worker to prepare, then all to commit, or all to abort (`runtime.workers`): the swap happens
in every worker or in none, and the supervisor keeps the plans a restarted worker loads.

The control API's load and unload are refused (UNAVAILABLE) unless `--model-control
explicit`; the index is always served. Every action is logged with its outcome and peer.
SIGHUP rescans the repository whatever the mode: each loaded model whose plan changed on
disk is reloaded, the same safe way.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any, Final

from ..calls import current_call
from ..config import ServerConfig
from ..constants import MODEL_NAMES, Architecture
from ..engine.repository import ModelPlan, Repository
from ..engine.versions import (
    IndexEntry,
    Loaded,
    ModelRegistry,
    ModelVersion,
    VersionedModel,
    floor_for,
    load_version,
)
from ..errors import MnistServiceError, ModelControlError, ModelError, ModelNotFoundError
from .metrics import Metrics

log = logging.getLogger(__name__)

RETIRED_WAIT_S: Final = 30.0
"""How long a load waits for the calls still running on a retired version to end."""
_POLL_S: Final = 0.05

Build = Callable[[ModelPlan, str, Any, float], ModelVersion]
"""Makes a served version (its batcher and pipeline) from a loaded classifier."""


@dataclass(frozen=True, slots=True)
class Prepared:
    """A load or unload ready to commit: the model and the versions it will serve."""

    name: str
    plan: ModelPlan | None
    versions: tuple[ModelVersion, ...]


class Control:
    """The server's `ModelControl` (see the module's docstring)."""

    def __init__(
        self,
        config: ServerConfig,
        repository: Repository,
        registry: ModelRegistry,
        build: Build,
        *,
        plans: Mapping[str, ModelPlan | None],
        metrics: Metrics | None = None,
        link: Link | None = None,
    ) -> None:
        self.config = config
        self.plans = dict(plans)
        """What each model serves: the plan of its last load (None: unloaded)."""
        self.repository = repository
        self.registry = registry
        self._build = build
        self._metrics = metrics
        self.link = link
        self._lock = asyncio.Lock()
        self._prepared: dict[int, Prepared] = {}
        self._actions: set[asyncio.Future[str]] = set()
        """Actions under way (`request`), held here so that none is collected unfinished."""
        if link is not None:
            link.control = self

    @property
    def explicit(self) -> bool:
        """Whether the control API may load and unload (`--model-control explicit`)."""
        return self.config.model_control == "explicit"

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """Every model of the repository: a READY line per served version, else one
        UNAVAILABLE line saying why."""
        entries: list[IndexEntry] = []
        try:
            names = sorted(set(self.repository.names()) | {m.name for m in self.registry})
        except OSError as exc:
            raise ModelError(f"cannot read the model repository: {exc.strerror}") from exc
        for name in names:
            model = self.registry.model(name) if name in self.registry else None
            if model is not None and model.loaded:
                entries += [IndexEntry(name, v, "READY") for v in model.versions]
            elif not ready_only:
                reason = "unloaded" if model is not None else "not a model this server serves"
                entries.append(IndexEntry(name, "", "UNAVAILABLE", reason))
        return entries

    async def load(self, name: str, config: Mapping[str, Any] | None = None) -> str:
        """Load or reload model `name` through the control API."""
        return await self._api("load", name, dict(config) if config is not None else None)

    async def unload(self, name: str) -> str:
        """Unload model `name` through the control API."""
        return await self._api("unload", name, None)

    async def rescan(self) -> str:
        """Reload each loaded model whose files or config.json changed (SIGHUP)."""
        log.info("SIGHUP: rescanning the model repository %s", self.repository.describe())
        try:
            return await self.request("rescan", "", None)
        except MnistServiceError as exc:
            return str(exc)  # logged by `request`

    async def _api(self, action: str, name: str, config: dict[str, Any] | None) -> str:
        if not self.explicit:
            self._record(name, action, "refused", "the control API is off")
            raise ModelControlError(
                "explicit model load / unload is not allowed: the server runs with "
                "--model-control none (start it with --model-control explicit)"
            )
        return await self.request(action, name, config)

    async def request(self, action: str, name: str, config: dict[str, Any] | None) -> str:
        """Carry out a load, unload or rescan: here, or through the supervisor.

        The action runs to its end even when its caller goes (a client that disconnects, or
        resets its call): a load once asked for is finished, committed and logged, as in
        every worker of `--workers N`, where the supervisor drives it; the caller's
        cancellation only stops its own wait for the outcome."""
        action_task = asyncio.ensure_future(self._carry_out(action, name, config))
        self._actions.add(action_task)
        action_task.add_done_callback(self._actions.discard)
        return await asyncio.shield(action_task)

    async def _carry_out(self, action: str, name: str, config: dict[str, Any] | None) -> str:
        try:
            if self.link is not None:
                message = await self.link.request(action, name, config)
            else:
                async with self._lock:
                    message = await self._run_here(action, name, config)
        except MnistServiceError as exc:
            self._record(name, action, "refused", str(exc))
            raise
        self._record(
            name, action, "unchanged" if message.startswith("unchanged") else "done", message
        )
        return message

    async def _run_here(self, action: str, name: str, config: dict[str, Any] | None) -> str:
        if action == "rescan":
            done = []
            for model_name, plan in changed_plans(self.repository, self.plans):
                done.append(self.commit(await self.prepare(model_name, plan)))
            return "; ".join(done) or "unchanged: every loaded model is as on disk"
        planned = resolve(self.repository, self.plans, action, name, config)
        if isinstance(planned, str):
            return planned
        return self.commit(await self.prepare(name, planned))

    async def prepare(self, name: str, plan: ModelPlan | None) -> Prepared:
        """Load, warm up and check every version of `plan` (None: an unload); nothing
        changes for the calls being served."""
        model = self.registry.model(name)
        if plan is None:
            return Prepared(name, None, ())
        log.info("preparing model %s version(s) %s", name, ", ".join(plan.version_numbers))
        await self._wait_for_retired(model)
        replaced = model.default
        floor = floor_for(plan, replaced)
        batch = plan.max_batch_size or self.config.max_batch_size
        versions = []
        for file in plan.versions:
            started = time.perf_counter()
            classifier, accuracy = await asyncio.to_thread(
                load_version,
                plan,
                file,
                device=self.config.device,
                threads=self.config.intra_op_threads,
                max_batch_size=batch,
                floor=floor,
            )
            log.info(
                "model %s version %d loaded, warmed up and checked",
                name,
                file.version,
                extra={
                    "fields": {
                        "golden_accuracy": round(accuracy, 4),
                        "floor": floor,
                        "sha256": file.sha256[:12],
                        "seconds": round(time.perf_counter() - started, 3),
                    }
                },
            )
            versions.append(self._build(plan, str(file.version), classifier, accuracy))
        return Prepared(name, plan, tuple(versions))

    async def _wait_for_retired(self, model: VersionedModel) -> None:
        deadline = time.monotonic() + RETIRED_WAIT_S
        while model.retired_alive():
            if time.monotonic() > deadline:
                held = ", ".join(v.version for v in model.retired_alive())
                raise ModelError(
                    f"model {model.name!r}: retired version(s) {held} still finish calls after "
                    f"{RETIRED_WAIT_S:g} s; two versions at most are kept in memory, try again"
                )
            await asyncio.sleep(_POLL_S)

    def commit(self, prepared: Prepared) -> str:
        """Swap the model's served versions: new calls take the new ones from now on."""
        model = self.registry.model(prepared.name)
        before = model.versions
        retired = model.serve(prepared.versions)
        self.plans[model.name] = prepared.plan
        if self._metrics is not None:
            for version in retired:
                self._metrics.version_served(model.name, version.version, False)
            for version in prepared.versions:
                self._metrics.version_served(model.name, version.version, True)
        now = ", ".join(model.versions) or "nothing (unloaded)"
        log.info(
            "model %s now serves %s",
            model.name,
            now,
            extra={"fields": {"before": ",".join(before), "versions": ",".join(model.versions)}},
        )
        return f"model {model.name!r} serves {now} (was {', '.join(before) or 'unloaded'})"

    # -- the worker's side of the supervisor's two steps ----------------------------------

    async def prepare_step(self, step: int, name: str, plan: ModelPlan | None) -> None:
        """The supervisor's prepare: load and check, hold the result until commit or abort."""
        try:
            self._prepared[step] = await self.prepare(name, plan)
        except MnistServiceError as exc:
            assert self.link is not None
            self.link.send(("prepared", step, exc))
        except Exception as exc:  # an unexpected failure refuses the load everywhere too
            log.exception("preparing model %s failed", name)
            assert self.link is not None
            self.link.send(("prepared", step, ModelError(f"model {name!r}: {exc}")))
        else:
            assert self.link is not None
            self.link.send(("prepared", step, None))

    def commit_step(self, step: int) -> None:
        prepared = self._prepared.pop(step, None)
        if prepared is not None:
            self.commit(prepared)
        assert self.link is not None
        self.link.send(("committed", step))

    def abort_step(self, step: int) -> None:
        if self._prepared.pop(step, None) is not None:
            log.info("a prepared load was aborted (another worker refused it)")

    def _record(self, name: str, action: str, outcome: str, message: str) -> None:
        if self._metrics is not None:
            self._metrics.record_load(name or "*", action, outcome)
        call = current_call()
        level = logging.WARNING if outcome == "refused" else logging.INFO
        log.log(
            level,
            "model control: %s %s %s",
            action,
            name or "(all models)",
            outcome,
            extra={
                "fields": {
                    "action": action,
                    "model": name,
                    "outcome": outcome,
                    "detail": message,
                    "peer": _peer(call.peer) if call is not None else "signal",
                }
            },
        )


def repository_for(config: ServerConfig) -> Repository:
    """The served models' repository: `--model-repository`, or the built-in one (the shipped
    weights, `--model-weights` for the served architecture)."""
    serves = tuple(MODEL_NAMES[arch] for arch in config.served_models)
    if config.model_repository is not None:
        return Repository(config.model_repository, serves=serves)
    return Repository(
        builtin={MODEL_NAMES[arch]: config.weights_for(arch) for arch in config.served_models},
        serves=serves,
    )


def startup_plans(config: ServerConfig, repository: Repository) -> dict[str, ModelPlan | None]:
    """What each served model serves at startup: its repository plan."""
    return {MODEL_NAMES[arch]: repository.plan(MODEL_NAMES[arch]) for arch in config.served_models}


def load_plans(
    config: ServerConfig, plans: Mapping[str, ModelPlan | None]
) -> dict[Architecture, list[Loaded]]:
    """Load every version the plans name, each warmed up and golden-checked against its
    config.json floor (none by default at startup: nothing is replaced); a model whose
    plan is None (unloaded in the other workers) stays unloaded."""
    loaded: dict[Architecture, list[Loaded]] = {}
    for arch in config.served_models:
        plan = plans.get(MODEL_NAMES[arch])
        loaded[arch] = []
        if plan is None:
            continue
        batch = plan.max_batch_size or config.max_batch_size
        for file in plan.versions:
            classifier, accuracy = load_version(
                plan,
                file,
                device=config.device,
                threads=config.intra_op_threads,
                max_batch_size=batch,
                floor=plan.accuracy_floor,
            )
            loaded[arch].append(Loaded(str(file.version), classifier, accuracy))
    return loaded


def resolve(
    repository: Repository,
    plans: Mapping[str, ModelPlan | None],
    action: str,
    name: str,
    config: Mapping[str, Any] | None,
) -> ModelPlan | str | None:
    """What a load (its plan) or an unload (None) of `name` would serve, given what `plans`
    serve now, or (a str) why there is nothing to do."""
    if name not in plans:
        repository.plan(name)  # raises for a name that is not a model of this server
        raise ModelNotFoundError(
            f"model {name!r} is not served by this server; start it with --models to serve it"
        )
    current = plans[name]
    if action == "unload":
        if current is None:
            return f"unchanged: model {name!r} is unloaded already"
        return None
    plan = repository.plan(name, config)
    if plan.same_as(current):
        return f"unchanged: model {name!r} serves version(s) {', '.join(plan.version_numbers)}"
    return plan


def changed_plans(
    repository: Repository, plans: Mapping[str, ModelPlan | None]
) -> list[tuple[str, ModelPlan]]:
    """The loaded models whose plan on disk differs from what they serve (a rescan's work)."""
    changed = []
    for name, current in sorted(plans.items()):
        if current is None:
            continue
        plan = repository.plan(name)
        if not plan.same_as(current):
            changed.append((name, plan))
    return changed


class Link:
    """A worker's end of its pipe to the supervisor: requests up, the two steps down."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection
        self.control: Control | None = None
        self._ids = itertools.count(1)
        self._waiting: dict[int, asyncio.Future[str]] = {}
        self._tasks: set[asyncio.Task[None]] = set()

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        """Read the supervisor's messages from the event loop."""
        loop.add_reader(self._connection.fileno(), self._readable)

    def stop(self, loop: asyncio.AbstractEventLoop) -> None:
        loop.remove_reader(self._connection.fileno())

    def send(self, message: tuple[Any, ...]) -> None:
        try:
            self._connection.send(message)
        except OSError:
            log.warning("the supervisor is gone; a model control message was not sent")

    async def request(self, action: str, name: str, config: dict[str, Any] | None) -> str:
        """Ask the supervisor to carry out an action in every worker; its outcome."""
        request = next(self._ids)
        future: asyncio.Future[str] = asyncio.get_running_loop().create_future()
        self._waiting[request] = future
        try:
            self.send(("request", request, action, name, config))
            return await future
        finally:
            self._waiting.pop(request, None)

    def _readable(self) -> None:
        try:
            while self._connection.poll():
                self._dispatch(self._connection.recv())
        except (EOFError, OSError):
            asyncio.get_running_loop().remove_reader(self._connection.fileno())

    def _dispatch(self, message: tuple[Any, ...]) -> None:
        kind = message[0]
        control = self.control
        assert control is not None
        if kind == "prepare":
            _, step, name, plan = message
            task = asyncio.ensure_future(control.prepare_step(step, name, plan))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        elif kind == "commit":
            control.commit_step(message[1])
        elif kind == "abort":
            control.abort_step(message[1])
        elif kind == "result":
            _, request, error, text = message
            future = self._waiting.get(request)
            if future is not None and not future.done():
                if error is not None:
                    future.set_exception(error)
                else:
                    future.set_result(text)


def _peer(peer: object) -> str:
    if isinstance(peer, tuple) and len(peer) >= 2:
        return f"{peer[0]}:{peer[1]}"
    return str(peer) if peer is not None else ""
