"""Facts about MNIST and the model contract, shared by serving, training and export.

Training and export import from here; serving never imports from them.
"""

from typing import Final, Literal

IMAGE_SIZE: Final = 28
"""MNIST images are IMAGE_SIZE x IMAGE_SIZE single-channel pixels."""

PIXELS: Final = IMAGE_SIZE * IMAGE_SIZE
"""784: also the length of a raw-pixel request body."""

PIXEL_MAX: Final = 255.0
"""Full scale of MNIST's 8-bit pixels: dividing by it gives the model's [0, 1] input."""

DIGIT_BOX: Final = 20
"""MNIST digits were scaled so their longer side fits this many pixels, then centred."""

NUM_CLASSES: Final = 10

MNIST_MEAN: Final = 0.1307
MNIST_STD: Final = 0.3081
"""Normalisation of [0, 1] pixels; applied inside the exported graph, never by clients."""

INPUT_NAME: Final = "image"
"""ONNX input: float32 [N, 1, 28, 28], values in [0, 1], white ink on black."""

PROBABILITIES_NAME: Final = "probabilities"
"""ONNX output: float32 [N, 10], softmax over the digits."""

LOGITS_NAME: Final = "logits"
"""Optional ONNX output: float32 [N, 10], pre-softmax scores."""

Architecture = Literal["mlp", "conv"]
ARCHITECTURES: Final[tuple[Architecture, ...]] = ("mlp", "conv")

WEIGHT_FILES: Final[dict[Architecture, str]] = {
    "mlp": "mnist_mlp.onnx",
    "conv": "mnist_convnet.onnx",
}
"""File names of the shipped ONNX models, inside the `weights/` folder."""

MODEL_NAMES: Final[dict[Architecture, str]] = {
    "mlp": "mnist_mlp",
    "conv": "mnist_convnet",
}
"""The models' names in the Open Inference Protocol (`inference.GRPCInferenceService`)."""

# Keys of the ONNX metadata_props written by export and reported by the server.
META_ARCHITECTURE: Final = "architecture"
META_TEST_ACCURACY: Final = "test_accuracy"
META_OPSET: Final = "opset"
META_SOURCE_SHA256: Final = "source_checkpoint_sha256"
META_CREATED: Final = "created"
