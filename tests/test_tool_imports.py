"""The tools stay beside the product: who may import whom, read from the source (issue 22).

    mnist_service   imports none of training, export, bench; only its CLI reaches loadgen
    training        imports no export (export builds on training, not the reverse)
    training.data   the one MNIST reader, neutral: nothing from training, export or bench
    bench           a package whose modules import each other without sys.path edits

Every import counts, the ones inside functions too, since a lazy import is still an arrow.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ("training", "export", "bench")


def modules(package: str) -> Iterator[Path]:
    """The package's source files, generated code left out."""
    for path in sorted((ROOT / package).rglob("*.py")):
        if not {"_proto", "_gen"} & set(path.relative_to(ROOT).parts):
            yield path


def imported(path: Path) -> set[str]:
    """The absolute names of every module `path` imports, relative imports resolved."""
    package = list(path.relative_to(ROOT).parts[:-1])  # the module's own package
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *([node.module] if node.module else [])])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def touches_sys_path(path: Path) -> bool:
    """Whether the code (not its docstrings) reads or edits `sys.path`."""
    return any(
        isinstance(node, ast.Attribute)
        and node.attr == "path"
        and isinstance(node.value, ast.Name)
        and node.value.id == "sys"
        for node in ast.walk(ast.parse(path.read_text(), str(path)))
    )


def top_levels(names: set[str]) -> set[str]:
    return {name.split(".")[0] for name in names}


def label(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", list(modules("mnist_service")), ids=label)
def test_the_server_package_imports_no_tool(path: Path) -> None:
    assert not top_levels(imported(path)) & set(TOOLS)


@pytest.mark.parametrize("path", list(modules("mnist_service")), ids=label)
def test_only_the_cli_reaches_the_load_generator(path: Path) -> None:
    parts = path.relative_to(ROOT).parts
    if parts[1] in ("cli.py", "loadgen"):
        return
    assert not any(name.startswith("mnist_service.loadgen") for name in imported(path))


@pytest.mark.parametrize("path", list(modules("training")), ids=label)
def test_training_never_imports_export(path: Path) -> None:
    assert not top_levels(imported(path)) & {"export", "bench"}


def test_the_mnist_reader_is_neutral_ground() -> None:
    names = imported(ROOT / "training" / "data.py")

    assert not top_levels(names) & set(TOOLS)
    assert {name for name in names if name.startswith("mnist_service")} <= {
        "mnist_service.constants",
        "mnist_service.constants.IMAGE_SIZE",
        "mnist_service.constants.NUM_CLASSES",
    }


@pytest.mark.parametrize("path", list(modules("bench")), ids=label)
def test_bench_modules_import_each_other_as_a_package(path: Path) -> None:
    assert not touches_sys_path(path)
    siblings = {sibling.stem for sibling in modules("bench")} - {"__init__"}
    assert not top_levels(imported(path)) & siblings  # `import stubs` would need sys.path
