"""Fast protobuf wire encoding of the hot messages; betterproto2 messages stay the API.

betterproto2 0.10 spends ~15-30 µs per small message (a `warnings.catch_warnings()` per field)
and ~4 µs to parse even a one-field message. Here the hot responses (`MnistPrediction`,
`StreamPrediction`, `PredictBatchResponse`) are encoded by hand and the requests
(`MnistImage`, `PredictBatchRequest`, `ModelInfoRequest`) decoded by hand.

Encoding is byte-for-byte `bytes(message)`: fields in declaration order, defaults omitted,
a set oneof member written even when empty (`12 00`), negative int32 as a 10-byte varint,
floats packed with `struct` `<f` (so out-of-range floats raise `OverflowError` as there),
unknown fields appended. Anything off that path (a subclass, a bool or numpy int where an int
belongs, a tuple where a list belongs) returns None and the caller falls back to betterproto2.

Decoding follows protobuf (upb, as google.protobuf 5+ parses), not betterproto2, which is lax:

=====================================  ==========================  ===========================
input                                  betterproto2 `parse`        here (and upb)
=====================================  ==========================  ===========================
length-delimited field past the end    cut short silently          WireFormatError
truncated fixed32/fixed64              cut short silently          WireFormatError
truncated tag at the end               ignored                     WireFormatError
truncated varint / over 10 bytes       EOFError / ValueError       WireFormatError
wire type 6 or 7                       ignored (a known field is   WireFormatError
                                       set to None)
field number 0                         kept as an unknown field    WireFormatError
tag over 5 bytes or over 32 bits       accepted                    WireFormatError
length over 5 bytes                    accepted                    WireFormatError
known field with the wrong wire type   the raw value assigned      skipped as unknown
                                       (data=5) or KeyError
group (wire types 3, 4)                markers kept as unknown,    WireFormatError (upb skips
                                       the contents parsed         a well-formed unknown group)
=====================================  ==========================  ===========================

Groups are refused on purpose: proto3 has none, so no client of this schema sends one.
Unknown fields are skipped, not kept: the server never re-serialises a request.
"""

from __future__ import annotations

import operator
import struct
from collections.abc import Callable, Sequence
from typing import Any, SupportsIndex

import betterproto2
import numpy as np

from .._compat import unknown_fields
from .._proto.mnist import (
    ItemError,
    MnistImage,
    MnistPrediction,
    ModelInfoRequest,
    PredictBatchRequest,
    PredictBatchResponse,
    StreamPrediction,
)

__all__ = ["WireFormatError", "decode_message", "encode_message", "encode_prediction"]


class WireFormatError(ValueError):
    """Raised when bytes are not a well-formed protobuf encoding; the message says where."""


# --- encoding -------------------------------------------------------------------------------

_ONE_BYTE_VARINTS = tuple(bytes([i]) for i in range(128))
_FLOAT_STRUCTS: dict[int, struct.Struct] = {}

# Tags (field number << 3 | wire type) of the fields written here; all fit in one byte.
_TAG_1_VARINT = b"\x08"
_TAG_1_LEN = b"\x0a"
_TAG_2_LEN = b"\x12"
_TAG_3_LEN = b"\x1a"


def _varint(value: int) -> bytes:
    """`betterproto2.encode_varint`, byte for byte: negatives as 64-bit two's complement."""
    if 0 <= value < 128:
        return _ONE_BYTE_VARINTS[value]
    if value < 0:
        if value < -(1 << 63):
            raise ValueError(f"{value} does not fit a 64-bit varint")
        value += 1 << 64
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _floats(values: list[float]) -> bytes:
    # One Struct per length (10 in practice): one C call instead of one pack per float.
    packer = _FLOAT_STRUCTS.get(len(values))
    if packer is None:
        packer = _FLOAT_STRUCTS.setdefault(len(values), struct.Struct(f"<{len(values)}f"))
    return packer.pack(*values)


def _prediction_body(label: int, probabilities: list[float], unknown: bytes = b"") -> bytes:
    head = _TAG_1_VARINT + _varint(label) if label else b""
    if not probabilities:
        return head + unknown
    packed = _floats(probabilities)
    return head + _TAG_2_LEN + _varint(len(packed)) + packed + unknown


def encode_prediction(
    label: SupportsIndex, probabilities: Sequence[float] | np.ndarray[Any, Any]
) -> bytes:
    """`bytes(MnistPrediction(label=label, probabilities=list(probabilities)))`, faster."""
    if isinstance(probabilities, np.ndarray):
        # tolist() gives Python floats, exactly what betterproto2 would be handed.
        values: list[float] = probabilities.tolist()
    else:
        values = list(probabilities)
    return _prediction_body(operator.index(label), values)


def _prediction_message(message: MnistPrediction) -> bytes | None:
    label, probabilities = message.label, message.probabilities
    if type(label) is not int or type(probabilities) is not list:
        return None
    return _prediction_body(label, probabilities, unknown_fields(message))


def _item_error_message(message: ItemError) -> bytes | None:
    code, text = message.code, message.message
    if type(code) is not int or type(text) is not str:
        return None
    head = _TAG_1_VARINT + _varint(code) if code else b""
    if not text:
        return head + unknown_fields(message)
    encoded = text.encode("utf-8")
    return head + _TAG_2_LEN + _varint(len(encoded)) + encoded + unknown_fields(message)


def _stream_prediction_message(message: StreamPrediction) -> bytes | None:
    index = message.index
    if type(index) is not int:
        return None
    parts = [_TAG_1_VARINT + _varint(index)] if index else []
    # Both members are written if both are set, as betterproto2 does; None means unset.
    if message.prediction is not None:
        if type(message.prediction) is not MnistPrediction:
            return None
        body = _prediction_message(message.prediction)
        if body is None:
            return None
        parts += (_TAG_2_LEN, _varint(len(body)), body)
    if message.error is not None:
        if type(message.error) is not ItemError:
            return None
        body = _item_error_message(message.error)
        if body is None:
            return None
        parts += (_TAG_3_LEN, _varint(len(body)), body)
    parts.append(unknown_fields(message))
    return b"".join(parts)


def _batch_response_message(message: PredictBatchResponse) -> bytes | None:
    results = message.results
    if type(results) is not list:
        return None
    parts: list[bytes] = []
    for item in results:
        if type(item) is not StreamPrediction:
            return None
        body = _stream_prediction_message(item)
        if body is None:
            return None
        parts += (_TAG_1_LEN, _varint(len(body)), body)
    parts.append(unknown_fields(message))
    return b"".join(parts)


_ENCODERS: dict[type[betterproto2.Message], Callable[[Any], bytes | None]] = {
    MnistPrediction: _prediction_message,
    StreamPrediction: _stream_prediction_message,
    PredictBatchResponse: _batch_response_message,
}


def encode_message(message: betterproto2.Message) -> bytes | None:
    """`bytes(message)` for the hot response types, faster; None for anything else."""
    encoder = _ENCODERS.get(type(message))
    return None if encoder is None else encoder(message)


# --- decoding -------------------------------------------------------------------------------

_VARINT, _FIXED64, _LEN, _FIXED32 = 0, 1, 2, 5
_MAX_TAG = 0xFFFF_FFFF
_MAX_LENGTH = 0x7FFF_FFFE  # upb refuses lengths >= INT32_MAX


def _long_varint(data: bytes, pos: int, end: int, max_bytes: int, what: str) -> tuple[int, int]:
    """The varint at `pos` (its first byte has the continuation bit) and the position after."""
    value = 0
    shift = 0
    start = pos
    while pos < end and pos - start < max_bytes:
        byte = data[pos]
        pos += 1
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            return value & 0xFFFF_FFFF_FFFF_FFFF, pos
        shift += 7
    if pos >= end and pos - start < max_bytes:
        raise WireFormatError(f"truncated {what} at offset {start}")
    raise WireFormatError(f"{what} at offset {start} is longer than {max_bytes} bytes")


def _next_field(data: bytes, pos: int, end: int) -> tuple[int, int, int, int]:
    """(field number, wire type, value start, value end) of the field at `pos` < `end`.

    For a length-delimited field the value is its payload, without the length.
    """
    tag = data[pos]
    if tag < 0x80:
        start = pos + 1
    else:
        tag, start = _long_varint(data, pos, end, 5, "tag")
        if tag > _MAX_TAG:
            raise WireFormatError(f"tag at offset {pos} is over 32 bits")
    number, wire_type = tag >> 3, tag & 7
    if number == 0:
        raise WireFormatError(f"field number 0 at offset {pos}")
    if wire_type == _LEN:
        if start >= end:
            raise WireFormatError(f"truncated length of field {number} at offset {start}")
        # Lengths of one or two bytes (images up to 16 KiB) without the general loop.
        length = data[start]
        if length < 0x80:
            start += 1
        elif start + 1 < end and data[start + 1] < 0x80:
            length = (length & 0x7F) | (data[start + 1] << 7)
            start += 2
        else:
            length, start = _long_varint(data, start, end, 5, "length")
        stop = start + length
        if stop > end or length > _MAX_LENGTH:
            raise WireFormatError(
                f"field {number} at offset {pos} needs {length} bytes; {end - start} are left"
            )
        return number, wire_type, start, stop
    if wire_type == _VARINT:
        if start >= end:
            raise WireFormatError(f"truncated varint of field {number} at offset {start}")
        if data[start] & 0x80:
            return number, wire_type, start, _long_varint(data, start, end, 10, "varint")[1]
        return number, wire_type, start, start + 1
    if wire_type in (_FIXED64, _FIXED32):
        stop = start + (8 if wire_type == _FIXED64 else 4)
        if stop > end:
            raise WireFormatError(f"truncated fixed-size field {number} at offset {pos}")
        return number, wire_type, start, stop
    kind = "groups are not supported" if wire_type in (3, 4) else "no such wire type"
    raise WireFormatError(f"wire type {wire_type} of field {number} at offset {pos}: {kind}")


def _image_data(data: bytes, pos: int, end: int) -> bytes:
    """The `data` field of the MnistImage encoded in data[pos:end]: the last one wins."""
    image = b""
    while pos < end:
        number, wire_type, start, pos = _next_field(data, pos, end)
        if number == 1 and wire_type == _LEN:
            image = data[start:pos]
    return image


def _decode_image(data: bytes) -> MnistImage:
    return MnistImage(data=_image_data(data, 0, len(data)))


def _decode_batch_request(data: bytes) -> PredictBatchRequest:
    images = []
    pos, end = 0, len(data)
    while pos < end:
        number, wire_type, start, pos = _next_field(data, pos, end)
        if number == 1 and wire_type == _LEN:
            try:
                images.append(MnistImage(data=_image_data(data, start, pos)))
            except WireFormatError as exc:
                raise WireFormatError(f"images[{len(images)}]: {exc}") from None
    return PredictBatchRequest(images=images)


def _decode_model_info_request(data: bytes) -> ModelInfoRequest:
    pos, end = 0, len(data)
    while pos < end:  # no fields of its own: only check that the bytes are well formed
        pos = _next_field(data, pos, end)[3]
    return ModelInfoRequest()


_DECODERS: dict[type[betterproto2.Message], Callable[[bytes], betterproto2.Message]] = {
    MnistImage: _decode_image,
    PredictBatchRequest: _decode_batch_request,
    ModelInfoRequest: _decode_model_info_request,
}


def decode_message(data: bytes, message_type: type[Any]) -> betterproto2.Message | None:
    """Parse a request message of a hot type strictly; None when `message_type` is not one.

    Raises `WireFormatError` when `data` is not a well-formed encoding.
    """
    decoder = _DECODERS.get(message_type)
    if decoder is None:
        return None
    # Slices of a bytearray or memoryview would leak into the message as `data`.
    return decoder(data if type(data) is bytes else bytes(data))
