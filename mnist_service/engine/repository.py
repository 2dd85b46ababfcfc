"""The model repository: which ONNX files a model's versions are, read from Triton's layout.

    DIR/mnist_convnet/1/model.onnx
    DIR/mnist_convnet/2/model.onnx
    DIR/mnist_convnet/config.json      optional
    DIR/mnist_mlp/1/model.onnx

A version is a folder named by a positive integer that holds `model.onnx`. `config.json`
(Triton's JSON field names where Triton has one) may hold:

    {
      "architecture": "conv",                                   the name's, if given
      "version_policy": {"latest": {"num_versions": 1}},        or {"specific": {"versions":
                                                                [1, 2]}}, or {"all": {}}
      "max_batch_size": 32,                                     else --max-batch-size
      "dynamic_batching": {"max_queue_delay_microseconds": 0},  else --max-batch-delay
      "golden_accuracy_floor": 0.97                             else 1 point below the
                                                                version replaced
    }

Without `--model-repository` the shipped weights form a built-in, read-only repository (one
version, "1", of each model), and `--model-weights` is version 1 of the served model.

Paths stay inside the repository: model names are plain folder names (no `/`, no `..`), and a
model folder, version file or config.json whose real path (symlinks resolved) lies outside
the repository's real path is refused. A `ModelPlan` is what one load serves: the versions'
files with their sha256, so that every worker loads the same bytes. Nothing here knows about
gRPC.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from ..constants import ARCHITECTURES, MODEL_NAMES, Architecture
from ..errors import ModelError, ModelNotFoundError, RepositoryError

MODEL_FILE: Final = "model.onnx"
CONFIG_FILE: Final = "config.json"
_NAME: Final = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CONFIG_KEYS: Final = (
    "name",
    "platform",
    "backend",
    "architecture",
    "version_policy",
    "max_batch_size",
    "dynamic_batching",
    "golden_accuracy_floor",
)
ARCHITECTURE_OF: Final[Mapping[str, Architecture]] = {
    name: arch for arch, name in MODEL_NAMES.items()
}


@dataclass(frozen=True, slots=True)
class VersionFile:
    """One version of a model: its number, its ONNX file and the file's sha256."""

    version: int
    path: Path
    sha256: str


@dataclass(frozen=True, slots=True)
class ModelPlan:
    """What one load of a model serves: its versions and its settings (None: the server's)."""

    name: str
    architecture: Architecture
    versions: tuple[VersionFile, ...]
    max_batch_size: int | None = None
    max_batch_delay_us: int | None = None
    accuracy_floor: float | None = None

    @property
    def version_numbers(self) -> tuple[str, ...]:
        """The versions, as the protocols name them ("1", "2"), oldest first."""
        return tuple(str(v.version) for v in self.versions)

    def same_as(self, other: ModelPlan | None) -> bool:
        """Whether loading this plan would serve exactly what `other` serves."""
        return other is not None and self == other


@dataclass(frozen=True, slots=True)
class _Policy:
    latest: int | None = 1
    specific: tuple[int, ...] = ()

    def choose(self, available: list[int], name: str) -> list[int]:
        if self.specific:
            missing = sorted(set(self.specific) - set(available))
            if missing:
                raise RepositoryError(
                    f"model {name!r}: the version policy asks for version(s) "
                    f"{', '.join(map(str, missing))}, which the repository does not hold "
                    f"(it holds {', '.join(map(str, available)) or 'none'})"
                )
            return sorted(set(self.specific))
        if self.latest is None:
            return available
        return available[-self.latest :]


class Repository:
    """A model repository on disk (`root`), or the built-in one (`builtin`: name -> file)."""

    def __init__(
        self,
        root: Path | None = None,
        *,
        builtin: Mapping[str, Path] | None = None,
        serves: tuple[str, ...] = tuple(MODEL_NAMES.values()),
    ) -> None:
        if (root is None) == (builtin is None):
            raise ValueError("a repository is a folder or the built-in one, not both")
        self.root = root
        self._real_root = Path(os.path.realpath(root)) if root is not None else None
        self._builtin = dict(builtin or {})
        self._serves = serves
        if root is not None and not root.is_dir():
            raise RepositoryError(f"the model repository {root} is not a folder")

    @property
    def read_only(self) -> bool:
        """The built-in repository: its models can be reloaded, never changed."""
        return self.root is None

    def describe(self) -> str:
        """Where the models come from, for logs and messages."""
        return str(self.root) if self.root is not None else "the built-in repository"

    def names(self) -> list[str]:
        """The models the repository holds (folders with a valid name), sorted."""
        if self.root is None:
            return sorted(self._builtin)
        return sorted(
            entry.name
            for entry in self.root.iterdir()
            if _NAME.fullmatch(entry.name) and entry.is_dir()
        )

    def plan(self, name: str, override: Mapping[str, Any] | None = None) -> ModelPlan:
        """The versions and settings one load of model `name` would serve: config.json's, or
        `override`'s (a config in the same form) instead; raises what is wrong."""
        if not _NAME.fullmatch(name):
            raise RepositoryError(
                f"{name[:100]!r} is not a model name: letters, digits, '_', '.' and '-', "
                "not starting with '.' or '-'"
            )
        architecture = ARCHITECTURE_OF.get(name)
        if architecture is None or name not in self._serves:
            raise ModelNotFoundError(
                f"unknown model {name!r}; this server serves {' and '.join(self._serves)}"
            )
        if self.root is None:
            files = {1: self._builtin[name]} if name in self._builtin else {}
            document = dict(override or {})
        else:
            folder = self._inside(self.root / name, f"model {name!r}")
            if not folder.is_dir():
                raise ModelNotFoundError(
                    f"model {name!r} is not in the repository {self.root} (no folder {name}/)"
                )
            files = self._versions(folder, name)
            document = dict(override) if override is not None else self._config(folder, name)
        settings = _settings(document, name, architecture)
        if not files:
            raise RepositoryError(
                f"model {name!r} has no version in {self.describe()}: each is a folder named by "
                f"a number holding {MODEL_FILE} ({name}/1/{MODEL_FILE})"
            )
        chosen = settings.pop("policy").choose(sorted(files), name)
        return ModelPlan(
            name=name,
            architecture=architecture,
            versions=tuple(VersionFile(v, files[v], _sha256(files[v])) for v in chosen),
            **settings,
        )

    def _versions(self, folder: Path, name: str) -> dict[int, Path]:
        found: dict[int, Path] = {}
        for entry in folder.iterdir():
            if not entry.name.isdigit() or entry.name.startswith("0"):
                continue  # Triton's rule: versions are positive numbers; other folders ignored
            model = entry / MODEL_FILE
            if model.exists() or model.is_symlink():
                found[int(entry.name)] = self._inside(model, f"model {name!r} version {entry.name}")
        return found

    def _config(self, folder: Path, name: str) -> dict[str, Any]:
        path = folder / CONFIG_FILE
        if not (path.exists() or path.is_symlink()):
            return {}
        path = self._inside(path, f"model {name!r}'s {CONFIG_FILE}")
        try:
            document = json.loads(path.read_text())
        except (OSError, ValueError) as exc:
            raise RepositoryError(f"{path} is not readable JSON: {exc}") from None
        if not isinstance(document, dict):
            raise RepositoryError(f"{path} must hold a JSON object")
        return document

    def _inside(self, path: Path, what: str) -> Path:
        """`path`, refused unless its real path (symlinks resolved) is in the repository."""
        assert self._real_root is not None
        real = Path(os.path.realpath(path))
        if not real.is_relative_to(self._real_root):
            raise RepositoryError(
                f"{what}: {path} leads out of the model repository (to {real}); paths must stay "
                f"inside {self.root}"
            )
        return real


def _settings(document: Mapping[str, Any], name: str, architecture: Architecture) -> dict[str, Any]:
    """config.json's settings, checked: the version policy and the keyword arguments of
    `ModelPlan` it sets."""
    where = f"model {name!r}'s config"
    unknown = sorted(set(document) - set(_CONFIG_KEYS))
    if unknown:
        raise RepositoryError(
            f"{where} has unknown key(s) {', '.join(unknown)}; "
            f"it may hold {', '.join(_CONFIG_KEYS)}"
        )
    if document.get("name", name) != name:
        raise RepositoryError(f"{where} names model {document['name']!r}, not {name!r}")
    if document.get("platform", "onnxruntime_onnx") != "onnxruntime_onnx":
        raise RepositoryError(f"{where}: the platform can only be onnxruntime_onnx")
    if document.get("backend", "onnxruntime") != "onnxruntime":
        raise RepositoryError(f"{where}: the backend can only be onnxruntime")
    declared = document.get("architecture", architecture)
    if declared not in ARCHITECTURES or declared != architecture:
        raise RepositoryError(
            f"{where} says architecture {declared!r}; model {name!r} is a {architecture!r} model"
        )
    settings: dict[str, Any] = {"policy": _policy(document.get("version_policy"), where)}
    if "max_batch_size" in document:
        settings["max_batch_size"] = _integer(document["max_batch_size"], "max_batch_size", where)
    batching = document.get("dynamic_batching")
    if batching is not None:
        if not isinstance(batching, dict) or set(batching) - {"max_queue_delay_microseconds"}:
            raise RepositoryError(
                f"{where}: dynamic_batching may hold max_queue_delay_microseconds only"
            )
        if "max_queue_delay_microseconds" in batching:
            settings["max_batch_delay_us"] = _integer(
                batching["max_queue_delay_microseconds"], "max_queue_delay_microseconds", where, 0
            )
    floor = document.get("golden_accuracy_floor")
    if floor is not None:
        if isinstance(floor, bool) or not isinstance(floor, (int, float)) or not 0 <= floor <= 1:
            raise RepositoryError(f"{where}: golden_accuracy_floor must be a number in [0, 1]")
        settings["accuracy_floor"] = float(floor)
    return settings


def _policy(policy: object, where: str) -> _Policy:
    if policy is None:
        return _Policy()
    if not isinstance(policy, dict) or len(policy) != 1:
        raise RepositoryError(
            f"{where}: version_policy must be one of {{'latest': {{'num_versions': N}}}}, "
            "{'specific': {'versions': [...]}} or {'all': {}}"
        )
    ((kind, value),) = policy.items()
    if kind == "all" and value in ({}, None):
        return _Policy(latest=None)
    if kind == "latest" and isinstance(value, dict) and set(value) <= {"num_versions"}:
        return _Policy(latest=_integer(value.get("num_versions", 1), "num_versions", where))
    if kind == "specific" and isinstance(value, dict) and set(value) <= {"versions"}:
        versions = value.get("versions")
        if isinstance(versions, list) and versions:
            return _Policy(specific=tuple(_integer(v, "versions", where) for v in versions))
    raise RepositoryError(f"{where}: version_policy {json.dumps(policy)[:200]} is not understood")


def _integer(value: object, key: str, where: str, least: int = 1) -> int:
    if isinstance(value, str) and value.isdigit():
        value = int(value)  # Triton's JSON writes int64 fields as strings
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise RepositoryError(f"{where}: {key} must be an integer of at least {least}")
    return value


def _sha256(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        raise ModelError(f"model weights not found: {path}") from None
    except OSError as exc:
        raise RepositoryError(f"cannot read {path}: {exc.strerror}") from exc
