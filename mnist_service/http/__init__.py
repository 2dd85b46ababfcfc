"""HTTP/1.1 beside gRPC: the JSON API, the Open Inference Protocol's REST API and the page.

The same engine gRPC calls (each model's pipeline and batcher), reached through aiohttp in the
same event loop. `server` listens and drains, `runner` is the one HTTP call runner (the call
record, deadlines, errors, headers), `api` and `oip` map requests to domain calls, `errors`
maps domain errors to HTTP statuses through the one error map. Nothing here imports the gRPC
transport, and the engine imports nothing from here.
"""

from .server import HttpServer

__all__ = ["HttpServer"]
