"""The served versions of each model, swapped atomically at run time.

A `ModelVersion` is one loaded version with its own batcher and pipeline. A call picks the
version it runs on once, when it starts (`ModelRegistry.get`), and keeps it: the calls
queued or running on a version when a swap happens finish on it, new calls take the new
one. The swap itself (`VersionedModel.serve`) is one assignment on the event loop. A retired
version is freed by reference counting when its last call lets go of it; the model keeps a
weak reference to it until then, so that `resident` can say how many versions a model holds,
and a new load can wait until the retired one is gone (two versions resident at most).

`load_version` loads one version's ONNX file, checks it is the file the plan named, warms it
up and runs the golden check (`engine.golden`). Nothing here knows about gRPC.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..constants import MODEL_NAMES, Architecture
from ..errors import ModelError, ModelNotFoundError
from . import golden
from .inference import Classifier, ModelInfo, OnnxClassifier
from .pipeline import Pipeline
from .repository import ModelPlan, VersionFile


@dataclass(eq=False, slots=True, weakref_slot=True)
class ModelVersion:
    """One loaded version of a model: the pipeline (and batcher) its calls run on."""

    name: str
    architecture: Architecture
    version: str
    pipeline: Pipeline
    accuracy: float | None = None
    """Its golden accuracy (None: not measured, e.g. a model given to the server in code)."""
    plan: ModelPlan | None = field(default=None, repr=False)
    """The load that made it (None: the server's start without a repository plan)."""
    clock: Classifier | None = field(default=None, repr=False)
    """The model its batcher runs, where HTTP times it (`http.timing.ModelClock`)."""

    @property
    def info(self) -> ModelInfo:
        """What the version's model is."""
        return self.pipeline.info


@dataclass(frozen=True, slots=True)
class Loaded:
    """A loaded model version not yet served: its number, model and golden accuracy."""

    version: str
    classifier: Classifier
    accuracy: float | None = None


class VersionedModel:
    """One model's served versions (none once unloaded); the highest answers unversioned
    calls."""

    def __init__(
        self, name: str, architecture: Architecture, versions: Sequence[ModelVersion] = ()
    ) -> None:
        self.name = name
        self.architecture = architecture
        self._versions: dict[str, ModelVersion] = {}
        self._default: ModelVersion | None = None
        self._retired: list[weakref.ref[ModelVersion]] = []
        self.serve(versions)

    @classmethod
    def single(
        cls, architecture: Architecture, pipeline: Pipeline, clock: Classifier | None = None
    ) -> VersionedModel:
        """A model served as version "1" from one pipeline (the shipped or given weights)."""
        name = MODEL_NAMES[architecture]
        return cls(
            name, architecture, [ModelVersion(name, architecture, "1", pipeline, clock=clock)]
        )

    @property
    def versions(self) -> tuple[str, ...]:
        """The served versions, oldest first."""
        return tuple(self._versions)

    @property
    def loaded(self) -> bool:
        """Whether any version is served."""
        return self._default is not None

    @property
    def default(self) -> ModelVersion | None:
        """The version unversioned calls take: the highest served."""
        return self._default

    @property
    def served(self) -> tuple[ModelVersion, ...]:
        """The served versions, oldest first."""
        return tuple(self._versions.values())

    @property
    def plan(self) -> ModelPlan | None:
        """The load whose versions are served (None: unloaded, or not loaded by a plan)."""
        return self._default.plan if self._default is not None else None

    def get(self, version: str = "") -> ModelVersion:
        """A served version ("": the default), or ModelNotFoundError."""
        if self._default is None:
            raise ModelNotFoundError(
                f"model {self.name!r} is unloaded; load it again to serve it "
                "(RepositoryModelLoad, POST /v2/repository/models/NAME/load)"
            )
        if not version:
            return self._default
        found = self._versions.get(version)
        if found is None:
            plural = "s" if len(self._versions) > 1 else ""
            raise ModelNotFoundError(
                f"model {self.name!r} has no version {version[:40]!r}; it has version{plural} "
                f"{', '.join(self._versions)}"
            )
        return found

    def serve(self, versions: Sequence[ModelVersion]) -> list[ModelVersion]:
        """Serve exactly `versions` from now on (none: unloaded); the versions no longer
        served are returned, and freed once their last call ends."""
        ordered = sorted(versions, key=lambda v: int(v.version))
        retired = [v for v in self._versions.values() if v not in ordered]
        self._versions = {v.version: v for v in ordered}
        self._default = ordered[-1] if ordered else None
        self._retired = [r for r in self._retired if r() is not None]
        self._retired += [weakref.ref(v) for v in retired]
        return retired

    def retired_alive(self) -> list[ModelVersion]:
        """Versions no longer served that calls (or anything else) still hold."""
        alive = [v for r in self._retired if (v := r()) is not None]
        return [v for v in alive if v not in self._versions.values()]

    def resident(self) -> int:
        """Versions in memory: those served and the retired ones still held."""
        return len(self._versions) + len(self.retired_alive())


class ModelRegistry:
    """The models the server knows, by name; `default` is the one the MNIST API serves."""

    def __init__(self, models: Sequence[VersionedModel], default: str) -> None:
        self._models = {model.name: model for model in models}
        self.default = self._models[default]

    def __iter__(self) -> Iterator[VersionedModel]:
        return iter(self._models.values())

    def __contains__(self, name: object) -> bool:
        return name in self._models

    def model(self, name: str) -> VersionedModel:
        """A model by name, loaded or not; ModelNotFoundError for one the server lacks."""
        found = self._models.get(name)
        if found is None:
            loaded = " and ".join(sorted(self._models))
            raise ModelNotFoundError(
                f"model {name!r} is not loaded on this server (it serves {loaded}; start it "
                "with --models to serve more)"
                if name in MODEL_NAMES.values()
                else f"unknown model {name[:100]!r}; this server serves {loaded}"
            )
        return found

    def get(self, name: str | None, version: str = "") -> ModelVersion:
        """The version a call runs on: of model `name` (None: the default model), `version`
        ("": the model's default); ModelNotFoundError when it is not served."""
        model = self.default if name is None else self.model(name)
        return model.get(version)


def load_version(
    plan: ModelPlan,
    file: VersionFile,
    *,
    device: str,
    threads: int,
    max_batch_size: int,
    floor: float | None,
) -> tuple[OnnxClassifier, float]:
    """Load one version of a plan, warm it up and run the golden check: the classifier and
    its golden accuracy, or ModelError saying why the version is refused. Blocking (run it
    in a thread at run time)."""
    what = f"model {plan.name!r} version {file.version}"
    try:
        classifier = OnnxClassifier.load(
            file.path, architecture=plan.architecture, device=device, threads=threads
        )
    except ModelError as exc:
        raise ModelError(f"{what}: {exc}") from None
    if classifier.info.weights_sha256 != file.sha256:
        raise ModelError(
            f"{what}: {file.path} changed after the load was planned (sha256 "
            f"{classifier.info.weights_sha256[:12]}, planned {file.sha256[:12]}); load again"
        )
    accuracy = golden.check(classifier, max_batch_size=max_batch_size, floor=floor, what=what)
    return classifier, accuracy


def floor_for(plan: ModelPlan, replaced: ModelVersion | None) -> float | None:
    """The golden accuracy a new version of `plan` must reach: config.json's floor, or one
    point below the version it replaces (None: nothing to compare with)."""
    if plan.accuracy_floor is not None:
        return plan.accuracy_floor
    if replaced is not None and replaced.accuracy is not None:
        return round(max(0.0, replaced.accuracy - 0.01), 6)
    return None


def by_architecture(registry: ModelRegistry) -> Mapping[Architecture, VersionedModel]:
    """The registry's models by architecture."""
    return {model.architecture: model for model in registry}


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """One line of the repository's index (Triton's `RepositoryIndexResponse.ModelIndex`)."""

    name: str
    version: str
    state: str
    """READY or UNAVAILABLE."""
    reason: str = ""


class ModelControl(Protocol):
    """Loading and unloading models at run time: the seam the protocols' repository APIs
    call (`runtime.control` implements it)."""

    def index(self, *, ready_only: bool = False) -> list[IndexEntry]:
        """The repository's models and their state."""
        ...

    async def load(self, name: str, config: Mapping[str, Any] | None = None) -> str:
        """Load (or reload) a model, its config.json overridden by `config`; what was done.
        Raises ModelControlError when the control API is off, ModelError when refused."""
        ...

    async def unload(self, name: str) -> str:
        """Stop serving a model; what was done."""
        ...
