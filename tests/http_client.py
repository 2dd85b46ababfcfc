"""A small HTTP/1.1 client for the tests (urllib, no extra dependency), and the HTTP port of a
`ServerProcess` (from its serving line)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import Any

from .conftest import ServerProcess


def http_port(server: ServerProcess) -> int:
    serving = next(e for e in server.logs if str(e.get("message", "")).startswith("serving"))
    return int(serving["http_port"])


def base_url(server: ServerProcess) -> str:
    serving = next(e for e in server.logs if str(e.get("message", "")).startswith("serving"))
    return f"http://{serving['http_address']}"


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


def request(
    url: str,
    data: bytes | None = None,
    *,
    method: str | None = None,
    headers: dict[str, str] | None = None,
    timeout: float = 30,
) -> Answer:
    """One request; any status (4xx and 5xx too) comes back as an `Answer`."""
    req = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as response:
            return Answer(
                response.status, {k.lower(): v for k, v in response.headers.items()},
                response.read(),
            )  # fmt: skip
    except urllib.error.HTTPError as error:
        with error:
            return Answer(
                error.code, {k.lower(): v for k, v in error.headers.items()}, error.read()
            )


def post_json(url: str, document: object, **kwargs: Any) -> Answer:
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return request(url, json.dumps(document).encode(), headers=headers, **kwargs)
