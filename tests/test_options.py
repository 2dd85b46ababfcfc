"""`serve`'s options are ServerConfig's fields: one source for defaults, help and validation.

Checked against the real command line: every field is an option (or half of a HOST:PORT one)
with the field's default and an environment variable that works, `--help` groups them,
`--print-config` shows what they resolve to, and the README's table says the same.
"""

from __future__ import annotations

import dataclasses
import json
import re
import socket
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from mnist_service.cli import app
from mnist_service.config import (
    ADDRESS_SETTINGS,
    GROUPS,
    SETTING,
    Limits,
    ServerConfig,
    Setting,
    format_address,
)

from . import cli_contract
from .conftest import ROOT

runner = CliRunner()
ACTIONS = {"print_config", "help"}
"""`serve` parameters that do something rather than set something."""


def serve_options() -> dict[str, Any]:
    """The real `serve` command's settings options, keyed by their long flag."""
    return {
        param.opts[0]: param
        for param in cli_contract.command("serve").params
        if param.name not in ACTIONS
    }


def flag_of(name: str, meta: Setting) -> str:
    return "--" + (meta.flag or name.replace("_", "-"))


def expected_default(f: dataclasses.Field[Any]) -> object:
    """The option's default: the field's (comma-joined for a tuple), or None where the
    dataclass computes it."""
    if isinstance(f.default, tuple):
        return ",".join(f.default)
    return None if f.default is dataclasses.MISSING else f.default


def print_config(*args: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    result = runner.invoke(app, ["serve", "--print-config", *args], env=env)
    assert result.exit_code == 0, result.output
    config: dict[str, Any] = json.loads(result.stdout)
    return config


def lookup(config: dict[str, Any], path: str) -> object:
    """`limits.max_queue` → config["limits"]["max_queue"]."""
    value: Any = config
    for key in path.split("."):
        value = value[key]
    return value


# -- derived from the dataclasses -------------------------------------------------------------


@pytest.mark.parametrize("owner", [ServerConfig, Limits], ids=lambda owner: owner.__name__)
def test_every_field_is_an_option_with_its_default_help_and_group(
    owner: type[ServerConfig] | type[Limits],
) -> None:
    options = serve_options()
    address_fields = {name for a in ADDRESS_SETTINGS for name in (a.host, a.port)}

    for f in dataclasses.fields(owner):
        meta = f.metadata.get(SETTING)
        if f.name == "limits" or f.name in address_fields:
            assert meta is None, f"{f.name} is set by another option, not its own"
            continue
        assert isinstance(meta, Setting), f"{owner.__name__}.{f.name} is no serve option"
        option = options[flag_of(f.name, meta)]
        assert option.default == expected_default(f), f.name
        assert option.help == meta.help
        assert option.rich_help_panel == meta.group
        assert option.envvar == "MNIST_" + flag_of(f.name, meta)[2:].replace("-", "_").upper()


def test_address_options_default_to_the_configs_host_and_port() -> None:
    options = serve_options()
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}

    for address in ADDRESS_SETTINGS:
        host, port = defaults[address.host], defaults[address.port]
        option = options[f"--{address.flag}"]
        assert option.default == (
            None if host is None else format_address(str(host), int(str(port)))
        )
        assert option.help == address.help
        assert option.rich_help_panel == address.group
    assert options["--address"].default == ServerConfig().address


def test_serve_has_no_option_the_config_does_not_define() -> None:
    fields = {
        flag_of(f.name, f.metadata[SETTING])
        for owner in (ServerConfig, Limits)
        for f in dataclasses.fields(owner)
        if SETTING in f.metadata
    }
    addresses = {f"--{a.flag}" for a in ADDRESS_SETTINGS}

    assert set(serve_options()) == fields | addresses


# -- the environment --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pem_files(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Readable stand-ins: --print-config checks TLS files are readable, not what they hold."""
    folder = tmp_path_factory.mktemp("pem")
    for name in ("cert", "key", "ca"):
        (folder / f"{name}.pem").write_text("placeholder\n")
    return {name: str(folder / f"{name}.pem") for name in ("cert", "key", "ca")}


ENV_CASES: list[tuple[str, str, list[str], dict[str, object]]] = [
    # variable, value, other flags it needs, what --print-config then shows
    ("MNIST_MODEL_ARCHITECTURE", "mlp", [], {"model_architecture": "mlp"}),
    ("MNIST_MODEL_WEIGHTS", "/models/mine.onnx", [], {"weights_path": "/models/mine.onnx"}),
    ("MNIST_MODELS", "mlp, conv", [], {"models": ["mlp", "conv"]}),
    ("MNIST_MODEL_REPOSITORY", "/", [], {"model_repository": "/"}),
    ("MNIST_MODEL_CONTROL", "explicit", [], {"model_control": "explicit"}),
    ("MNIST_SHIFT_VIEWS", "false", [], {"shift_views": False}),
    ("MNIST_DEVICE", "cpu", [], {"device": "cpu"}),
    ("MNIST_ADDRESS", "127.0.0.1:6000", [], {"host": "127.0.0.1", "port": 6000}),
    ("MNIST_HTTP_ADDRESS", "off", [], {"http_host": None, "http_address": None}),
    (
        "MNIST_CORS_ALLOW_ORIGIN",
        "https://a.example,http://localhost:3000",
        [],
        {"cors_allow_origins": ["https://a.example", "http://localhost:3000"]},
    ),
    ("MNIST_WEB_UI", "false", [], {"web_ui": False}),
    ("MNIST_GRACE_PERIOD", "2.5", [], {"grace_period": 2.5}),
    ("MNIST_WORKERS", "3", [], {"workers": 3}),
    ("MNIST_REUSE_PORT", "false", [], {"reuse_port": False}),
    ("MNIST_INTRA_OP_THREADS", "2", [], {"intra_op_threads": 2}),
    ("MNIST_DECODE_THREADS", "3", [], {"decode_threads": 3}),
    ("MNIST_MAX_BATCH_SIZE", "64", [], {"max_batch_size": 64}),
    ("MNIST_MAX_BATCH_DELAY", "500", [], {"max_batch_delay_us": 500}),
    ("MNIST_BUSY_POLL", "0", [], {"busy_poll_us": 0}),
    ("MNIST_MAX_MESSAGE_BYTES", "1048576", [], {"limits.connection_bytes": 4194304}),
    ("MNIST_MAX_CONNECTION_BYTES", "33554432", [], {"limits.connection_bytes": 33554432}),
    ("MNIST_MAX_MESSAGE_SECONDS", "2.5", [], {"limits.max_message_seconds": 2.5}),
    ("MNIST_MAX_IMAGE_PIXELS", "1000000", [], {"limits.max_image_pixels": 1000000}),
    ("MNIST_MAX_STREAM_IN_FLIGHT", "8", [], {"limits.max_stream_in_flight": 8}),
    ("MNIST_MAX_BATCH_IMAGES", "16", [], {"limits.max_batch_images": 16}),
    ("MNIST_MAX_DECODE_BYTES", "1048576", [], {"limits.max_decode_bytes": 1048576}),
    ("MNIST_MAX_CONNECTIONS", "8", [], {"limits.max_connections": 8}),
    ("MNIST_MAX_QUEUE", "4096", [], {"limits.max_queue": 4096}),
    ("MNIST_TLS_CERT", "{cert}", ["--tls-key", "{key}"], {"tls_cert": "{cert}", "tls": True}),
    ("MNIST_TLS_KEY", "{key}", ["--tls-cert", "{cert}"], {"tls_key": "{key}", "tls": True}),
    (
        "MNIST_TLS_CLIENT_CA",
        "{ca}",
        ["--tls-cert", "{cert}", "--tls-key", "{key}"],
        {"tls_client_ca": "{ca}"},
    ),
    ("MNIST_ACCESS_LOG", "0", [], {"access_log": False}),
    ("MNIST_METRICS_ADDRESS", "[::]:9100", [], {"metrics_host": "::", "metrics_port": 9100}),
    ("MNIST_LOG_LEVEL", "debug", [], {"log_level": "debug"}),
    ("MNIST_LOG_FORMAT", "json", [], {"log_format": "json"}),
]


def test_every_option_has_an_environment_case_below() -> None:
    assert {case[0] for case in ENV_CASES} == cli_contract.envvars("serve")


@pytest.mark.parametrize(
    ("variable", "value", "flags", "expected"), ENV_CASES, ids=[case[0] for case in ENV_CASES]
)
def test_each_environment_variable_sets_its_option(
    variable: str,
    value: str,
    flags: list[str],
    expected: dict[str, object],
    pem_files: dict[str, str],
) -> None:
    def fill(item: object) -> object:
        return item.format(**pem_files) if isinstance(item, str) else item

    defaults = print_config()
    configured = print_config(*map(str, map(fill, flags)), env={variable: str(fill(value))})

    for path, wanted in expected.items():
        assert lookup(configured, path) == fill(wanted)
        assert lookup(defaults, path) != fill(wanted), "the case must differ from the default"


def test_flags_win_over_the_environment() -> None:
    config = print_config("--max-queue", "3000", env={"MNIST_MAX_QUEUE": "4096"})

    assert config["limits"]["max_queue"] == 3000


# -- --print-config ---------------------------------------------------------------------------


def test_print_config_is_the_resolved_config_as_json() -> None:
    config = print_config()

    assert config["address"] == "[::1]:50051"
    assert config["workers"] == ServerConfig().workers
    assert config["limits"]["connection_bytes"] == 4 * config["limits"]["max_message_bytes"]
    assert Path(config["weights_path"]).is_file()
    assert config["tls"] is False


def test_print_config_loads_no_model_and_binds_no_port(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = format_address(*taken.getsockname())
        missing = tmp_path / "missing.onnx"

        config = print_config("--address", address, "--model-weights", str(missing))

    assert config["address"] == address
    assert config["weights_path"] == str(missing)


@pytest.mark.parametrize(
    ("args", "env", "fragment"),
    [
        pytest.param(["--device", "tpu"], {}, "device must be one of", id="bad-choice"),
        pytest.param([], {"MNIST_LOG_FORMAT": "xml"}, "log format", id="bad-choice-from-env"),
        pytest.param(["--workers", "0"], {}, "workers must be at least 1", id="out-of-range"),
        pytest.param(["--max-queue", "10"], {}, "max_queue (10)", id="incoherent-limits"),
        pytest.param(["--metrics-address", "9090"], {}, "HOST:PORT", id="bad-address"),
        pytest.param(["--http-address", "8080"], {}, "HOST:PORT", id="bad-http-address"),
        pytest.param(
            ["--cors-allow-origin", "example.com"], {}, "a CORS origin", id="bad-cors-origin"
        ),
        pytest.param(["--tls-cert", "/nonexistent"], {}, "TLS needs both", id="half-tls"),
    ],
)
def test_invalid_settings_fail_in_one_line_with_exit_1(
    args: list[str], env: dict[str, str], fragment: str
) -> None:
    result = runner.invoke(app, ["serve", "--print-config", *args], env=env)

    assert result.exit_code == 1
    assert result.stdout == ""
    (line,) = result.stderr.splitlines()
    assert line.startswith("mnist-service: error: ")
    assert fragment in line


# -- --help and the README --------------------------------------------------------------------


def help_panels() -> dict[str, str]:
    """`serve --help`, split into its panels by title."""
    result = runner.invoke(app, ["serve", "--help"], env={"COLUMNS": "250"})
    assert result.exit_code == 0
    parts = re.split(r"╭─ (\w+) ─+╮", result.stdout)
    return dict(zip(parts[1::2], parts[2::2], strict=True))


def test_help_shows_every_option_in_its_group() -> None:
    panels = help_panels()

    assert list(panels) == ["Options", *GROUPS]
    for flag, option in serve_options().items():
        assert re.search(rf"{flag}\b", panels[option.rich_help_panel]), flag
        assert option.envvar in panels[option.rich_help_panel]
    assert "--print-config" in panels["Options"]


def readme_rows() -> list[tuple[str, str, str]]:
    """(option, env, default) of each row of the README's table of serve options."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Running the server", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [cell.strip() for cell in line.strip().strip("|").split("|")]
        if line.startswith("| `--"):
            rows.append((cells[0], cells[1], cells[2]))
    return rows


def readme_default(option: Any) -> str:
    """How the table writes an option's default: as `--help` says it, values in backticks."""
    if isinstance(option.show_default, str):
        return option.show_default
    if option.default is None:
        return "none"
    if isinstance(option.default, bool):
        return "on" if option.default else "off"
    if isinstance(option.default, float):
        return f"`{option.default:g}`"
    return f"`{option.default}`"


def test_the_readme_lists_every_option_with_its_env_var_and_default_in_help_order() -> None:
    expected = [
        (
            "`" + "/".join((*option.opts, *option.secondary_opts)) + "`",
            f"`{option.envvar}`",
            readme_default(option),
        )
        for option in serve_options().values()
    ]

    assert readme_rows() == expected
