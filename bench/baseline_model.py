"""What both baselines do per call, written once so they do exactly the same work.

Decode naively and run onnxruntime once on one intra-op thread. 784 bytes are raw pixels;
anything else is decoded by Pillow in full (any format it reads: PNG, JPEG...), converted to
8-bit grey with `convert("L")` (an alpha channel is dropped, so black strokes on a transparent
canvas become an all-black image), resized to 28x28 with Pillow's bicubic filter and scaled to
0-1. No inversion, no cropping or centring, no reduced-size JPEG decoding: the baselines do
less than mnist-service does, and answer wrong on most files that are not MNIST format.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnxruntime as ort
from PIL import Image


def load_session(model: str) -> ort.InferenceSession:
    """The model on the CPU with one intra-op thread, as mnist-service's workers run it."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    return ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])


def to_input(data: bytes) -> np.ndarray[Any, np.dtype[np.float32]]:
    """784 raw bytes or an image file -> float32 [1, 1, 28, 28] in [0, 1]."""
    if len(data) == 28 * 28:
        pixels = np.frombuffer(data, np.uint8)
    else:
        image = Image.open(io.BytesIO(data)).convert("L")
        # Bicubic is Pillow's default for resize; named, so the docs stay true.
        pixels = np.asarray(image.resize((28, 28), Image.Resampling.BICUBIC))
    return (pixels.astype(np.float32) / 255.0).reshape(1, 1, 28, 28)


def predict(session: ort.InferenceSession, data: bytes) -> tuple[int, list[float]]:
    """One image's label and probabilities."""
    (probabilities,) = session.run(["probabilities"], {"image": to_input(data)})
    return int(probabilities[0].argmax()), probabilities[0].tolist()
