"""Another commit's preprocessing, in a process of its own (started by `export.baseline`).

Run as ``python -P _baseline_worker.py TREE MAX_PIXELS`` with PYTHONPATH=TREE, a commit's files
(`git archive`). It imports that commit's `mnist_service`, never this checkout's, and nothing
of `export`. It speaks pickle over stdin and stdout: first it writes a greeting,
``{"api": what it calls, "redraws": whether that says which images it redrew}`` or
``{"error": why it cannot run}``; then, for each list of image files (bytes) it reads, it
writes ``{"images": float32 [N, 1, 28, 28], "redrawn": bool [N], "refused": bool [N]}``,
until stdin closes. A refused image (the commit's `InvalidImageError`) is all zeros.

The commit's API is found by falling back, newest first:

1. ``mnist_service.engine.preprocess.open_image`` + ``prepare`` (gives ``Prepared(image,
   redrawn)``: the shifted views need to know which images were redrawn);
2. ``mnist_service.engine.preprocess.preprocess(data, *, max_pixels)``;
3. ``mnist_service.preprocess.preprocess(data, *, max_pixels)`` (2f6b905 and before).
"""

from __future__ import annotations

import importlib
import pickle
import sys
import traceback
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, BinaryIO, NamedTuple

import numpy as np
import numpy.typing as npt

IMAGE_SHAPE = (1, 28, 28)
"""One model input, as every version of the preprocessing has returned it."""

Image = npt.NDArray[np.float32]


class UnsupportedError(Exception):
    """The commit's `mnist_service` has none of the APIs this worker knows."""


class Api(NamedTuple):
    """How to call one commit's preprocessing."""

    name: str
    prepare: Callable[[bytes], tuple[Image, bool]]
    """A file's bytes -> model input [1, 28, 28] and whether it was redrawn."""
    redraws: bool
    """Whether `prepare` knows which images were redrawn (else it says False for all)."""
    refusal: type[Exception]


def _module(name: str) -> ModuleType | None:
    """The module, or None where it (or a package above it) does not exist at the commit."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as error:
        parts = name.split(".")
        if error.name in {".".join(parts[:i]) for i in range(1, len(parts) + 1)}:
            return None
        raise  # the module exists but imports something missing: a real failure


def find_api(tree: Path, max_pixels: int) -> Api:
    """The commit's preprocessing, newest API first; `UnsupportedError` when it has none."""
    engine = _module("mnist_service.engine.preprocess")
    found: tuple[str, Callable[[bytes], tuple[Image, bool]], bool] | None = None
    if engine is not None and hasattr(engine, "open_image") and hasattr(engine, "prepare"):
        open_image: Any = engine.open_image
        prepare: Any = engine.prepare

        def prepared(data: bytes) -> tuple[Image, bool]:
            result = prepare(open_image(data, max_pixels))
            return np.asarray(result.image, np.float32), bool(result.redrawn)

        found = ("mnist_service.engine.preprocess.open_image + prepare", prepared, True)
    else:
        for name in ("mnist_service.engine.preprocess", "mnist_service.preprocess"):
            module = engine if name == "mnist_service.engine.preprocess" else _module(name)
            if module is not None and hasattr(module, "preprocess"):
                found = (f"{name}.preprocess", _single(module.preprocess, max_pixels), False)
                break
    if found is None:
        raise UnsupportedError(
            "its mnist_service has none of mnist_service.engine.preprocess.open_image + prepare,"
            " mnist_service.engine.preprocess.preprocess, mnist_service.preprocess.preprocess"
        )
    package = Path(importlib.import_module("mnist_service").__file__ or "").resolve()
    if not package.is_relative_to(tree):
        raise UnsupportedError(f"mnist_service was imported from {package}, not from {tree}")
    errors = _module("mnist_service.errors")
    refusal = getattr(errors, "InvalidImageError", None)
    if not (isinstance(refusal, type) and issubclass(refusal, Exception)):
        raise UnsupportedError(
            "it has no mnist_service.errors.InvalidImageError: a refused image could not be"
            " told from a failure"
        )
    return Api(found[0], found[1], found[2], refusal)


def _single(preprocess: Any, max_pixels: int) -> Callable[[bytes], tuple[Image, bool]]:
    def prepared(data: bytes) -> tuple[Image, bool]:
        return np.asarray(preprocess(data, max_pixels=max_pixels), np.float32), False

    return prepared


def prepare_all(api: Api, files: list[bytes]) -> dict[str, npt.NDArray[Any]]:
    """The reply to one request: every file's model input, and which were redrawn or refused."""
    images = np.zeros((len(files), *IMAGE_SHAPE), np.float32)
    redrawn = np.zeros(len(files), bool)
    refused = np.zeros(len(files), bool)
    for index, data in enumerate(files):
        try:
            image, redrawn[index] = api.prepare(data)
        except api.refusal:
            refused[index] = True
            continue
        if image.shape != IMAGE_SHAPE:
            raise RuntimeError(
                f"{api.name} gave an array of shape {image.shape}, not {IMAGE_SHAPE}"
            )
        images[index] = image
    return {"images": images, "redrawn": redrawn, "refused": refused}


def _send(stream: BinaryIO, message: object) -> None:
    pickle.dump(message, stream, protocol=pickle.HIGHEST_PROTOCOL)
    stream.flush()


def main(argv: list[str]) -> int:
    """Greet, then answer requests until stdin closes."""
    tree, max_pixels = Path(argv[1]).resolve(), int(argv[2])
    replies, requests = sys.stdout.buffer, sys.stdin.buffer
    sys.stdout = sys.stderr  # whatever the commit's code prints must not mix with the replies
    try:
        api = find_api(tree, max_pixels)
    except UnsupportedError as error:
        _send(replies, {"error": str(error)})
        return 1
    except Exception as error:  # the commit's code failed to import: say so, with its traceback
        traceback.print_exc()
        _send(replies, {"error": f"importing its preprocessing failed: {error!r}"})
        return 1
    _send(replies, {"api": api.name, "redraws": api.redraws})
    while True:
        try:
            files = pickle.load(requests)
        except EOFError:
            return 0
        _send(replies, prepare_all(api, files))


if __name__ == "__main__":
    sys.exit(main(sys.argv))
