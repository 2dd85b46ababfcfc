"""The baseline of the robustness report (`--baseline REF`): the same drawings read another way.

REF is a weights file, read with the current preprocessing, or a commit of this repository,
read as that commit's server would read it: its preprocessing, its shipped weights file of the
model's name, and the shifted views if it had them (`mnist_service/engine/views.py`; the
current `expand` and `collapse` apply them). The commit's `mnist_service` and weights are
materialised with ``git archive`` into a temporary folder, removed afterwards, and its
preprocessing runs in a worker process with that folder as its PYTHONPATH
(`export._baseline_worker`: files in, model input out, pickled over its stdin and stdout), one
per report part; the model runs here.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Final, Self

import numpy as np
import numpy.typing as npt

from export.robustness import FAILED, Predict
from mnist_service.engine.preprocess import Prepared
from mnist_service.engine.views import cascaded, collapse, expand

log = logging.getLogger(__name__)

REPOSITORY: Final = Path(__file__).resolve().parent.parent
"""The checkout this package runs from: where a commit REF is looked up."""

WORKER: Final = Path(__file__).with_name("_baseline_worker.py")


class BaselineError(Exception):
    """The baseline cannot be read: no such file or commit, or its preprocessing failed."""


@dataclass(frozen=True, kw_only=True)
class Baseline:
    """What the report compares the model with."""

    label: str
    """The table's column heading."""
    weights: Path
    tree: Path | None = None
    """The commit's files, whose preprocessing to run; None: the current preprocessing."""
    views: bool = True
    """Whether the commit's server had shifted views."""
    cascade: bool = True
    """Whether it read them in a cascade (`views.cascaded`), not always all five."""
    description: str


@contextmanager
def open_baseline(ref: str, model_name: str, repository: Path = REPOSITORY) -> Iterator[Baseline]:
    """The baseline REF names: an existing ``.onnx`` file, else a commit-ish of `repository`
    (materialised for as long as the context lasts)."""
    if ref.endswith(".onnx"):
        path = Path(ref)
        if not path.is_file():
            raise BaselineError(f"{ref}: no such weights file")
        yield Baseline(
            label=f"baseline {path.name}",
            weights=path,
            description=f"{ref} with the current preprocessing",
        )
        return
    try:
        commit = _git(repository, "rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}")
    except BaselineError as error:
        raise BaselineError(
            f"{ref}: neither an existing .onnx file nor a commit of {repository}"
        ) from error
    short = _git(repository, "rev-parse", "--short", commit)
    weights = f"weights/{model_name}"
    try:
        _git(repository, "cat-file", "-e", f"{commit}:{weights}")
    except BaselineError as error:
        raise BaselineError(f"commit {short} ({ref}) ships no {weights}") from error
    archive = _git_output(
        repository, "archive", "--format=tar", commit, "--", "mnist_service", weights
    )
    with tempfile.TemporaryDirectory(prefix=f"baseline-{short}-") as folder:
        tree = Path(folder)
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree, filter="data")
        module = tree / "mnist_service" / "engine" / "views.py"
        views = module.is_file()
        yield Baseline(
            label=f"{short} {model_name}",
            weights=tree / weights,
            tree=tree,
            views=views,
            cascade=views and "def cascaded(" in module.read_text(encoding="utf-8"),
            description=f"commit {short} ({ref}): its preprocessing and {weights}",
        )


def _git(repository: Path, *args: str) -> str:
    """A git command's text output, stripped."""
    return _git_output(repository, *args).decode().strip()


def _git_output(repository: Path, *args: str) -> bytes:
    """A git command's output; `BaselineError` when it fails."""
    try:
        done = subprocess.run(
            ["git", "-C", str(repository), *args], capture_output=True, check=True
        )
    except FileNotFoundError as error:
        raise BaselineError("git is not installed: a commit baseline needs it") from error
    except subprocess.CalledProcessError as error:
        why = error.stderr.decode(errors="replace").strip()
        raise BaselineError(f"git {args[0]} failed" + (f": {why}" if why else "")) from error
    output: bytes = done.stdout
    return output


@dataclass(frozen=True)
class Batch:
    """A commit's preprocessing of some files."""

    images: npt.NDArray[np.float32]
    """Model input, float32 [N, 1, 28, 28] (zeros where refused)."""
    redrawn: npt.NDArray[np.bool_]
    refused: npt.NDArray[np.bool_]


class PreprocessWorker:
    """A commit's preprocessing in a process of its own, started once and fed many batches."""

    def __init__(self, tree: Path, max_pixels: int, label: str = "the baseline") -> None:
        self.label = label
        self._process = subprocess.Popen(
            [sys.executable, "-P", str(WORKER), str(tree), str(max_pixels)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            cwd=tree,
            env={**os.environ, "PYTHONPATH": str(tree)},
        )
        greeting = self._receive()
        if "error" in greeting:
            self.close()
            raise BaselineError(f"{label}: {greeting['error']}")
        self.api: str = greeting["api"]
        self.redraws: bool = greeting["redraws"]
        log.info("baseline %s: preprocessing by %s", label, self.api)

    def prepare(self, files: list[bytes]) -> Batch:
        """Each file's model input, as the commit's preprocessing makes it."""
        stdin = self._pipe(self._process.stdin)
        try:
            pickle.dump(files, stdin, protocol=pickle.HIGHEST_PROTOCOL)
            stdin.flush()
        except BrokenPipeError as error:
            raise self._stopped() from error
        reply = self._receive()
        return Batch(reply["images"], reply["redrawn"], reply["refused"])

    def close(self) -> None:
        """Let the worker finish (it ends when its stdin closes)."""
        if self._process.stdin is not None and not self._process.stdin.closed:
            self._process.stdin.close()
        self._process.wait()
        if self._process.stdout is not None:
            self._process.stdout.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        kind: type[BaseException] | None,
        error: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _receive(self) -> dict[str, Any]:
        try:
            reply: dict[str, Any] = pickle.load(self._pipe(self._process.stdout))
        except EOFError as error:
            raise self._stopped() from error
        return reply

    def _stopped(self) -> BaselineError:
        code = self._process.wait()
        return BaselineError(
            f"the preprocessing of {self.label} stopped (exit status {code}); its error is above"
        )

    @staticmethod
    def _pipe(stream: IO[bytes] | None) -> IO[bytes]:
        assert stream is not None, "the worker's pipes are opened in __init__"
        return stream


def predict_at_commit(
    worker: PreprocessWorker, session: Any, *, shifted: bool, cascade: bool = True
) -> Predict:
    """Classify files with a commit's preprocessing (`worker`) and its model (`session`), over
    the shifted views of the redrawn images if `shifted` (read in a cascade, as
    `views.cascaded`, if `cascade`, else always all of them): one classifier."""
    from export.evaluate import onnx_probabilities

    if shifted and not worker.redraws:
        raise BaselineError(
            f"{worker.label} has shifted views, but its preprocessing ({worker.api}) does not say"
            " which images it redrew"
        )

    def run(files: list[bytes]) -> npt.NDArray[np.int64]:
        batch = worker.prepare(files)
        prepared = [
            Prepared(image, bool(redrawn))
            for image, redrawn in zip(batch.images, batch.redrawn, strict=True)
        ]
        rows, counts = expand(prepared, enabled=shifted)
        read = cascaded if cascade else collapse
        probabilities = read(onnx_probabilities(session, rows), counts)
        labels: npt.NDArray[np.int64] = probabilities.argmax(axis=1).astype(np.int64)[np.newaxis]
        labels[:, batch.refused] = FAILED
        return labels

    return run
