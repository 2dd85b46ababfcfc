"""The `serve` command's options, derived from the fields of `ServerConfig` and `Limits`.

A field with a `Setting` in its metadata is one option; `ADDRESS_SETTINGS` join host and port
fields into `HOST:PORT` options. Name, type, default, help and panel come from config.py, and
so does validation: types are checked by the parser, everything else by `ServerConfig`.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any, Literal, TypeVar

import typer

from .config import (
    ADDRESS_SETTINGS,
    GROUPS,
    SETTING,
    AddressSetting,
    Group,
    Limits,
    ServerConfig,
    Setting,
    format_address,
    parse_address,
)

ENV_PREFIX = "MNIST_"
OFF = ("", "off")
"""Values of an address option that turn its listener off (an empty environment variable
counts as unset, hence `off`)."""

F = TypeVar("F", bound=Callable[..., Any])


@dataclass(frozen=True, kw_only=True, slots=True)
class ServeOption:
    """One `serve` option: what typer needs to show and parse it, and where its value goes."""

    flag: str
    """Without dashes: `max-batch-delay`."""
    annotation: Any
    default: object
    help: str
    group: Group
    shown_default: str | None
    metavar: str | None = None
    owner: type[ServerConfig] | type[Limits] = ServerConfig
    """The class whose field(s) it sets."""
    fields: tuple[str, ...]
    """One field, or the host and port fields of an address."""
    listed: bool = False
    """A tuple field, given as comma-separated values."""
    can_be_off: bool = False
    """An address option whose empty value turns its listener off."""

    @property
    def name(self) -> str:
        """The parameter name typer passes the value under."""
        return self.flag.replace("-", "_")

    @property
    def envvar(self) -> str:
        """The environment variable it also reads: `MNIST_MAX_BATCH_DELAY`."""
        return ENV_PREFIX + self.name.upper()

    @property
    def is_address(self) -> bool:
        """Whether it is a `HOST:PORT` option that sets two fields."""
        return len(self.fields) == 2

    def parameter(self) -> inspect.Parameter:
        """The typer parameter: `Annotated[type, typer.Option(...)] = default`."""
        decls = f"--{self.flag}"
        if self.annotation is bool:
            decls += f"/--no-{self.flag}"
        info = typer.Option(
            decls,
            envvar=self.envvar,
            help=self.help,
            rich_help_panel=self.group,
            show_default=True if self.shown_default is None else self.shown_default,
            metavar=self.metavar,
        )
        return inspect.Parameter(
            self.name,
            inspect.Parameter.KEYWORD_ONLY,
            default=self.default,
            annotation=Annotated[self.annotation, info],
        )


@cache
def serve_options() -> tuple[ServeOption, ...]:
    """Every `serve` option, grouped as in `--help`, in field order within a group."""
    addresses = {a.host: a for a in ADDRESS_SETTINGS}
    found: list[ServeOption] = []
    for owner in (ServerConfig, Limits):
        hints = typing.get_type_hints(owner)
        for f in dataclasses.fields(owner):
            meta = f.metadata.get(SETTING)
            if isinstance(meta, Setting):
                found.append(_field_option(owner, f, hints[f.name], meta))
            elif f.name in addresses:
                found.append(_address_option(addresses[f.name]))
    return tuple(sorted(found, key=lambda option: GROUPS.index(option.group)))


def _field_option(
    owner: type[ServerConfig] | type[Limits],
    f: dataclasses.Field[Any],
    hint: Any,
    meta: Setting,
) -> ServeOption:
    annotation, metavar = hint, None
    choices = _literal_choices(hint)
    listed = typing.get_origin(hint) is tuple
    if listed:  # comma-separated, each value checked by ServerConfig
        item_choices = _literal_choices(typing.get_args(hint)[0])
        annotation = str
        metavar = ",".join(item_choices) if item_choices else "A,B"
    elif choices is not None:
        # A plain string, so that ServerConfig refuses a bad choice like any other bad value.
        annotation, metavar = str, "[" + "|".join(choices) + "]"
    if listed:
        items: tuple[object, ...] = f.default if isinstance(f.default, tuple) else ()
        default: object = ",".join(map(str, items))
    elif f.default is not dataclasses.MISSING:
        default = f.default
    else:  # a computed default: None lets the dataclass compute it
        annotation, default = annotation | None, None
    return ServeOption(
        flag=meta.flag or f.name.replace("_", "-"),
        annotation=annotation,
        default=default,
        help=meta.help,
        group=meta.group,
        shown_default=meta.shown_default,
        metavar=metavar,
        owner=owner,
        fields=(f.name,),
        listed=listed,
    )


def _address_option(address: AddressSetting) -> ServeOption:
    defaults = {f.name: f.default for f in dataclasses.fields(ServerConfig)}
    host, port = defaults[address.host], defaults[address.port]
    default = (
        format_address(host, port) if isinstance(host, str) and isinstance(port, int) else None
    )
    return ServeOption(
        flag=address.flag,
        annotation=str if default is not None else str | None,
        default=default,
        help=address.help,
        group=address.group,
        shown_default=address.shown_default,
        metavar="HOST:PORT",
        fields=(address.host, address.port),
        can_be_off=address.can_be_off,
    )


def _literal_choices(hint: Any) -> tuple[str, ...] | None:
    if typing.get_origin(hint) is Literal:
        return tuple(str(choice) for choice in typing.get_args(hint))
    return None


def build_config(values: Mapping[str, Any]) -> ServerConfig:
    """The validated config from the options' values, keyed by `ServeOption.name`.

    None leaves a field to its dataclass default. Raises ConfigError for invalid settings.
    """
    server: dict[str, Any] = {}
    limits: dict[str, Any] = {}
    for option in serve_options():
        value = values[option.name]
        if value is None:
            continue
        if option.is_address:
            host_field, port_field = option.fields
            if option.can_be_off and str(value).strip().lower() in OFF:
                server[host_field] = None
            else:
                server[host_field], server[port_field] = parse_address(value)
        else:
            (field_name,) = option.fields
            if option.listed:
                value = tuple(item.strip() for item in str(value).split(",") if item.strip())
            (limits if option.owner is Limits else server)[field_name] = value
    return ServerConfig(**server, limits=Limits(**limits))


def with_serve_options(command: F) -> F:
    """Give `command`, which takes `**settings`, a signature typer reads as every option."""
    own = [
        parameter
        for parameter in inspect.signature(command, eval_str=True).parameters.values()
        if parameter.kind is not inspect.Parameter.VAR_KEYWORD
    ]
    generated = [option.parameter() for option in serve_options()]
    command.__signature__ = inspect.Signature([*own, *generated])  # type: ignore[attr-defined]
    return command
