"""The models' tensors in the Open Inference Protocol: what they declare, and checked decoding.

Pure functions over bytes, shapes and numpy arrays; nothing here knows about gRPC or protobuf.
A model takes exactly one of three inputs, each a batch of N images:

    image       FP32  [N, 1, 28, 28]  the model's own input: values in [0, 1], white ink on black
    pixels      UINT8 [N, 28, 28]     raw MNIST pixels, white ink on black (as Predict's 784 bytes)
    image_file  BYTES [N]             encoded image files (PNG, JPEG...), as Predict's `data`

and gives `probabilities` (FP32 [N, 10]) and `label` (INT64 [N]). `pixels` and `image_file`
items go through the same preprocessing as `Mnist/Predict`; `image` goes to the model as is.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, NamedTuple

import numpy as np
import numpy.typing as npt

from ..constants import IMAGE_SIZE, INPUT_NAME, NUM_CLASSES, PROBABILITIES_NAME
from ..errors import InvalidTensorError

BATCH: Final = -1
"""A variable dimension in a declared shape: the batch."""

FP32: Final = "FP32"
UINT8: Final = "UINT8"
INT64: Final = "INT64"
BYTES: Final = "BYTES"

PIXELS_NAME: Final = "pixels"
IMAGE_FILE_NAME: Final = "image_file"
LABEL_NAME: Final = "label"


@dataclass(frozen=True, slots=True)
class TensorSpec:
    """A tensor as ModelMetadata declares it."""

    name: str
    datatype: str
    shape: tuple[int, ...]

    def describe(self) -> str:
        """E.g. `'image' (FP32 [-1,1,28,28])`."""
        return f"{self.name!r} ({self.datatype} {format_shape(self.shape)})"


INPUTS: Final = (
    TensorSpec(INPUT_NAME, FP32, (BATCH, 1, IMAGE_SIZE, IMAGE_SIZE)),
    TensorSpec(PIXELS_NAME, UINT8, (BATCH, IMAGE_SIZE, IMAGE_SIZE)),
    TensorSpec(IMAGE_FILE_NAME, BYTES, (BATCH,)),
)
"""What every model takes: exactly one of these per request."""

OUTPUTS: Final = (
    TensorSpec(PROBABILITIES_NAME, FP32, (BATCH, NUM_CLASSES)),
    TensorSpec(LABEL_NAME, INT64, (BATCH,)),
)
"""What every model gives; `probabilities` also as top-k classes (classification)."""

_INPUTS_BY_NAME: Final = {spec.name: spec for spec in INPUTS}
_ITEM_SHAPES: Final = {spec.name: list(spec.shape[1:]) for spec in INPUTS}
"""Each input's shape after the batch: every input declares the batch as its first dimension,
and only there."""
_OUTPUTS_BY_NAME: Final = {spec.name: spec for spec in OUTPUTS}
_ITEM_SIZE: Final = {FP32: 4, UINT8: 1, INT64: 8}
_LENGTH: Final = struct.Struct("<I")


def format_shape(shape: Sequence[int]) -> str:
    """`[7,1,28,28]`, as the protocol's documents write shapes."""
    return "[" + ",".join(str(d) for d in shape) + "]"


def input_spec(model: str, name: str, datatype: str, shape: Sequence[int]) -> TensorSpec:
    """The declared input a request's tensor claims to be, after checking its name, datatype
    and shape (with a batch of at least one image) against the declaration."""
    spec = _INPUTS_BY_NAME.get(name)
    if spec is None:
        raise InvalidTensorError(
            f"model {model!r} has no input {name!r}; it takes one of {_list(INPUTS)}"
        )
    if datatype != spec.datatype:
        raise InvalidTensorError(
            f"input {name!r} of model {model!r} has datatype {spec.datatype}, got {datatype!r}"
        )
    if len(shape) != len(spec.shape) or list(shape[1:]) != _ITEM_SHAPES[spec.name]:
        raise InvalidTensorError(
            f"input {name!r} of model {model!r} has shape {format_shape(spec.shape)}, "
            f"got {format_shape(shape)}"
        )
    if shape[0] < 1:
        raise InvalidTensorError(
            f"input {name!r} holds no images: its shape is {format_shape(shape)}"
        )
    return spec


def output_spec(model: str, name: str) -> TensorSpec:
    """The declared output a requested output names."""
    spec = _OUTPUTS_BY_NAME.get(name)
    if spec is None:
        raise InvalidTensorError(
            f"model {model!r} has no output {name!r}; it gives {_list(OUTPUTS)}"
        )
    return spec


def _list(specs: Sequence[TensorSpec]) -> str:
    described = [spec.describe() for spec in specs]
    return ", ".join(described[:-1]) + " or " + described[-1]


FloatBatch = npt.NDArray[np.float32]
PixelBatch = npt.NDArray[np.uint8]
Decoded = FloatBatch | PixelBatch | list[bytes]
"""An input's values: FP32 [N, 1, 28, 28], UINT8 [N, 28, 28], or N byte strings."""


def element_count(shape: Sequence[int]) -> int:
    """How many elements a tensor of `shape` holds."""
    return math.prod(shape)


def from_raw(spec: TensorSpec, shape: Sequence[int], raw: bytes) -> Decoded:
    """An input's values from its raw bytes (little-endian, row-major; BYTES elements each a
    4-byte little-endian length and the bytes), checking the byte count against the shape."""
    count = element_count(shape)
    if spec.datatype == BYTES:
        return _split_bytes(spec, shape, raw, count)
    needed = count * _ITEM_SIZE[spec.datatype]
    if len(raw) != needed:
        raise InvalidTensorError(
            f"input {spec.name!r} ({spec.datatype} {format_shape(shape)}) needs {needed} bytes "
            f"of raw_input_contents, got {len(raw)}"
        )
    dtype = "<f4" if spec.datatype == FP32 else np.uint8
    return _checked(spec, np.frombuffer(raw, dtype=dtype).reshape(shape))


def from_values(
    spec: TensorSpec, shape: Sequence[int], values: Sequence[float] | Sequence[int] | list[bytes]
) -> Decoded:
    """An input's values from the typed `contents` field of its datatype, checking the count
    against the shape (and, for UINT8, that each value fits a byte)."""
    count = element_count(shape)
    if len(values) != count:
        raise InvalidTensorError(
            f"input {spec.name!r} ({spec.datatype} {format_shape(shape)}) needs {count} values "
            f"in contents.{contents_field(spec.datatype)}, got {len(values)}"
        )
    if spec.datatype == BYTES:
        return [bytes(item) for item in values]  # type: ignore[arg-type]
    if spec.datatype == UINT8:
        wide = np.asarray(values, dtype=np.int64)
        if wide.size and (int(wide.min()) < 0 or int(wide.max()) > 255):
            raise InvalidTensorError(
                f"input {spec.name!r} is UINT8: its values must be 0-255, got values from "
                f"{int(wide.min())} to {int(wide.max())}"
            )
        return wide.astype(np.uint8).reshape(shape)
    return _checked(spec, np.asarray(values, dtype=np.float32).reshape(shape))


def contents_field(datatype: str) -> str:
    """The `InferTensorContents` field that carries values of `datatype`."""
    return {FP32: "fp32_contents", UINT8: "uint_contents", BYTES: "bytes_contents"}[datatype]


def _checked(spec: TensorSpec, values: npt.NDArray[np.generic]) -> Decoded:
    if spec.datatype == FP32:
        floats: FloatBatch = values.astype(np.float32, copy=False)
        low, high = float(floats.min()), float(floats.max())
        if not (low >= 0.0 and high <= 1.0):  # NaN fails both
            raise InvalidTensorError(
                f"input {spec.name!r} takes values in [0, 1] (white ink on black), got values "
                f"from {low:g} to {high:g}"
            )
        return floats
    pixels: PixelBatch = values.astype(np.uint8, copy=False)
    return pixels


def _split_bytes(spec: TensorSpec, shape: Sequence[int], raw: bytes, count: int) -> list[bytes]:
    if count == 1 and len(raw) >= _LENGTH.size:  # the usual request: one file
        (length,) = _LENGTH.unpack_from(raw, 0)
        if length == len(raw) - _LENGTH.size:
            return [raw[_LENGTH.size :]]
    items: list[bytes] = []
    offset = 0
    view = memoryview(raw)
    while offset < len(raw) and len(items) < count:
        if offset + _LENGTH.size > len(raw):
            break
        (length,) = _LENGTH.unpack_from(raw, offset)
        offset += _LENGTH.size
        if offset + length > len(raw):
            raise InvalidTensorError(
                f"input {spec.name!r}: element {len(items)} of its raw_input_contents announces "
                f"{length} bytes, but only {len(raw) - offset} follow"
            )
        items.append(bytes(view[offset : offset + length]))
        offset += length
    if len(items) != count or offset != len(raw):
        raise InvalidTensorError(
            f"input {spec.name!r} ({spec.datatype} {format_shape(shape)}) needs {count} "
            f"length-prefixed elements in raw_input_contents, got {len(items)} and "
            f"{len(raw) - offset} bytes more"
        )
    return items


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """BYTES elements in the protocol's raw layout: each a 4-byte little-endian length, then
    the bytes."""
    return b"".join(_LENGTH.pack(len(item)) + item for item in items)


def classes(probabilities: FloatBatch, count: int) -> list[bytes]:
    """Triton's classification of each row: the `count` most probable classes as
    `"score:index"`, best first (ties to the lower index), the score printed as C++'s
    `std::to_string(float)` prints it (six decimals). Row-major, `len(probabilities) * k`
    items, where k is `count` capped at the number of classes."""
    k = min(count, probabilities.shape[1])
    order = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return [
        f"{float(row[index]):.6f}:{index}".encode()
        for row, indices in zip(probabilities, order, strict=True)
        for index in indices
    ]


CLASSIFICATION: Final = "classification"
"""The parameter of a requested output that asks for Triton's classification extension: the
number of most probable classes to answer with."""


def class_count(spec: TensorSpec, count: int) -> int:
    """A requested output's classification count, checked: `probabilities` only, at least 1
    (above the number of classes, every class is given)."""
    if spec.name != PROBABILITIES_NAME:
        raise InvalidTensorError(
            f"classification applies to output {PROBABILITIES_NAME!r} only, not {spec.name!r}"
        )
    if count < 1:
        raise InvalidTensorError(f"classification needs a class count of at least 1, got {count}")
    return count


class Output(NamedTuple):
    """One output tensor of an answer: its datatype, its shape and its values (an array for
    FP32 and INT64, the elements for BYTES). A tuple: made for every answer, it costs a third
    of a frozen dataclass."""

    datatype: str
    shape: list[int]
    values: npt.NDArray[np.float32] | npt.NDArray[np.int64] | list[bytes]

    def raw(self) -> bytes:
        """The values in the protocol's raw layout (little-endian; BYTES length-prefixed)."""
        if isinstance(self.values, list):
            return serialize_bytes(self.values)
        dtype = "<f4" if self.datatype == FP32 else "<i8"
        return self.values.astype(dtype, copy=False).tobytes()


def output(spec: TensorSpec, probabilities: FloatBatch, classification: int = 0) -> Output:
    """Output `spec` of a batch's probabilities [N, 10]: the probabilities, the labels, or,
    with a `classification` count (`class_count`), the most probable classes as BYTES."""
    n = len(probabilities)
    if classification:
        found = classes(probabilities, classification)
        return Output(BYTES, [n, len(found) // n], found)
    if spec.name == PROBABILITIES_NAME:
        return Output(FP32, [n, probabilities.shape[1]], probabilities)
    return Output(INT64, [n], probabilities.argmax(axis=1).astype(np.int64, copy=False))
