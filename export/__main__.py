"""Command line of the export tools: ``python -m export onnx|evaluate|robustness ...``."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

import numpy as np
import typer

from mnist_service.constants import WEIGHT_FILES, Architecture

if TYPE_CHECKING:
    from export.robustness import Row
    from training.data import Split

Views = Literal["shifted", "single", "both"]
VIEW_MODES: Final[dict[Views, tuple[bool, ...]]] = {
    "shifted": (True,),
    "single": (False,),
    "both": (True, False),
}
"""`--views`: for each column of a model, whether it averages over the shifted views."""

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


@app.command("robustness")
def robustness_command(
    models: Annotated[list[Path], typer.Argument(help="One or more exported ONNX models.")],
    address: Annotated[
        str | None,
        typer.Option("--address", help="Also classify through the server at HOST:PORT (a column)."),
    ] = None,
    limit: Annotated[
        int | None, typer.Option("--limit", min=1, help="Only the first N test images.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the random drawing choices.")] = 0,
    jobs: Annotated[int, typer.Option(min=1, help="Worker processes (parts of the set).")] = 1,
    held_out: Annotated[
        int | None,
        typer.Option(
            "--held-out",
            min=1,
            help="Draw the last N training digits instead of the test set: for models trained"
            " with `python -m training --holdout N`, to decide on a recipe without the test set.",
        ),
    ] = None,
    views: Annotated[
        Views,
        typer.Option(
            help="Classify redrawn digits over the server's shifted views (its default), as"
            " the preprocessed image alone (the server's --no-shift-views), or both (two"
            " columns per model).",
        ),
    ] = "shifted",
    data_dir: DataDir = None,
) -> None:
    """Accuracy on the MNIST test digits drawn in many real-world ways (a Markdown table).

    Each variant goes through the serving preprocessing and each model, and through the server
    too with --address.
    """
    from concurrent.futures import ProcessPoolExecutor

    from export.robustness import format_table, merge
    from training.data import held_out_start, load_mnist

    split: Split = "test" if held_out is None else "train"
    labels = load_mnist(split, data_dir)[1]
    first = 0
    if held_out is not None:
        try:
            first = held_out_start(labels.shape[0], held_out)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--held-out") from error
    count = labels[first:][:limit].shape[0]
    parts = np.array_split(np.arange(first, first + count), jobs)
    modes = VIEW_MODES[views]
    tasks = [
        (models, address, split, int(p[0]), int(p[-1]) + 1, seed, data_dir, modes) for p in parts
    ]
    if jobs == 1:
        rows = _robustness_part(*tasks[0])
    else:
        with ProcessPoolExecutor(jobs) as pool:
            rows = merge(list(pool.map(_robustness_part, *zip(*tasks, strict=True))))
    columns = [
        model.name if shifted or len(modes) == 1 else f"{model.name}, one view"
        for model in models
        for shifted in modes
    ]
    if address is not None:
        columns.append(f"server {address}")
    if held_out is None:
        typer.echo(f"Accuracy on {count} MNIST test images, seed {seed}:\n")
    else:
        typer.echo(
            f"Accuracy on {count} held-out MNIST training images"
            f" ({first}-{first + count - 1}), seed {seed}:\n"
        )
    typer.echo(format_table(columns, rows))


def _robustness_part(
    models: list[Path],
    address: str | None,
    split: Split,
    start: int,
    stop: int,
    seed: int,
    data_dir: Path | None,
    modes: tuple[bool, ...] = (True,),
) -> list[Row]:
    """The report on the split's images start..stop-1 (one worker's share)."""
    from export.evaluate import open_session
    from export.robustness import Predict, predict_locally, predict_through, run_report
    from training.data import load_mnist

    images, labels = load_mnist(split, data_dir)
    sessions = [open_session(m) for m in models]
    classifiers: list[Predict] = [predict_locally(*sessions, views=modes)]
    if address is not None:
        classifiers.append(predict_through(address))
    return run_report(classifiers, images[start:stop], labels[start:stop], seed=seed, first=start)


def _architecture(name: str) -> Architecture:
    if name == "mlp":
        return "mlp"
    if name == "conv":
        return "conv"
    raise typer.BadParameter(f"{name!r}: expected mlp or conv", param_hint="--arch")


if __name__ == "__main__":
    app()
