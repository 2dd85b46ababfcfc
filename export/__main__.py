"""Command line of the export tools: ``python -m export onnx|evaluate ...``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Annotated

import typer

from mnist_service.constants import WEIGHT_FILES, Architecture

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)

DataDir = Annotated[
    Path | None,
    typer.Option(
        "--data-dir",
        help="Folder with the MNIST IDX files (fetched there if missing). "
        "Default: $MNIST_DATA_DIR or ~/.cache/mnist-service/mnist.",
    ),
]


@app.callback()
def _configure(verbose: Annotated[bool, typer.Option("--verbose", "-v")] = False) -> None:
    """Export trained MNIST networks to ONNX and evaluate ONNX models."""
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )


@app.command("onnx")
def onnx_command(
    checkpoint: Annotated[
        Path, typer.Argument(help="A .pt state dict or .safetensors file (fc1..., conv2d_1...).")
    ],
    arch: Annotated[str, typer.Option("--arch", help="mlp or conv.")],
    output: Annotated[Path | None, typer.Option("--output", "-o")] = None,
    data_dir: DataDir = None,
    opset: Annotated[int, typer.Option(min=17)] = 18,
) -> None:
    """Export a checkpoint to ONNX, checked for parity and accuracy, with metadata."""
    from export.onnx_export import export_checkpoint, quiet_exporter_logs

    quiet_exporter_logs()
    architecture = _architecture(arch)
    target = output or Path("weights") / WEIGHT_FILES[architecture]
    report = export_checkpoint(checkpoint, architecture, target, data_dir, opset)
    typer.echo(
        f"{report.output}: sha256 {report.sha256}, test accuracy "
        f"{100 * report.evaluation.accuracy:.2f}% (onnxruntime, 10,000 images), parity max abs "
        f"diff {report.parity.max_abs_diff:.3g} on {report.parity.images} images"
    )


@app.command("evaluate")
def evaluate_command(
    model: Annotated[Path, typer.Argument(help="An exported ONNX model.")],
    data_dir: DataDir = None,
    png: Annotated[
        Path | None, typer.Option("--png", help="Also draw the confusion matrix to this PNG.")
    ] = None,
) -> None:
    """Print an ONNX model's accuracy on the 10k MNIST test set and its confusion matrix."""
    from export.evaluate import evaluate_session, format_confusion, open_session, save_confusion_png
    from training.data import load_mnist

    images, labels = load_mnist("test", data_dir)
    evaluation = evaluate_session(open_session(model), images, labels)
    typer.echo(
        f"{model}: accuracy {100 * evaluation.accuracy:.2f}% on {labels.shape[0]} test images"
    )
    typer.echo(format_confusion(evaluation))
    if png is not None:
        typer.echo(f"confusion matrix drawn to {save_confusion_png(evaluation, png)}")


def _architecture(name: str) -> Architecture:
    if name == "mlp":
        return "mlp"
    if name == "conv":
        return "conv"
    raise typer.BadParameter(f"{name!r}: expected mlp or conv", param_hint="--arch")


if __name__ == "__main__":
    app()
