"""The draw-a-digit page: static files shipped inside the package, served from memory.

The files (a few KB of plain HTML, CSS and JS: no build step, no CDN) are read once, by name,
from the package; a request names one of them or gets a 404, so no path ever reaches the file
system (path traversal has nothing to traverse).
"""

from __future__ import annotations

import importlib.resources
from functools import cache
from typing import Final

from aiohttp import web
from grpclib.const import Status

from .errors import HttpError

CONTENT_TYPES: Final = {
    ".html": "text/html",
    ".css": "text/css",
    ".js": "text/javascript",
    ".svg": "image/svg+xml",
}
HEADERS: Final = {
    "Cache-Control": "no-cache",
    "X-Content-Type-Options": "nosniff",
    "Content-Security-Policy": (
        "default-src 'self'; img-src 'self' data: blob:; style-src 'self'; "
        "script-src 'self'; connect-src 'self'; frame-ancestors 'none'"
    ),
}


@cache
def files() -> dict[str, tuple[bytes, str]]:
    """The page's files by name: their bytes and content type."""
    found: dict[str, tuple[bytes, str]] = {}
    for entry in importlib.resources.files(__package__).joinpath("static").iterdir():
        suffix = "." + entry.name.rpartition(".")[2]
        if entry.is_file() and suffix in CONTENT_TYPES:
            found[entry.name] = (entry.read_bytes(), CONTENT_TYPES[suffix])
    return found


def page_routes() -> list[web.RouteDef]:
    """`GET /` (the page) and `GET /static/{name}` (its files)."""
    files()  # read now, at startup, not on the first request
    return [web.get("/", index), web.get("/static/{name}", static)]


async def index(request: web.Request) -> web.Response:
    return _file("index.html")


async def static(request: web.Request) -> web.Response:
    return _file(request.match_info["name"])


def _file(name: str) -> web.Response:
    found = files().get(name)
    if found is None:
        raise HttpError(Status.NOT_FOUND, 404, f"no such file: {name[:100]!r}")
    body, content_type = found
    return web.Response(body=body, content_type=content_type, headers=HEADERS)
