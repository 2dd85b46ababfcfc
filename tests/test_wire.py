"""The hand-written wire codec: betterproto2's bytes exactly, protobuf's parsing rules strictly.

Encoders are checked byte for byte against `bytes(message)` on a seeded corpus and on edge
cases; decoders against betterproto2 and google.protobuf (upb), including a differential fuzz;
the codec through a real in-memory grpclib round trip.
"""

from __future__ import annotations

import math
import random
import re
import struct
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from google.protobuf import message_factory
from google.protobuf.message import DecodeError
from grpclib.client import UnaryUnaryMethod
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.testing import ChannelFor

from mnist_service._proto.inference import (
    InferParameter,
    InferTensorContents,
    ModelInferRequest,
    ModelInferRequestInferInputTensor,
    ModelInferRequestInferRequestedOutputTensor,
    ModelInferResponse,
    ModelInferResponseInferOutputTensor,
)
from mnist_service._proto.mnist import (
    ItemError,
    MnistBase,
    MnistImage,
    MnistPrediction,
    MnistStub,
    ModelInfo,
    ModelInfoRequest,
    PredictBatchRequest,
    PredictBatchResponse,
    StreamPrediction,
)
from mnist_service.transport import wire
from mnist_service.transport.codec import SizeLimitedCodec
from mnist_service.transport.wire import (
    WireFormatError,
    decode_message,
    encode_message,
    encode_prediction,
)

# google.protobuf classes for the same descriptors: the reference parser and serialiser.
PbImage = message_factory.GetMessageClass(MnistImage.DESCRIPTOR)
PbInferRequest = message_factory.GetMessageClass(ModelInferRequest.DESCRIPTOR)
PbBatchRequest = message_factory.GetMessageClass(PredictBatchRequest.DESCRIPTOR)
PbStreamPrediction = message_factory.GetMessageClass(StreamPrediction.DESCRIPTOR)
PbBatchResponse = message_factory.GetMessageClass(PredictBatchResponse.DESCRIPTOR)

F32_MAX = struct.unpack("<f", b"\xff\xff\x7f\x7f")[0]
F32_MIN_SUBNORMAL = struct.unpack("<f", b"\x01\x00\x00\x00")[0]
F32_MAX_SUBNORMAL = struct.unpack("<f", b"\xff\xff\x7f\x00")[0]
EDGE_FLOATS = [
    0.0,
    -0.0,
    math.nan,
    -math.nan,
    math.inf,
    -math.inf,
    1.0,
    0.1,  # not a float32: rounds
    1 / 3,
    -2.5,
    F32_MAX,
    -F32_MAX,
    F32_MIN_SUBNORMAL,
    F32_MAX_SUBNORMAL,
    1e-46,  # below the smallest subnormal: rounds to zero
    struct.unpack("<f", b"\x01\x00\xc0\x7f")[0],  # a NaN with a payload
]
EDGE_INT32 = [0, 1, 9, 127, 128, 16383, 16384, 2**31 - 1, -1, -(2**31)]
EDGE_UINT64 = [0, 1, 127, 128, 16383, 16384, 2**32, 2**63, 2**64 - 1]
ALPHABET = ["a", "z", " ", "\x00", "é", "€", "\u2028", "𝟘"]


# --- a seeded corpus with edge values ---------------------------------------------------------


def random_float(rng: random.Random) -> float:
    roll = rng.random()
    if roll < 0.3:
        return float(rng.choice(EDGE_FLOATS))
    if roll < 0.6:  # any float32 bit pattern: subnormals, NaN payloads, infinities
        return float(struct.unpack("<f", rng.getrandbits(32).to_bytes(4, "little"))[0])
    return rng.uniform(-1.0, 1.0) * 10.0 ** rng.randint(-40, 38)


def random_int32(rng: random.Random) -> int:
    if rng.random() < 0.4:
        return rng.choice(EDGE_INT32)
    return rng.randint(-(2**31), 2**31 - 1) >> rng.randint(0, 31)


def random_uint64(rng: random.Random) -> int:
    if rng.random() < 0.4:
        return rng.choice(EDGE_UINT64)
    return rng.getrandbits(rng.randint(1, 64))


def random_prediction(rng: random.Random) -> MnistPrediction:
    size = rng.choice([0, 1, 10, 10, 10, rng.randint(0, 40)])
    return MnistPrediction(
        label=random_int32(rng), probabilities=[random_float(rng) for _ in range(size)]
    )


def random_error(rng: random.Random) -> ItemError:
    length = rng.choice([0, 1, 20, 200])
    text = "".join(rng.choice(ALPHABET) for _ in range(rng.randint(0, length)))
    return ItemError(code=random_int32(rng), message=text)


def random_stream_prediction(rng: random.Random) -> StreamPrediction:
    index = random_uint64(rng)
    roll = rng.random()
    if roll < 0.1:
        return StreamPrediction(index=index)
    if roll < 0.55:
        return StreamPrediction(index=index, prediction=random_prediction(rng))
    return StreamPrediction(index=index, error=random_error(rng))


def random_batch_response(rng: random.Random) -> PredictBatchResponse:
    size = rng.choice([0, 1, 64, rng.randint(0, 64)])
    return PredictBatchResponse(results=[random_stream_prediction(rng) for _ in range(size)])


def test_encoders_match_betterproto2_on_a_random_corpus() -> None:
    rng = random.Random(20240501)
    corpus: list[MnistPrediction | StreamPrediction | PredictBatchResponse] = []
    corpus += [random_prediction(rng) for _ in range(2000)]
    corpus += [random_stream_prediction(rng) for _ in range(2000)]
    corpus += [random_batch_response(rng) for _ in range(100)]

    mismatches = [message for message in corpus if encode_message(message) != bytes(message)]

    assert mismatches == []


# --- hand-picked encoder cases ----------------------------------------------------------------

ENCODER_CASES = [
    pytest.param(MnistPrediction(), id="prediction-all-default"),
    pytest.param(MnistPrediction(label=0, probabilities=[]), id="prediction-label-0-no-probs"),
    pytest.param(MnistPrediction(label=-1), id="prediction-negative-label-10-byte-varint"),
    pytest.param(MnistPrediction(label=-(2**31)), id="prediction-int32-min"),
    pytest.param(MnistPrediction(label=2**31 - 1), id="prediction-int32-max"),
    pytest.param(MnistPrediction(label=2**40), id="prediction-label-beyond-int32"),
    pytest.param(MnistPrediction(label=7, probabilities=[0.0] * 10), id="prediction-zeros"),
    pytest.param(MnistPrediction(probabilities=[-0.0]), id="prediction-negative-zero"),
    pytest.param(MnistPrediction(probabilities=EDGE_FLOATS), id="prediction-edge-floats"),
    pytest.param(MnistPrediction(probabilities=[0.5] * 40), id="prediction-160-byte-packed"),
    pytest.param(MnistPrediction(probabilities=[1, True]), id="prediction-int-and-bool-floats"),
    pytest.param(StreamPrediction(), id="stream-all-default"),
    pytest.param(StreamPrediction(index=2**64 - 1), id="stream-uint64-max"),
    pytest.param(StreamPrediction(index=-1), id="stream-negative-index"),
    pytest.param(StreamPrediction(prediction=MnistPrediction()), id="stream-empty-prediction-set"),
    pytest.param(StreamPrediction(error=ItemError()), id="stream-empty-error-set"),
    pytest.param(StreamPrediction(index=3, error=ItemError(code=3, message="bad")), id="error"),
    pytest.param(StreamPrediction(error=ItemError(code=-5, message="é€𝟘\x00")), id="unicode"),
    pytest.param(StreamPrediction(error=ItemError(message="x" * 300)), id="error-long-message"),
    pytest.param(
        StreamPrediction(
            index=1, prediction=MnistPrediction(label=1), error=ItemError(code=1, message="both")
        ),
        id="stream-both-oneof-members-set",
    ),
    pytest.param(PredictBatchResponse(), id="batch-empty"),
    pytest.param(PredictBatchResponse(results=[StreamPrediction()]), id="batch-one-empty-item"),
    pytest.param(
        PredictBatchResponse(
            results=[StreamPrediction(index=i, prediction=MnistPrediction()) for i in range(200)]
        ),
        id="batch-200-items",
    ),
    pytest.param(
        MnistPrediction.parse(bytes(MnistPrediction(label=3)) + b"\x18\x05\x22\x01z"),
        id="prediction-with-unknown-fields",
    ),
    pytest.param(
        StreamPrediction.parse(
            bytes(StreamPrediction(index=2, prediction=MnistPrediction(label=4))).replace(
                b"\x12\x02\x08\x04", b"\x12\x04\x08\x04\x20\x01"
            )
            + b"\x28\x07"
        ),
        id="stream-with-unknown-fields-at-two-levels",
    ),
]


@pytest.mark.parametrize("message", ENCODER_CASES)
def test_encoders_match_betterproto2_on_edge_cases(message: Any) -> None:
    assert encode_message(message) == bytes(message)


def test_a_set_oneof_member_with_only_defaults_is_written_as_an_empty_submessage() -> None:
    assert encode_message(StreamPrediction(prediction=MnistPrediction())) == b"\x12\x00"
    assert encode_message(StreamPrediction(error=ItemError())) == b"\x1a\x00"


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(StreamPrediction(prediction=MnistPrediction()), id="empty-prediction"),
        pytest.param(StreamPrediction(index=9, error=ItemError(code=-3, message="é")), id="err"),
        pytest.param(MnistPrediction(label=-1, probabilities=[0.25, -0.0, math.inf]), id="pred"),
        pytest.param(
            PredictBatchResponse(
                results=[StreamPrediction(index=i, error=ItemError(code=i)) for i in range(3)]
            ),
            id="batch",
        ),
    ],
)
def test_encoders_match_google_protobuf_too(message: Any) -> None:
    reference = message_factory.GetMessageClass(type(message).DESCRIPTOR)
    canonical = reference.FromString(bytes(message)).SerializeToString(deterministic=True)

    assert encode_message(message) == canonical


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_encode_prediction_takes_a_numpy_row(dtype: type[np.floating[Any]]) -> None:
    rng = np.random.default_rng(7)
    rows = rng.dirichlet(np.ones(10), size=200).astype(dtype)
    rows[0, :4] = [np.nan, np.inf, -0.0, F32_MIN_SUBNORMAL]

    for row in rows:
        label = np.argmax(row)  # a numpy integer, as the service has it
        expected = bytes(MnistPrediction(label=int(label), probabilities=row.tolist()))
        assert encode_prediction(label, row) == expected
        assert encode_prediction(int(label), row.tolist()) == expected


def test_floats_beyond_float32_range_fail_as_betterproto2_fails() -> None:
    message = MnistPrediction(probabilities=[F32_MAX * 2])

    with pytest.raises(OverflowError):
        bytes(message)
    with pytest.raises(OverflowError):
        encode_message(message)


class SubPrediction(MnistPrediction):
    """A subclass: not a hot type, so it takes betterproto2's path."""


@pytest.mark.parametrize(
    "message",
    [
        pytest.param(MnistPrediction(probabilities=()), id="tuple-probabilities"),  # type: ignore[arg-type]
        pytest.param(MnistPrediction(label=True), id="bool-label"),
        pytest.param(MnistPrediction(label=None), id="none-label"),  # type: ignore[arg-type]
        pytest.param(StreamPrediction(prediction=SubPrediction(label=1)), id="nested-subclass"),
        pytest.param(
            PredictBatchResponse(results=[StreamPrediction(), StreamPrediction(index=True)]),
            id="bool-index-in-batch",
        ),
        pytest.param(SubPrediction(label=1), id="subclass"),
        pytest.param(ModelInfo(architecture="conv"), id="not-a-hot-type"),
    ],
)
def test_anything_off_the_fast_path_falls_back_to_betterproto2(message: Any) -> None:
    assert encode_message(message) is None
    # ...and the codec then gives betterproto2's bytes, whatever those are.
    assert SizeLimitedCodec(1000).encode(message, type(message)) == bytes(message)


def test_codec_keeps_protocodec_type_check() -> None:
    with pytest.raises(TypeError, match="Message must be of type"):
        SizeLimitedCodec(1000).encode(MnistPrediction(), StreamPrediction)


# --- decoders -------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 127, 128, 300, 16384, 70_000])
def test_image_decoding_round_trips_betterproto2(size: int) -> None:
    data = random.Random(size).randbytes(size)

    decoded = decode_message(bytes(MnistImage(data=data)), MnistImage)

    assert isinstance(decoded, MnistImage)
    assert type(decoded.data) is bytes
    assert decoded.data == data


def test_batch_decoding_matches_google_protobuf() -> None:
    rng = random.Random(3)
    images = [rng.randbytes(rng.choice([0, 1, 300, 784, 5000])) for _ in range(64)]
    encoded = PbBatchRequest(images=[PbImage(data=image) for image in images]).SerializeToString()

    decoded = decode_message(encoded, PredictBatchRequest)

    assert decoded == PredictBatchRequest(images=[MnistImage(data=image) for image in images])
    assert decoded == PredictBatchRequest.parse(encoded)


UNKNOWN_FIELDS = [
    b"\x10\x96\x01",  # field 2, varint
    b"\x10" + b"\xff" * 9 + b"\x01",  # field 2, a 10-byte varint
    b"\x19" + bytes(8),  # field 3, fixed64
    b"\x22\x03abc",  # field 4, length-delimited
    b"\x2d" + bytes(4),  # field 5, fixed32
    b"\xfa\xff\xff\xff\x0f\x00",  # the largest field number, 5-byte tag
    b"\x08\x05",  # field 1 with the wrong wire type: protobuf skips it as unknown
    b"\x0d\x01\x02\x03\x04",  # ditto, fixed32
]


@pytest.mark.parametrize("unknown", UNKNOWN_FIELDS)
def test_unknown_fields_are_skipped_as_google_protobuf_does(unknown: bytes) -> None:
    image = unknown + bytes(MnistImage(data=b"png")) + unknown
    batch = unknown + b"\x0a" + bytes([len(image)]) + image + unknown + b"\x0a\x00" + unknown

    assert decode_message(image, MnistImage) == MnistImage(data=b"png")
    assert PbImage.FromString(image).data == b"png"
    assert decode_message(batch, PredictBatchRequest) == PredictBatchRequest(
        images=[MnistImage(data=b"png"), MnistImage()]
    )
    assert [image.data for image in PbBatchRequest.FromString(batch).images] == [b"png", b""]
    assert decode_message(unknown, ModelInfoRequest) == ModelInfoRequest()


def test_a_repeated_data_field_keeps_the_last_value() -> None:
    encoded = b"\x0a\x01a\x0a\x02bb"

    assert decode_message(encoded, MnistImage) == MnistImage(data=b"bb")
    assert PbImage.FromString(encoded).data == b"bb"


def test_non_minimal_varints_are_accepted() -> None:
    # A 2-byte tag and a 5-byte length: unusual, but valid protobuf.
    encoded = b"\x8a\x00\x81\x80\x80\x80\x00a"

    assert decode_message(encoded, MnistImage) == MnistImage(data=b"a")
    assert PbImage.FromString(encoded).data == b"a"


@pytest.mark.parametrize("buffer", [bytearray, memoryview])
def test_decoded_data_is_bytes_whatever_the_buffer(buffer: type[Any]) -> None:
    decoded = decode_message(buffer(b"\x0a\x02ab"), MnistImage)

    assert isinstance(decoded, MnistImage)
    assert type(decoded.data) is bytes


def test_other_types_are_left_to_betterproto2() -> None:
    assert decode_message(bytes(MnistPrediction(label=1)), MnistPrediction) is None


MALFORMED = [
    pytest.param(b"\x0a\x05ab", "needs 5 bytes", id="length-past-the-end"),
    pytest.param(b"\x0a\x85\x01abc", "needs 133 bytes", id="2-byte-length-past-the-end"),
    pytest.param(b"\x0a", "truncated length", id="missing-length"),
    pytest.param(b"\x0a\x85", "truncated length", id="truncated-length"),
    pytest.param(b"\x0a\x81\x80\x80\x80\x80\x00a", "longer than 5 bytes", id="6-byte-length"),
    pytest.param(b"\x0a\xff\xff\xff\xff\x07", "needs 2147483647", id="length-int32-max"),
    pytest.param(b"\x10", "truncated varint", id="missing-varint"),
    pytest.param(b"\x10\x80\x80", "truncated varint", id="truncated-varint"),
    pytest.param(b"\x10" + b"\xff" * 10 + b"\x01", "longer than 10", id="11-byte-varint"),
    pytest.param(b"\x85", "truncated tag", id="truncated-tag"),
    pytest.param(b"\x80\x80\x80\x80\x10", "over 32 bits", id="tag-over-32-bits"),
    pytest.param(b"\x8a\x80\x80\x80\x80\x00\x01a", "longer than 5", id="6-byte-tag"),
    pytest.param(b"\x02\x00", "field number 0", id="field-0"),
    pytest.param(b"\x15ab", "truncated fixed-size", id="truncated-fixed32"),
    pytest.param(b"\x11abcd", "truncated fixed-size", id="truncated-fixed64"),
    pytest.param(b"\x1b\x08\x01\x1c", "groups are not supported", id="group"),
    pytest.param(b"\x1c", "groups are not supported", id="end-group"),
    pytest.param(b"\x0e", "no such wire type", id="wire-type-6"),
    pytest.param(b"\x10\x01\x0f", "no such wire type", id="wire-type-7"),
]


@pytest.mark.parametrize(("encoded", "fragment"), MALFORMED)
def test_malformed_images_raise_wire_format_error(encoded: bytes, fragment: str) -> None:
    with pytest.raises(WireFormatError, match=re.escape(fragment)):
        decode_message(encoded, MnistImage)


@pytest.mark.parametrize(("encoded", "fragment"), MALFORMED)
def test_malformed_batches_raise_wire_format_error(encoded: bytes, fragment: str) -> None:
    nested = b"\x0a\x00\x0a" + bytes([len(encoded)]) + encoded
    fragment = re.escape(fragment)

    with pytest.raises(WireFormatError, match=fragment):
        decode_message(encoded, PredictBatchRequest)
    with pytest.raises(WireFormatError, match=rf"^images\[1\]: .*{fragment}"):
        decode_message(nested, PredictBatchRequest)
    with pytest.raises(WireFormatError, match=fragment):
        decode_message(encoded, ModelInfoRequest)


def test_unknown_groups_are_refused_though_upb_skips_them() -> None:
    # A deliberate difference (see transport.wire): proto3 clients never send groups.
    encoded = b"\x1b\x08\x01\x1c" + bytes(MnistImage(data=b"a"))

    assert PbImage.FromString(encoded).data == b"a"
    with pytest.raises(WireFormatError, match="groups are not supported"):
        decode_message(encoded, MnistImage)


def test_wire_format_error_is_a_value_error() -> None:
    assert issubclass(WireFormatError, ValueError)


def mutations(rng: random.Random, valid: bytes) -> bytes:
    """`valid` truncated, extended, or with a few bytes changed."""
    data = bytearray(valid)
    roll = rng.random()
    if roll < 0.3 and data:
        del data[rng.randrange(len(data)) :]
    elif roll < 0.5:
        data += rng.randbytes(rng.randint(1, 6))
    else:
        for _ in range(rng.randint(1, 3)):
            if data:
                data[rng.randrange(len(data))] = rng.getrandbits(8)
    return bytes(data)


def google_images(encoded: bytes) -> list[bytes] | None:
    """The images' data as google.protobuf parses them; None when it refuses the bytes."""
    try:
        return [image.data for image in PbBatchRequest.FromString(encoded).images]
    except DecodeError:
        return None


def wire_images(encoded: bytes) -> list[bytes] | str:
    """The images' data as `decode_message` parses them, or its error message."""
    try:
        decoded = decode_message(encoded, PredictBatchRequest)
    except WireFormatError as exc:
        return str(exc)
    assert isinstance(decoded, PredictBatchRequest)
    return [image.data for image in decoded.images]


def test_decoders_agree_with_google_protobuf_on_mutated_input() -> None:
    rng = random.Random(11)
    seeds = [
        bytes(PredictBatchRequest(images=[MnistImage(data=rng.randbytes(n)) for n in sizes]))
        for sizes in ([3, 0, 5], [1], [200, 2], [])
    ]
    outcomes = {"both parse": 0, "both refuse": 0, "unknown group": 0}
    for _ in range(5000):
        encoded = mutations(rng, rng.choice(seeds))
        expected, got = google_images(encoded), wire_images(encoded)
        if isinstance(got, str) and expected is not None:
            # The one deliberate difference: upb skips a well-formed unknown group.
            assert "groups are not supported" in got, encoded
            outcomes["unknown group"] += 1
        elif isinstance(got, str):
            outcomes["both refuse"] += 1
        else:
            assert got == expected, encoded
            outcomes["both parse"] += 1

    assert min(outcomes["both parse"], outcomes["both refuse"]) > 1000, outcomes


# --- the codec, through a real grpclib round trip ---------------------------------------------


class EchoService(MnistBase):
    """Answers from the request bytes alone: these tests are about the codec."""

    async def predict(self, message: MnistImage) -> MnistPrediction:
        return MnistPrediction(label=len(message.data) % 10, probabilities=[0.5, -0.0])

    async def predict_batch(self, message: PredictBatchRequest) -> PredictBatchResponse:
        return PredictBatchResponse(
            results=[
                StreamPrediction(index=i, prediction=MnistPrediction(label=len(image.data)))
                if image.data
                else StreamPrediction(index=i, error=ItemError(code=3, message="empty"))
                for i, image in enumerate(message.images)
            ]
        )

    async def get_model_info(self, message: ModelInfoRequest) -> ModelInfo:
        return ModelInfo(architecture="echo")


class RawMessage:
    """Bytes that the client sends as they are, so a test can send malformed messages."""

    def __init__(self, data: bytes) -> None:
        self.data = data

    def SerializeToString(self) -> bytes:  # noqa: N802 - ProtoCodec's name for it
        return self.data


MAX_MESSAGE_BYTES = 1024


@pytest.fixture
async def channel() -> AsyncIterator[Any]:
    async with ChannelFor([EchoService()], codec=SizeLimitedCodec(MAX_MESSAGE_BYTES)) as channel:
        yield channel


async def test_valid_requests_round_trip(channel: Any) -> None:
    stub = MnistStub(channel)

    prediction = await stub.predict(MnistImage(data=b"123"))
    batch = await stub.predict_batch(
        PredictBatchRequest(images=[MnistImage(data=b"ab"), MnistImage()])
    )
    info = await stub.get_model_info(ModelInfoRequest())

    assert prediction == MnistPrediction(label=3, probabilities=[0.5, -0.0])
    assert batch == PredictBatchResponse(
        results=[
            StreamPrediction(index=0, prediction=MnistPrediction(label=2)),
            StreamPrediction(index=1, error=ItemError(code=3, message="empty")),
        ]
    )
    assert info.architecture == "echo"


@pytest.mark.parametrize(
    ("path", "reply_type", "encoded", "status", "fragment"),
    [
        pytest.param(
            "/mnist.Mnist/Predict",
            MnistPrediction,
            b"\x0a\x05ab",
            Status.INVALID_ARGUMENT,
            "malformed MnistImage message: field 1 at offset 0 needs 5 bytes",
            id="predict-past-the-end",
        ),
        pytest.param(
            "/mnist.Mnist/PredictBatch",
            PredictBatchResponse,
            b"\x0a\x00\x0a\x01\x0f",
            Status.INVALID_ARGUMENT,
            r"malformed PredictBatchRequest message: images\[1\]: wire type 7",
            id="batch-bad-wire-type-in-an-image",
        ),
        pytest.param(
            "/mnist.Mnist/GetModelInfo",
            ModelInfo,
            b"\x10\x80",
            Status.INVALID_ARGUMENT,
            "malformed ModelInfoRequest message: truncated varint",
            id="model-info-truncated-varint",
        ),
        pytest.param(
            "/mnist.Mnist/Predict",
            MnistPrediction,
            bytes(MnistImage(data=bytes(MAX_MESSAGE_BYTES))),
            Status.RESOURCE_EXHAUSTED,
            "the limit is 1024 bytes",
            id="predict-oversize",
        ),
    ],
)
async def test_bad_request_messages_get_a_status(
    channel: Any, path: str, reply_type: type[Any], encoded: bytes, status: Status, fragment: str
) -> None:
    method = UnaryUnaryMethod(channel, path, RawMessage, reply_type)

    with pytest.raises(GRPCError) as caught:
        await method(RawMessage(encoded))

    assert caught.value.status is status
    assert caught.value.message is not None
    assert re.search(fragment, caught.value.message), caught.value.message


# --- the Open Inference Protocol's ModelInfer ----------------------------------------------------


def random_text(rng: random.Random) -> str:
    return "".join(rng.choice(ALPHABET) for _ in range(rng.choice([0, 0, 1, 13, 200])))


def random_shape(rng: random.Random) -> list[int]:
    edges = [0, 1, 28, 127, 128, -1, 2**63 - 1, -(2**63)]
    return [rng.choice(edges) if rng.random() < 0.5 else rng.randint(0, 300)
            for _ in range(rng.choice([0, 1, 2, 4]))]  # fmt: skip


def random_infer_response(rng: random.Random) -> ModelInferResponse:
    outputs = [
        ModelInferResponseInferOutputTensor(
            name=random_text(rng), datatype=random_text(rng), shape=random_shape(rng)
        )
        for _ in range(rng.choice([0, 1, 2]))
    ]
    raw = [rng.randbytes(rng.choice([0, 1, 8, 40, 300])) for _ in range(rng.choice([0, 1, 2]))]
    return ModelInferResponse(
        model_name=random_text(rng), model_version=random_text(rng), id=random_text(rng),
        outputs=outputs, raw_output_contents=raw,
    )  # fmt: skip


def random_infer_request(rng: random.Random, *, rare: bool) -> ModelInferRequest:
    """A request as clients send it; with `rare`, also the parts betterproto2 parses for us
    (parameters, requested outputs, an input's parameters and typed contents)."""
    inputs = []
    for _ in range(rng.choice([0, 1, 1, 2])):
        tensor = ModelInferRequestInferInputTensor(
            name=random_text(rng), datatype=random_text(rng), shape=random_shape(rng)
        )
        if rare and rng.random() < 0.5:
            tensor.parameters = {random_text(rng): InferParameter(int64_param=rng.randint(-9, 9))}
            tensor.contents = InferTensorContents(
                fp32_contents=[random_float(rng) for _ in range(3)], bytes_contents=[b"x"]
            )
        inputs.append(tensor)
    message = ModelInferRequest(
        model_name=random_text(rng), model_version=random_text(rng), id=random_text(rng),
        inputs=inputs,
        raw_input_contents=[rng.randbytes(rng.choice([0, 5, 300])) for _ in range(len(inputs))],
    )  # fmt: skip
    if rare and rng.random() < 0.5:
        message.parameters = {"priority": InferParameter(uint64_param=rng.randint(0, 9))}
        message.outputs = [ModelInferRequestInferRequestedOutputTensor(name=random_text(rng))]
    return message


def test_model_infer_responses_encode_as_betterproto2_does() -> None:
    rng = random.Random(21)
    for _ in range(2000):
        message = random_infer_response(rng)
        assert encode_message(message) == bytes(message), message


def test_model_infer_responses_with_parameters_are_left_to_betterproto2() -> None:
    with_parameters = ModelInferResponse(parameters={"p": InferParameter(bool_param=True)})
    output_contents = ModelInferResponse(
        outputs=[ModelInferResponseInferOutputTensor(contents=InferTensorContents())]
    )
    assert encode_message(with_parameters) is None
    assert encode_message(output_contents) is None


def test_model_infer_requests_decode_as_betterproto2_parses_them() -> None:
    rng = random.Random(22)
    for _ in range(2000):
        message = random_infer_request(rng, rare=True)
        encoded = bytes(message)
        decoded = decode_message(encoded, ModelInferRequest)
        assert decoded is not None
        # compared as bytes: the typed contents may hold NaN, which equals nothing
        assert bytes(decoded) == bytes(ModelInferRequest.parse(encoded)) == encoded


def test_repeated_descriptions_code_as_the_first_time_from_the_caches() -> None:
    """The coders keep the parts that repeat call after call (an input's description, an
    output's, a response's model, version and id): coded again, from the cache, a part gives
    what it gave the first time, in a fresh message, and the caches stay bounded."""
    rng = random.Random(24)
    requests = [bytes(random_infer_request(rng, rare=False)) for _ in range(40)]
    responses = [random_infer_response(rng) for _ in range(40)]
    for _ in range(3):
        for encoded in requests:
            first = decode_message(encoded, ModelInferRequest)
            assert isinstance(first, ModelInferRequest)
            assert bytes(first) == encoded
            for tensor in first.inputs:
                tensor.shape.append(7)  # a change to one call's message stays its own
                tensor.name += "x"
            again = decode_message(encoded, ModelInferRequest)
            assert again is not None
            assert bytes(again) == encoded
        for message in responses:
            assert encode_message(message) == encode_message(message) == bytes(message)
    assert 0 < len(wire._INPUT_DESCRIPTIONS) <= wire._MAX_CACHED
    assert 0 < len(wire._OUTPUT_BODIES) <= wire._MAX_CACHED
    assert 0 < len(wire._HEADS) <= wire._MAX_CACHED


def test_an_output_description_from_the_cache_keeps_its_unknown_fields() -> None:
    plain = ModelInferResponseInferOutputTensor(name="label", datatype="INT64", shape=[1])
    with_unknown = ModelInferResponseInferOutputTensor.parse(bytes(plain) + b"\x50\x01")
    for tensor in (plain, with_unknown, plain, with_unknown):
        message = ModelInferResponse(model_name="m", outputs=[tensor], raw_output_contents=[b"1"])
        assert encode_message(message) == bytes(message)
    assert bytes(ModelInferResponse(outputs=[with_unknown])).endswith(b"\x50\x01")


def test_an_unpacked_shape_is_read_as_protobuf_reads_it() -> None:
    """A repeated int64 may come unpacked, one varint field per value (proto2 encoders)."""
    tensor = b"\x0a\x01x" + b"\x18\x01" + b"\x18" + b"\xff" * 9 + b"\x01" + b"\x18\x1c"
    encoded = b"\x2a" + bytes([len(tensor)]) + tensor
    decoded = decode_message(encoded, ModelInferRequest)

    assert isinstance(decoded, ModelInferRequest)
    assert decoded.inputs[0].shape == list(PbInferRequest.FromString(encoded).inputs[0].shape)
    assert decoded.inputs[0].shape == [1, -1, 28]


def infer_fields(message: Any) -> tuple[Any, ...]:
    """What the hand decoder reads of a ModelInferRequest, from either library's message."""
    return (
        message.model_name, message.model_version, message.id,
        [(t.name, t.datatype, list(t.shape)) for t in message.inputs],
        list(message.raw_input_contents),
    )  # fmt: skip


def test_model_infer_decoding_agrees_with_google_protobuf_on_mutated_input() -> None:
    rng = random.Random(23)
    seeds = [bytes(random_infer_request(rng, rare=False)) for _ in range(20)]
    outcomes = {"both parse": 0, "both refuse": 0, "unknown group": 0}
    for _ in range(5000):
        encoded = mutations(rng, rng.choice(seeds))
        try:
            expected: tuple[Any, ...] | None = infer_fields(PbInferRequest.FromString(encoded))
        except DecodeError:
            expected = None
        try:
            decoded = decode_message(encoded, ModelInferRequest)
        except WireFormatError as exc:
            refusal = str(exc)
            decoded = None
        if decoded is None:
            if expected is not None:
                # The one deliberate difference: upb skips a well-formed unknown group.
                assert "groups are not supported" in refusal, encoded
                outcomes["unknown group"] += 1
            else:
                outcomes["both refuse"] += 1
            continue
        if expected is None:
            # parts of a field we do not read by hand (a mutated tag turned a byte run into
            # a parameters or outputs field) are betterproto2's, which is lax
            assert isinstance(decoded, ModelInferRequest)
            continue
        assert infer_fields(decoded) == expected, encoded
        outcomes["both parse"] += 1

    assert min(outcomes["both parse"], outcomes["both refuse"]) > 500, outcomes
