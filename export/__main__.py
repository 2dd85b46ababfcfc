"""Command line of the export tools: ``python -m export onnx|evaluate|robustness ...``."""

from __future__ import annotations

import functools
import logging
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Final, Literal

import numpy as np
import typer

from mnist_service.constants import WEIGHT_FILES, Architecture

if TYPE_CHECKING:
    from export.baseline import Baseline
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
    variants: Annotated[
        str | None,
        typer.Option(
            "--variants",
            metavar="NAME[,NAME...]",
            help="Only these rows, by variant name (e.g. mnist,fine-pen,fat-marker); all by"
            " default.",
        ),
    ] = None,
    baseline: Annotated[
        str | None,
        typer.Option(
            "--baseline",
            metavar="REF",
            help="Compare MODEL with a baseline on the same drawings: an .onnx file (read with"
            " the current preprocessing), or a commit of this repository (its preprocessing and"
            " its weights/<MODEL's name>, as its server read them). Each row gets the paired"
            " change and its standard error; the command exits with 1 when a row fell by more"
            " than 2 standard errors.",
        ),
    ] = None,
    data_dir: DataDir = None,
) -> None:
    """Accuracy on the MNIST test digits drawn in many real-world ways (a Markdown table).

    Each variant goes through the serving preprocessing and each model, and through the server
    too with --address. With --baseline REF it is a non-regression gate: exit status 1 when
    any row is worse than the baseline's by more than 2 standard errors.
    """
    from concurrent.futures import ProcessPoolExecutor

    from export.baseline import BaselineError, open_baseline
    from export.robustness import compare, format_comparison, format_table, merge
    from training.data import held_out_start, load_mnist

    names = None if variants is None else _variant_names(variants)
    if baseline is not None and (len(models) != 1 or address is not None or views == "both"):
        raise typer.BadParameter(
            "compares one MODEL, without --address or --views both", param_hint="--baseline"
        )

    split: Split = "test" if held_out is None else "train"
    labels = load_mnist(split, data_dir)[1]
    first = 0
    if held_out is not None:
        try:
            first = held_out_start(labels.shape[0], held_out)
        except ValueError as error:
            raise typer.BadParameter(str(error), param_hint="--held-out") from error
    count = labels[first:][:limit].shape[0]
    parts = np.array_split(np.arange(first, first + count), min(jobs, count))
    modes = VIEW_MODES[views]
    try:
        with ExitStack() as stack:
            reference = None
            if baseline is not None:
                reference = stack.enter_context(open_baseline(baseline, models[0].name))
            run_part = functools.partial(
                _robustness_part,
                models,
                address,
                split,
                seed=seed,
                data_dir=data_dir,
                modes=modes,
                names=names,
                baseline=reference,
            )
            starts, stops = [int(p[0]) for p in parts], [int(p[-1]) + 1 for p in parts]
            if len(parts) == 1:
                rows = run_part(starts[0], stops[0])
            else:
                with ProcessPoolExecutor(len(parts)) as pool:
                    rows = merge(list(pool.map(run_part, starts, stops)))
    except BaselineError as error:
        raise typer.BadParameter(str(error), param_hint="--baseline") from error
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
    if reference is None:
        typer.echo(format_table(columns, rows))
        return
    shifted = modes[0] and reference.views
    typer.echo(
        f"Baseline: {reference.description}, "
        + (
            ("over the shifted views, " + ("when unsure" if reference.cascade else "always"))
            if shifted
            else "one view"
        )
        + (" (it had no shifted views)" if modes[0] and not shifted else "")
        + ".\n"
    )
    typer.echo(format_comparison((columns[0], reference.label), rows))
    regressed = [r.variant.name for r in rows if compare(r.outcomes[0], r.outcomes[1]).regressed]
    if not regressed:
        typer.echo("\nNo row fell by more than 2 standard errors of its paired change.")
        return
    typer.echo(
        f"\nRegressed ({len(regressed)} of {len(rows)} rows fell by more than 2 standard errors"
        " of their paired change): " + ", ".join(f"`{name}`" for name in regressed)
    )
    raise typer.Exit(1)


def _robustness_part(
    models: list[Path],
    address: str | None,
    split: Split,
    start: int,
    stop: int,
    seed: int,
    data_dir: Path | None,
    modes: tuple[bool, ...] = (True,),
    names: tuple[str, ...] | None = None,
    baseline: Baseline | None = None,
) -> list[Row]:
    """The report on the split's images start..stop-1 (one worker's share), on the variants
    named (all by default); with a baseline, its column follows the (one) model's."""
    from export.baseline import PreprocessWorker, predict_at_commit
    from export.evaluate import open_session
    from export.robustness import (
        MAX_PIXELS,
        VARIANTS,
        Predict,
        predict_locally,
        predict_through,
        run_report,
    )
    from training.data import load_mnist

    images, labels = load_mnist(split, data_dir)
    by_name = {v.name: v for v in VARIANTS}
    chosen = VARIANTS if names is None else tuple(by_name[n] for n in names)
    sessions = [open_session(m) for m in models]
    with ExitStack() as stack:
        if baseline is not None and baseline.tree is None:  # a weights file: same preprocessing
            sessions.append(open_session(baseline.weights))
        classifiers: list[Predict] = [predict_locally(*sessions, views=modes)]
        if baseline is not None and baseline.tree is not None:
            worker = stack.enter_context(
                PreprocessWorker(baseline.tree, MAX_PIXELS, baseline.label)
            )
            shifted = modes[0] and baseline.views
            session = open_session(baseline.weights)
            classifiers.append(
                predict_at_commit(worker, session, shifted=shifted, cascade=baseline.cascade)
            )
        if address is not None:
            classifiers.append(predict_through(address))
        return run_report(
            classifiers, images[start:stop], labels[start:stop], chosen, seed=seed, first=start
        )


def _variant_names(text: str) -> tuple[str, ...]:
    """`--variants`: the names, checked, in the order given, each once."""
    from export.robustness import VARIANTS

    names = tuple(dict.fromkeys(n.strip() for n in text.split(",") if n.strip()))
    known = [v.name for v in VARIANTS]
    unknown = [n for n in names if n not in known]
    if unknown or not names:
        raise typer.BadParameter(
            f"unknown {', '.join(unknown) or 'empty list'}; the variants are {', '.join(known)}",
            param_hint="--variants",
        )
    return names


def _architecture(name: str) -> Architecture:
    if name == "mlp":
        return "mlp"
    if name == "conv":
        return "conv"
    raise typer.BadParameter(f"{name!r}: expected mlp or conv", param_hint="--arch")


if __name__ == "__main__":
    app()
