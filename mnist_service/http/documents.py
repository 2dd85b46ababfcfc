"""JSON documents in and out of the HTTP listener: the one place that parses and writes them.

orjson, not the standard library: an OIP request of one 28x28 FP32 tensor as JSON (5.7 KB,
784 numbers) took `json.loads` about 175 us to parse on one core (AMD EPYC), more than the
rest of the request, and orjson about a tenth of that (`python -m bench.http_rows`,
docs/http.md). orjson is also stricter, as HTTP clients deserve: the body must be UTF-8
RFC 8259 JSON, so ``NaN`` and ``Infinity`` are refused (the standard library took them, and
wrote ``NaN`` back, which no JSON parser reads), nesting deeper than 1,024 is refused, and
an integer beyond 64 bits is read as a float. It writes compact JSON, floats in their
shortest round-trip form (as `repr` does), and NaN as null.
"""

from __future__ import annotations

from typing import Any

import orjson

__all__ = ["DecodeError", "dumps", "loads"]

DecodeError = orjson.JSONDecodeError
"""What `loads` raises for a body that is not JSON (a `json.JSONDecodeError`: its `msg`
says why)."""


def loads(data: bytes | memoryview) -> Any:
    """Parse a JSON document."""
    return orjson.loads(data)


def dumps(document: object) -> bytes:
    """Write a JSON document (str keys; str, int, float, bool, None, list and dict values)."""
    return orjson.dumps(document)
