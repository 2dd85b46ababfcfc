"""The CLI as deployment files see it: parse a command line through the real typer app.

The Dockerfile and the Kubernetes manifests carry `mnist_service` command lines and MNIST_*
variables; these helpers run them through the app's own parser (types, choices, unknown flags)
without starting anything, so a renamed or removed option breaks a test, not a rollout.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import typer.main

from mnist_service.cli import app
from mnist_service.options import build_config


def command(name: str) -> Any:
    """The click command behind `python -m mnist_service NAME` (None when there is none)."""
    return typer.main.get_command(app).commands.get(name)  # type: ignore[attr-defined]


def envvars(name: str) -> set[str]:
    """The environment variables the command reads."""
    names: set[str] = set()
    for param in command(name).params:
        envvar = param.envvar
        if isinstance(envvar, str):
            names.add(envvar)
        elif envvar:
            names.update(envvar)
    return names


def parse(argv: list[str], env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Parse `argv` (the words after `python -m mnist_service`) as the CLI would.

    Returns the resolved value of every option of the command, keyed by its long flag
    (`--workers`); environment variables apply as they would in the container, and no other
    MNIST_* variable from the test's own environment leaks in. Raises the parser's UsageError
    for an unknown command, an unknown flag or a value of the wrong type; for `serve`, also
    ConfigError for a setting the server would refuse at startup (a file it names, such as a
    TLS certificate, must then exist here too).
    """
    name, *args = argv
    cmd = command(name)
    if cmd is None:
        raise LookupError(f"no command {name!r}")
    with _environment(env or {}):
        ctx = cmd.make_context(name, list(args))
    if name == "serve":
        build_config(ctx.params)  # validated as at startup, e.g. --device or --log-format
    values: dict[str, Any] = {}
    for param in cmd.params:
        for flag in (*param.opts, *getattr(param, "secondary_opts", ())):
            if flag.startswith("--"):
                values[flag] = ctx.params[param.name]
    return values


@contextmanager
def _environment(env: Mapping[str, str]) -> Iterator[None]:
    saved = dict(os.environ)
    for key in [k for k in os.environ if k.startswith("MNIST_")]:
        del os.environ[key]
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)
