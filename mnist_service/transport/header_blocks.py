"""HPACK without re-coding what repeats: the header coders of each server connection.

Every call on a connection sends the same response headers and trailers (`:status 200`, the
content-type, `grpc-accept-encoding`; `grpc-status: 0`) and, from one client, receives the
same request headers. Once those are in HPACK's dynamic tables they code to the same few
index bytes every time, yet hpack (pure Python) works each block out anew: about 12 us to
decode a request's block and 16 us to encode an answer's two, of a call's 300 (measured with
`python -m bench.call_path`).

`CachingDecoder` keeps each whole block it decoded without changing its dynamic table, and
answers that block again from the cache while the table stays as it was. `CachingEncoder`
does the same per header field. Whatever changes a table (an insertion, an eviction, a size
update) empties its cache, and the limits hpack checks (`max_header_list_size`, the allowed
table size) are part of the decoder's key, so what comes out is what hpack would give.

One thing differs on the wire: a field sent never indexed (`NeverIndexedHeaderTuple`, as the
per-call `x-request-id` is) is coded as a literal with a literal name and without Huffman
coding. That is valid HPACK whatever the tables hold, costs a few bytes more, and saves the
pure-Python Huffman coding of a value that never repeats.

`cache_header_blocks` puts the two on a new h2 connection; they rely on hpack's
`Encoder.add`, `.header_table`, `HeaderTable.dynamic_entries`, `.maxsize` and `.resized`
(hpack is pinned exactly; tests/test_header_blocks.py checks them).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, Final, TypeVar

from hpack import Decoder, Encoder, HeaderTuple

if TYPE_CHECKING:
    from h2.connection import H2Connection

__all__ = ["CachingDecoder", "CachingEncoder", "cache_header_blocks"]

CACHED_MAX: Final = 64
"""Entries a cache holds at most: a peer can send many distinct blocks that leave the table
alone, and a connection needs a few (one client's request headers, our answers' fields)."""

CACHED_BYTES: Final = 1024
"""Only blocks (and fields) up to this size are kept: a call's headers, indexed, are a few
dozen bytes, and a peer's big blocks must not make a connection hold more than 64 KiB here."""

_NEVER_INDEXED: Final = 0x10
"""The first byte of a literal field never indexed, with a literal name (RFC 7541, 6.2.3)."""

_TableState = tuple[int, object, int]


def _state(coder: Any) -> _TableState:
    """What identifies the dynamic table's contents: its length, its newest entry (an
    insertion puts a new tuple there), and its size limit."""
    table = coder.header_table
    entries = table.dynamic_entries
    return len(entries), entries[0] if entries else None, table.maxsize


def _integer(value: int, prefix_bits: int) -> bytes:
    """An HPACK integer with an N-bit prefix (RFC 7541, 5.1), the prefix's other bits 0."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((value,))
    out = bytearray((limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _literal(data: bytes) -> bytes:
    """An HPACK string literal without Huffman coding (RFC 7541, 5.2)."""
    return _integer(len(data), 7) + data


def _as_bytes(value: Any) -> bytes:
    if type(value) is bytes:
        return value
    return (value if isinstance(value, str) else str(value)).encode("utf-8")


_Coder = TypeVar("_Coder", bound="_Cache")


class _Cache:
    """What the two caching coders share: the cache, and the table state it was made at."""

    header_table: Any
    _known: dict[Any, Any]
    _known_at: _TableState

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.forget()

    @classmethod
    def adopt(cls: type[_Coder], coder: Any) -> _Coder:
        """Make hpack's `coder` (its table and limits as they are) a caching one."""
        coder.__class__ = cls
        adopted: _Coder = coder
        adopted.forget()
        return adopted

    def forget(self) -> None:
        """Empty the cache: what it will hold is coded with the table as it is now."""
        self._known = {}
        self._known_at = _state(self)

    def changed(self) -> bool:
        """Whether the table differs from the one the cache was made with."""
        length, newest, size = _state(self)
        then = self._known_at
        return length != then[0] or newest is not then[1] or size != then[2]


class CachingEncoder(_Cache, Encoder):
    """hpack's `Encoder`, with each field's bytes kept while its coding changes no table."""

    def encode(self, headers: Any, huffman: bool = True) -> bytes:
        """hpack's `Encoder.encode`: the header block of `headers`."""
        if self.header_table.resized or isinstance(headers, dict):
            encoded = super().encode(headers, huffman)  # a size update to announce first, or
            self.forget()  # hpack's ordering of a dict
            return encoded
        if self.changed():
            self.forget()  # resized without a size update to announce
        known = self._known
        parts = []
        for header in headers:
            if isinstance(header, HeaderTuple):
                sensitive = not header.indexable
            else:
                sensitive = len(header) > 2 and bool(header[2])
            name, value = _as_bytes(header[0]), _as_bytes(header[1])
            if sensitive:
                parts.append(bytes((_NEVER_INDEXED,)) + _literal(name) + _literal(value))
                continue
            key = (name, value, huffman)
            field = known.get(key)
            if field is None:
                field = self.add((name, value), False, huffman)
                if self.changed():
                    self.forget()  # every field kept may now index another entry
                    known = self._known
                elif len(known) < CACHED_MAX and len(field) <= CACHED_BYTES:
                    known[key] = field
            parts.append(field)
        return b"".join(parts)


class CachingDecoder(_Cache, Decoder):
    """hpack's `Decoder`, with each block's headers kept while decoding changes no table."""

    def decode(self, data: bytes, raw: bool = False) -> Iterable[HeaderTuple]:
        """hpack's `Decoder.decode`: the headers of one header block."""
        if self.changed():
            self.forget()  # resized from outside
        block = data if type(data) is bytes else bytes(data)
        key = (block, raw, self.max_header_list_size, self.max_allowed_table_size)
        known = self._known.get(key)
        if known is not None:
            return list(known)
        headers = list(super().decode(block, raw))
        if self.changed():
            self.forget()
        elif len(self._known) < CACHED_MAX and len(block) <= CACHED_BYTES:
            self._known[key] = tuple(headers)
        return headers


def cache_header_blocks(connection: H2Connection) -> None:
    """Make an h2 connection's header coders caching ones, their tables and limits as they
    are (`H2Connection.encoder`, `.decoder`)."""
    CachingEncoder.adopt(connection.encoder)
    CachingDecoder.adopt(connection.decoder)
