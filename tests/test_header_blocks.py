"""The caching HPACK coders code exactly as hpack does (`mnist_service/transport/header_blocks`).

Property tests run a caching coder and hpack's own in lockstep over random conversations:
header lists drawn from a few names and values (so fields repeat, and get indexed, evicted
and indexed again), never-indexed fields, table size updates and header list limits.
"""

from __future__ import annotations

from typing import Any

import h2.config
import h2.connection
import h2.events
import hpack
import pytest
from hpack import Decoder, Encoder, HeaderTuple, NeverIndexedHeaderTuple
from hpack.exceptions import HPACKError
from hypothesis import given, settings
from hypothesis import strategies as st

from mnist_service.transport.header_blocks import (
    CACHED_BYTES,
    CACHED_MAX,
    CachingDecoder,
    CachingEncoder,
    cache_header_blocks,
)

NAMES = [b":status", b"content-type", b"grpc-status", b"grpc-message", b"x-a", b"x-long" * 20]
VALUES = [b"0", b"200", b"application/grpc", b"gzip", b"v" * 300, b"\xff\x00 odd", b""]

field = st.tuples(st.sampled_from(NAMES), st.sampled_from(VALUES) | st.binary(max_size=40))
header = st.one_of(
    field,
    field.map(lambda f: NeverIndexedHeaderTuple(*f)),
    field.map(lambda f: HeaderTuple(*f)),
    field.map(lambda f: (f[0], f[1], True)),
)
step = st.one_of(
    st.lists(header, max_size=8).map(lambda h: ("block", h)),
    st.sampled_from([0, 64, 256, 4096]).map(lambda size: ("resize", size)),
)


def plain(headers: list[Any]) -> list[tuple[bytes, bytes]]:
    return [(bytes(h[0]), bytes(h[1])) for h in headers]


def table(coder: Encoder | Decoder) -> list[tuple[bytes, bytes]]:
    return list(coder.header_table.dynamic_entries)


def outcome(decoder: Decoder, block: bytes) -> Any:
    """The headers a block decodes to, as plain pairs, or the type of hpack's refusal."""
    try:
        return plain(list(decoder.decode(block, raw=True)))
    except HPACKError as error:
        return type(error)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40))
def test_the_caching_encoder_codes_as_hpack_does(steps: list[tuple[str, Any]]) -> None:
    """Same blocks as hpack's encoder where no field is never-indexed; the same headers
    decoded and the same tables always.

    A size is set only when it changes: hpack forgets the size update it owes the peer when
    the same size is set twice in a row, and its peer's table then differs from its own (the
    caching encoder follows hpack's table there too, but a never-indexed field is then a
    literal that decodes where hpack's index into that table fails)."""
    ours, theirs = CachingEncoder(), Encoder()
    our_reader, their_reader = Decoder(), Decoder()
    for kind, value in steps:
        if kind == "resize":
            if value != theirs.header_table_size:  # the same size again: see the docstring
                ours.header_table_size = theirs.header_table_size = value
            continue
        our_block, their_block = ours.encode(value), theirs.encode(value)
        if not any(isinstance(h, NeverIndexedHeaderTuple) or len(h) > 2 for h in value):
            assert our_block == their_block
        assert table(ours) == table(theirs)
        # What a peer reads: the headers, or (after that quirk) the same refusal.
        assert outcome(our_reader, our_block) == outcome(their_reader, their_block)
        assert table(our_reader) == table(their_reader)


@settings(max_examples=300, deadline=None)
@given(st.lists(step, max_size=40), st.sampled_from([100, 1000, 65536]))
def test_the_caching_decoder_decodes_as_hpack_does(
    steps: list[tuple[str, Any]], limit: int
) -> None:
    """The same headers, or the same refusal, block by block; blocks repeat often."""
    writer = Encoder()
    ours, theirs = CachingDecoder(max_header_list_size=limit), Decoder(max_header_list_size=limit)
    blocks: list[bytes] = []
    for kind, value in steps:
        if kind == "resize":
            writer.header_table_size = value
            continue
        blocks.append(writer.encode(value))
        blocks.append(blocks[-1])  # the same block again: decoded from the cache if it can be
    for block in blocks:
        try:
            expected: Any = list(theirs.decode(block, raw=True))
        except HPACKError as error:
            expected = type(error)
        try:
            got: Any = list(ours.decode(block, raw=True))
        except HPACKError as error:
            got = type(error)
        assert got == expected
        if isinstance(got, list):
            assert [type(h) for h in got] == [type(h) for h in expected]
        assert table(ours) == table(theirs)


def test_a_repeated_block_is_decoded_from_the_cache_until_the_table_changes() -> None:
    writer, reader = Encoder(), CachingDecoder()
    request = [(b":method", b"POST"), (b":path", b"/mnist.Mnist/Predict"), (b"te", b"trailers")]
    reader.decode(writer.encode(request), raw=True)  # first: the fields join the table
    again = writer.encode(request)
    first = reader.decode(again, raw=True)
    second = reader.decode(again, raw=True)
    assert first == second == [HeaderTuple(*h) for h in request]
    assert first is not second  # a fresh list each time: h2 may keep or change it
    assert len(reader._known) == 1  # the cache itself, checked here only
    reader.decode(writer.encode([(b"x-new", b"field")]), raw=True)  # an insertion
    assert reader._known == {}


def test_a_never_indexed_field_is_a_literal_that_leaves_the_tables_alone() -> None:
    encoder, decoder = CachingEncoder(), Decoder()
    field = NeverIndexedHeaderTuple(b"x-request-id", b"0123456789abcdef0123456789abcdef")
    block = encoder.encode([field])
    assert block == b"\x10\x0cx-request-id\x200123456789abcdef0123456789abcdef"
    (decoded,) = decoder.decode(block, raw=True)
    assert decoded == field
    assert isinstance(decoded, NeverIndexedHeaderTuple)  # a proxy must not index it either
    assert table(encoder) == table(decoder) == []


def test_hpack_has_what_the_caching_coders_use() -> None:
    """hpack is pinned exactly; these are the names of it `header_blocks` relies on."""
    assert hpack.__version__ == "4.2.0"
    encoder = Encoder()
    encoder.add((b"a", b"b"), False, True)  # a literal, indexed: it joins the table
    assert encoder.add((b"a", b"b"), False, True) == b"\xbe"  # entry 62: the newest one
    assert list(encoder.header_table.dynamic_entries) == [(b"a", b"b")]
    assert encoder.header_table.maxsize == 4096
    encoder.header_table_size = 100
    assert encoder.header_table.resized
    decoder = Decoder()
    assert decoder.header_table.dynamic_entries is not None
    assert decoder.max_allowed_table_size == 4096
    assert decoder.max_header_list_size > 0


def test_a_server_connection_gets_the_caching_coders_with_its_limits() -> None:
    connection = h2.connection.H2Connection(h2.config.H2Configuration(client_side=False))
    connection.decoder.max_header_list_size = 12345
    connection.initiate_connection()
    cache_header_blocks(connection)
    assert isinstance(connection.encoder, CachingEncoder)
    assert isinstance(connection.decoder, CachingDecoder)
    assert connection.decoder.max_header_list_size == 12345

    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    connection.receive_data(client.data_to_send())
    client.receive_data(connection.data_to_send())
    for stream_id in (1, 3, 5):
        client.send_headers(
            stream_id,
            [(":method", "POST"), (":scheme", "http"), (":path", "/x"), (":authority", "a")],
            end_stream=True,
        )
        (received,) = [
            event
            for event in connection.receive_data(client.data_to_send())
            if isinstance(event, h2.events.RequestReceived)
        ]
        assert dict(received.headers)[b":path"] == b"/x"
        connection.send_headers(
            stream_id,
            [(":status", "200"), NeverIndexedHeaderTuple("x-request-id", f"id-{stream_id}")],
            end_stream=True,
        )
        (response,) = [
            event
            for event in client.receive_data(connection.data_to_send())
            if isinstance(event, h2.events.ResponseReceived)
        ]
        assert (b"x-request-id", f"id-{stream_id}".encode()) in response.headers


@pytest.mark.parametrize("size", [0, 1, 126, 127, 128, 300, 16384])
def test_long_literals_are_coded_with_hpack_integers(size: int) -> None:
    value = b"x" * size
    block = CachingEncoder().encode([NeverIndexedHeaderTuple(b"n", value)])
    assert Decoder().decode(block, raw=True) == [NeverIndexedHeaderTuple(b"n", value)]


def test_what_a_peer_sends_cannot_grow_the_cache_past_its_bounds() -> None:
    """Blocks that leave the table alone are kept up to CACHED_MAX of CACHED_BYTES each: a
    peer sending many, or big ones, costs a connection a few tens of KiB at most."""
    writer, reader = Encoder(), CachingDecoder()
    for index in range(3 * CACHED_MAX):  # literals never indexed: the table stays empty
        field = NeverIndexedHeaderTuple(b"x-%d" % index, b"v")
        reader.decode(writer.encode([field]), raw=True)
    assert len(reader._known) == CACHED_MAX
    big = writer.encode([NeverIndexedHeaderTuple(b"x-big", b"v" * 2 * CACHED_BYTES)])
    reader.forget()
    assert reader.decode(big, raw=True) == reader.decode(big, raw=True)
    assert reader._known == {}
