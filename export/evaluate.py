"""Accuracy and confusion matrix of an ONNX model on the MNIST test set, run with onnxruntime.

Only numpy, onnxruntime and Pillow are needed here: no torch.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from mnist_service.constants import INPUT_NAME, NUM_CLASSES, PROBABILITIES_NAME
from mnist_service.engine.preprocess import model_batch

BATCH_SIZE = 1000
PNG_DARK_CELL = 128
"""Cells shaded darker than this get white digits in the PNG confusion matrix."""


def open_session(model: Path | bytes) -> Any:
    """Open a CPU onnxruntime session for a model file or serialised model bytes."""
    source = str(model) if isinstance(model, Path) else model
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"])


def onnx_probabilities(session: Any, images: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """Run the model's ``probabilities`` output over model inputs in batches."""
    outputs = [
        session.run([PROBABILITIES_NAME], {INPUT_NAME: images[start : start + BATCH_SIZE]})[0]
        for start in range(0, images.shape[0], BATCH_SIZE)
    ]
    return np.concatenate(outputs).astype(np.float32, copy=False)


def confusion_matrix(
    labels: npt.NDArray[np.integer[Any]], predicted: npt.NDArray[np.integer[Any]]
) -> npt.NDArray[np.int64]:
    """Return the 10x10 matrix whose [true, predicted] entry counts test images."""
    flat = labels.astype(np.int64) * NUM_CLASSES + predicted.astype(np.int64)
    return np.bincount(flat, minlength=NUM_CLASSES**2).reshape(NUM_CLASSES, NUM_CLASSES)


@dataclass(frozen=True)
class Evaluation:
    """Accuracy of a model on a labelled set and its confusion matrix."""

    accuracy: float
    confusion: npt.NDArray[np.int64]

    @property
    def per_class_accuracy(self) -> npt.NDArray[np.float64]:
        """Recall of each digit: correct / images of that digit (NaN for an absent digit)."""
        totals = self.confusion.sum(axis=1)
        result = np.full(totals.shape, np.nan)
        np.divide(np.diag(self.confusion), totals, out=result, where=totals > 0)
        return result


def evaluate_session(
    session: Any, images: npt.NDArray[np.uint8], labels: npt.NDArray[np.uint8]
) -> Evaluation:
    """Evaluate an onnxruntime session on uint8 images and their labels."""
    return evaluate_probabilities(onnx_probabilities(session, model_batch(images)), labels)


def evaluate_probabilities(
    probabilities: npt.NDArray[np.float32], labels: npt.NDArray[np.uint8]
) -> Evaluation:
    """Score a model's probabilities [N, 10] against the labels."""
    predicted = probabilities.argmax(axis=1)
    return Evaluation(
        accuracy=float((predicted == labels).mean()),
        confusion=confusion_matrix(labels, predicted),
    )


def format_confusion(evaluation: Evaluation) -> str:
    """Render the confusion matrix and per-class accuracy as a plain-text table."""
    width = max(5, len(str(int(evaluation.confusion.max()))) + 1)
    header = "true\\pred" + "".join(f"{d:>{width}}" for d in range(NUM_CLASSES)) + "   acc %"
    lines = [header, "-" * len(header)]
    for digit, (row, acc) in enumerate(
        zip(evaluation.confusion, evaluation.per_class_accuracy, strict=True)
    ):
        cells = "".join(f"{int(v):>{width}}" for v in row)
        lines.append(f"{digit:>9}{cells}  {100 * acc:6.2f}")
    return "\n".join(lines)


def save_confusion_png(evaluation: Evaluation, path: Path, cell: int = 48) -> Path:
    """Draw the confusion matrix as a PNG heat map (log-scaled shading) with counts."""
    from PIL import Image, ImageDraw

    margin = cell
    size = margin + cell * NUM_CLASSES
    canvas = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(canvas)
    shade = np.log1p(evaluation.confusion) / np.log1p(max(1, int(evaluation.confusion.max())))
    for digit in range(NUM_CLASSES):
        centre = margin + cell * digit + cell // 2
        draw.text((centre, margin // 2), str(digit), fill="black", anchor="mm")
        draw.text((margin // 2, centre), str(digit), fill="black", anchor="mm")
    for true in range(NUM_CLASSES):
        for pred in range(NUM_CLASSES):
            level = int(255 * (1 - shade[true, pred]))
            box = (
                margin + cell * pred,
                margin + cell * true,
                margin + cell * (pred + 1),
                margin + cell * (true + 1),
            )
            draw.rectangle(box, fill=(level, level, 255), outline="grey")
            text_colour = "white" if level < PNG_DARK_CELL else "black"
            cell_centre = ((box[0] + box[2]) // 2, (box[1] + box[3]) // 2)
            draw.text(
                cell_centre,
                str(int(evaluation.confusion[true, pred])),
                fill=text_colour,
                anchor="mm",
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)
    return path
