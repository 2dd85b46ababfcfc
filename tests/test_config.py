"""ServerConfig, Limits and address parsing: validated once, on construction."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from mnist_service.config import (
    Limits,
    ServerConfig,
    format_address,
    parse_address,
    shipped_weights,
)
from mnist_service.errors import ConfigError


@pytest.mark.parametrize(
    ("address", "expected"),
    [
        ("[::1]:50051", ("::1", 50051)),
        ("[::]:0", ("::", 0)),
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:1", ("localhost", 1)),
        ("0.0.0.0:65535", ("0.0.0.0", 65535)),
    ],
)
def test_parse_address(address: str, expected: tuple[str, int]) -> None:
    assert parse_address(address) == expected
    assert format_address(*expected) == address


@pytest.mark.parametrize(
    "address",
    [
        "",
        "50051",
        "localhost",
        ":50051",
        "[::1]",
        "::1:50051",
        "[nonsense]:1",
        "host:port",
        "h:70000",
    ],
)
def test_bad_addresses_are_config_errors(address: str) -> None:
    with pytest.raises(ConfigError):
        parse_address(address)


def test_defaults_serve_the_shipped_convnet_on_ipv6_loopback() -> None:
    config = ServerConfig()

    assert config.address == "[::1]:50051"
    assert config.weights_path == shipped_weights("conv")
    assert config.weights_path.is_file()
    assert config.workers >= 1


def test_explicit_weights_win(tmp_path: Path) -> None:
    weights = tmp_path / "mine.onnx"
    assert ServerConfig(model_weights=weights).weights_path == weights


@pytest.mark.parametrize(
    "overrides",
    [
        {"model_architecture": "resnet"},
        {"device": "tpu"},
        {"log_format": "xml"},
        {"log_level": "chatty"},
        {"port": 70000},
        {"workers": 0},
        {"grace_period": -1.0},
    ],
    ids=lambda overrides: next(iter(overrides)),
)
def test_invalid_settings_are_refused(overrides: dict[str, object]) -> None:
    with pytest.raises(ConfigError):
        ServerConfig(**overrides)  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["max_message_bytes", "max_image_pixels", "max_stream_in_flight"])
def test_limits_must_be_positive(field: str) -> None:
    with pytest.raises(ConfigError, match=field):
        Limits(**{field: 0})


def test_config_is_frozen() -> None:
    config = ServerConfig()
    with pytest.raises(AttributeError):
        config.port = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    "limits",
    [
        {"max_message_seconds": 0.0},
        {"max_message_bytes": 1000, "max_connection_bytes": 999},
    ],
    ids=["no-time-for-a-body", "connection-budget-below-one-message"],
)
def test_message_limits_must_be_coherent(limits: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Limits(**limits)  # type: ignore[arg-type]


def test_the_connection_budget_defaults_to_four_messages() -> None:
    assert Limits(max_message_bytes=1000).connection_bytes == 4000
    assert Limits(max_message_bytes=1000, max_connection_bytes=1500).connection_bytes == 1500


def test_to_dict_is_json_with_paths_as_strings_and_derived_values(tmp_path: Path) -> None:
    weights = tmp_path / "mine.onnx"
    config = ServerConfig(host="0.0.0.0", port=0, model_weights=weights, limits=Limits())

    values = json.loads(json.dumps(config.to_dict()))

    assert values["model_weights"] == values["weights_path"] == str(weights)
    assert values["address"] == "0.0.0.0:0"
    assert values["limits"]["connection_bytes"] == config.limits.connection_bytes
    assert values["tls"] is False
    assert {f.name for f in dataclasses.fields(ServerConfig)} <= set(values)
