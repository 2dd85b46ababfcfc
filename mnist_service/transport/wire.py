"""Fast protobuf wire encoding of the hot messages; betterproto2 messages stay the API.

betterproto2 0.10 spends ~15-30 µs per small message (a `warnings.catch_warnings()` per field)
and ~4 µs to parse even a one-field message. Here the hot responses (`MnistPrediction`,
`StreamPrediction`, `PredictBatchResponse`, and the Open Inference Protocol's
`ModelInferResponse` without parameters) are encoded by hand and the requests (`MnistImage`,
`PredictBatchRequest`, `ModelInfoRequest`, `ModelInferRequest`) decoded by hand. In a
`ModelInferRequest`, the parts a client rarely sends (parameters, requested outputs, an
input's parameters and typed contents) are handed, as their own bytes, to betterproto2.

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
from typing import Any, SupportsIndex, TypeVar

import betterproto2
import numpy as np

from .._compat import unknown_fields
from .._proto.inference import (
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
    ModelInferResponse,
    ModelInferResponseInferOutputTensor,
)
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
_TAG_5_LEN = b"\x2a"
_TAG_6_LEN = b"\x32"


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


def _text_field(tag: bytes, text: str) -> bytes:
    if not text:
        return b""
    encoded = text.encode("utf-8")
    return tag + _varint(len(encoded)) + encoded


def _packed_int64(tag: bytes, values: list[int]) -> bytes:
    if not values:
        return b""
    packed = b"".join(_varint(value) for value in values)
    return tag + _varint(len(packed)) + packed


def _output_tensor_message(tensor: ModelInferResponseInferOutputTensor) -> bytes | None:
    if tensor.parameters or tensor.contents is not None or type(tensor.shape) is not list:
        return None  # betterproto2's
    name, datatype, shape = tensor.name, tensor.datatype, tensor.shape
    if type(name) is not str or type(datatype) is not str:
        return None
    for value in shape:
        if type(value) is not int:
            return None
    # The service answers with the same few descriptions call after call.
    key = (name, datatype, *shape)
    body = _OUTPUT_BODIES.get(key)
    if body is None:
        body = (
            _text_field(_TAG_1_LEN, name)
            + _text_field(_TAG_2_LEN, datatype)
            + _packed_int64(_TAG_3_LEN, shape)
        )
        _remember(_OUTPUT_BODIES, key, body)
    return body + unknown_fields(tensor)


_K = TypeVar("_K")
_V = TypeVar("_V")

_MAX_CACHED = 64
"""Entries a cache of coded parts keeps (emptied when full): the parts repeat, or are few."""


def _remember(cache: dict[_K, _V], key: _K, value: _V) -> None:
    """Keep `value` under `key`, emptying `cache` first when it holds `_MAX_CACHED`."""
    if len(cache) >= _MAX_CACHED:
        cache.clear()
    cache[key] = value


_HEADS: dict[tuple[object, ...], bytes] = {}
"""A response's model name, version and id -> their encoding."""

_OUTPUT_BODIES: dict[tuple[object, ...], bytes] = {}
"""An output tensor's description (name, datatype, shape) -> its encoding, less unknown fields."""


def _model_infer_response_message(message: ModelInferResponse) -> bytes | None:
    """A ModelInferResponse with outputs in `raw_output_contents`, as the service answers."""
    if message.parameters or type(message.outputs) is not list:
        return None
    if type(message.raw_output_contents) is not list:
        return None
    texts = (message.model_name, message.model_version, message.id)
    if type(texts[0]) is not str or type(texts[1]) is not str or type(texts[2]) is not str:
        return None
    head = _HEADS.get(texts)  # the same model, version and (mostly empty) id, call after call
    if head is None:
        head = (
            _text_field(_TAG_1_LEN, texts[0])
            + _text_field(_TAG_2_LEN, texts[1])
            + _text_field(_TAG_3_LEN, texts[2])
        )
        _remember(_HEADS, texts, head)
    parts = [head]
    for tensor in message.outputs:
        if type(tensor) is not ModelInferResponseInferOutputTensor:
            return None
        body = _output_tensor_message(tensor)
        if body is None:
            return None
        parts += (_TAG_5_LEN, _varint(len(body)), body)
    for raw in message.raw_output_contents:
        if type(raw) is not bytes:
            return None
        parts += (_TAG_6_LEN, _varint(len(raw)), raw)
    parts.append(unknown_fields(message))
    return b"".join(parts)


_ENCODERS: dict[type[betterproto2.Message], Callable[[Any], bytes | None]] = {
    MnistPrediction: _prediction_message,
    StreamPrediction: _stream_prediction_message,
    PredictBatchResponse: _batch_response_message,
    ModelInferResponse: _model_infer_response_message,
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


def _text(data: bytes, start: int, stop: int, number: int) -> str:
    try:
        return data[start:stop].decode("utf-8")
    except UnicodeDecodeError:
        raise WireFormatError(f"string field {number} at offset {start} is not UTF-8") from None


def _int64s(data: bytes, start: int, stop: int, wire_type: int) -> list[int]:
    """A repeated int64 field's values: packed (one length-delimited run) or one varint."""
    values = []
    pos = start
    while pos < stop:
        if data[pos] < 0x80:
            value, pos = data[pos], pos + 1
        else:
            value, pos = _long_varint(data, pos, stop, 10, "varint")
            if value >= 1 << 63:
                value -= 1 << 64
        values.append(value)
        if wire_type == _VARINT:
            break
    return values


def _decode_input_tensor(data: bytes, pos: int, end: int) -> ModelInferRequestInferInputTensor:
    # A client describes its input the same way call after call: the bytes of a description
    # without parameters or contents decode to the same name, datatype and shape.
    coded = data[pos:end]
    known = _INPUT_DESCRIPTIONS.get(coded)
    if known is not None:
        name, datatype, *shape = known
        return ModelInferRequestInferInputTensor(name=name, datatype=datatype, shape=shape)
    tensor = _parse_input_tensor(data, pos, end)
    if not tensor.parameters and tensor.contents is None and len(coded) <= _MAX_CACHED_INPUT:
        _remember(_INPUT_DESCRIPTIONS, coded, (tensor.name, tensor.datatype, *tensor.shape))
    return tensor


_MAX_CACHED_INPUT = 256
"""Bytes of the longest input description `_INPUT_DESCRIPTIONS` keeps (a long shape is no
common case)."""

_INPUT_DESCRIPTIONS: dict[bytes, tuple[Any, ...]] = {}
"""An input tensor's bytes (no parameters, no contents) -> (name, datatype, *shape)."""


def _parse_input_tensor(data: bytes, pos: int, end: int) -> ModelInferRequestInferInputTensor:
    name = datatype = ""
    shape: list[int] = []
    rare: list[bytes] = []  # parameters and contents: betterproto2's
    while pos < end:
        field = pos
        number, wire_type, start, pos = _next_field(data, pos, end)
        if number == 3 and wire_type in (_LEN, _VARINT):
            shape += _int64s(data, start, pos, wire_type)
        elif wire_type != _LEN:
            continue
        elif number == 1:
            name = _text(data, start, pos, number)
        elif number == 2:
            datatype = _text(data, start, pos, number)
        elif number in (4, 5):
            rare.append(data[field:pos])
    tensor = ModelInferRequestInferInputTensor(name=name, datatype=datatype, shape=shape)
    if rare:
        parsed = ModelInferRequestInferInputTensor.parse(b"".join(rare))
        tensor.parameters, tensor.contents = parsed.parameters, parsed.contents
    return tensor


def _decode_model_infer_request(data: bytes) -> ModelInferRequest:
    texts = ["", "", ""]  # model_name, model_version, id
    inputs: list[ModelInferRequestInferInputTensor] = []
    raw: list[bytes] = []
    rare: list[bytes] = []  # parameters and requested outputs: betterproto2's
    pos, end = 0, len(data)
    while pos < end:
        field = pos
        number, wire_type, start, pos = _next_field(data, pos, end)
        if wire_type != _LEN:
            continue
        if number <= 3:
            texts[number - 1] = _text(data, start, pos, number)
        elif number == 5:
            try:
                inputs.append(_decode_input_tensor(data, start, pos))
            except WireFormatError as exc:
                raise WireFormatError(f"inputs[{len(inputs)}]: {exc}") from None
        elif number == 7:
            raw.append(data[start:pos])
        elif number in (4, 6):
            rare.append(data[field:pos])
    message = ModelInferRequest(
        model_name=texts[0], model_version=texts[1], id=texts[2], inputs=inputs,
        raw_input_contents=raw,
    )  # fmt: skip
    if rare:
        parsed = ModelInferRequest.parse(b"".join(rare))
        message.parameters, message.outputs = parsed.parameters, parsed.outputs
    return message


_DECODERS: dict[type[betterproto2.Message], Callable[[bytes], betterproto2.Message]] = {
    MnistImage: _decode_image,
    PredictBatchRequest: _decode_batch_request,
    ModelInfoRequest: _decode_model_info_request,
    ModelInferRequest: _decode_model_infer_request,
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
