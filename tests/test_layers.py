"""The package's layers hold: each imports only what is below it (docs/architecture.md).

Read from the source (the `import` statements of every module), so a violation fails here
however the modules happen to be loaded. The rules:

- `engine` (numpy, Pillow, onnxruntime) imports no gRPC or HTTP/2 library and nothing of
  `transport`, `api`, `runtime` or the CLI;
- `api` (the services) imports nothing of `transport`, `runtime` or the CLI;
- `transport` imports nothing of `api`, `runtime` or the CLI;
- `http` (the HTTP API) imports nothing of `transport` (gRPC), `api`, `runtime` or the CLI,
  and `engine` imports nothing of it;
- no module of the package imports `training`, `export` or `bench`;
- only `mnist_service._compat` reaches into another object's private names (an attribute
  starting with `_` on anything but `self` or `cls`), and only `_compat` reads asyncio's.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "mnist_service"
GRPC_LIBRARIES = ("grpclib", "grpc", "h2", "hpack", "hyperframe", "betterproto2")
TOOLS = ("training", "export", "bench")


def modules(layer: str = "") -> list[Path]:
    """The package's own modules (generated code aside), or those of one subpackage."""
    base = PACKAGE / layer if layer else PACKAGE
    return sorted(p for p in base.rglob("*.py") if "_proto" not in p.relative_to(PACKAGE).parts)


def imported(path: Path) -> set[str]:
    """The absolute names of the modules `path` imports (relative imports resolved)."""
    package = ["mnist_service", *path.relative_to(PACKAGE).parent.parts]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[: len(package) - node.level + 1]
                module = ".".join([*base, node.module] if node.module else base)
                names.add(module)
                if node.module is None:  # from .. import x: x may be a module
                    names.update(f"{module}.{alias.name}" for alias in node.names)
            else:
                assert node.module is not None
                names.add(node.module)
    return names


def violations(layer: str, forbidden: tuple[str, ...]) -> list[str]:
    found = []
    for path in modules(layer):
        for name in imported(path):
            if any(name == f or name.startswith(f + ".") for f in forbidden):
                found.append(f"{path.relative_to(PACKAGE.parent)} imports {name}")
    return found


UPPER = ("mnist_service.transport", "mnist_service.api", "mnist_service.http",
         "mnist_service.runtime", "mnist_service.cli")  # fmt: skip


@pytest.mark.parametrize(
    ("layer", "forbidden"),
    [
        ("engine", (*GRPC_LIBRARIES, *UPPER)),
        ("api", ("mnist_service.transport", "mnist_service.runtime", "mnist_service.cli")),
        ("transport", ("mnist_service.api", "mnist_service.runtime", "mnist_service.cli")),
        (
            "http",
            (
                "mnist_service.transport",
                "mnist_service.api",
                "mnist_service.runtime",
                "mnist_service.cli",
            ),
        ),
        ("", TOOLS),
    ],
    ids=["engine", "api", "transport", "http", "package"],
)
def test_each_layer_imports_only_what_is_below_it(layer: str, forbidden: tuple[str, ...]) -> None:
    assert violations(layer, forbidden) == []


def test_the_checks_see_a_violation() -> None:
    """The import reader resolves relative imports: a transport module importing the api
    would be caught."""
    names = imported(PACKAGE / "transport" / "server.py")
    assert "mnist_service.transport.runner" in names
    assert "mnist_service.calls" in names
    assert "mnist_service._compat" in names or "mnist_service" in names


def test_only_compat_touches_private_names_of_other_objects() -> None:
    found = []
    for path in modules():
        if path.name == "_compat.py":
            continue
        source = path.read_text()
        for node in ast.walk(ast.parse(source)):
            if not isinstance(node, ast.Attribute) or not node.attr.startswith("_"):
                continue
            if node.attr.startswith("__") and node.attr.endswith("__"):
                continue  # dunders are protocols, not private names
            if isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"):
                continue
            found.append(f"{path.relative_to(PACKAGE.parent)}:{node.lineno} .{node.attr}")
        if '"_ready"' in source:
            found.append(f"{path.relative_to(PACKAGE.parent)} reads asyncio's _ready")
    assert found == []
