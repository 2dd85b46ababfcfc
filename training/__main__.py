"""Command line of training: ``python -m training --arch conv|mlp|all ...``.

Trains with the defaults of ``training.train.DEFAULTS`` (or the options given), saves a .pt
checkpoint, then exports it to ONNX in ``--output-dir`` with the checks of ``export``.
"""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path
from typing import Annotated

import typer

from mnist_service.constants import ARCHITECTURES, WEIGHT_FILES, Architecture
from training.train import DEFAULT_SEED

app = typer.Typer(add_completion=False, help=__doc__)

SHIPPED = Path("weights")
DRY_RUN_IMAGES = 2048
DRY_RUN_EPOCHS = 1


@app.command()
def main(
    arch: Annotated[str, typer.Option(help="conv, mlp or all.")] = "all",
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: per architecture.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of OneCycle.")] = None,
    seed: Annotated[int, typer.Option()] = DEFAULT_SEED,
    output_dir: Annotated[Path, typer.Option(help="Where the ONNX models go.")] = SHIPPED,
    checkpoint_dir: Annotated[Path, typer.Option(help="Where .pt checkpoints go.")] = Path(
        "checkpoints"
    ),
    data_dir: Annotated[
        Path | None,
        typer.Option(
            help="MNIST IDX folder. Default: $MNIST_DATA_DIR or ~/.cache/mnist-service/mnist."
        ),
    ] = None,
    augment: Annotated[
        bool, typer.Option("--augment/--no-augment", help="Augment training batches.")
    ] = True,
    threads: Annotated[int | None, typer.Option(min=1, help="Default: all usable cores.")] = None,
    holdout: Annotated[
        int | None,
        typer.Option(
            min=1,
            help="Leave the last N training digits out, to score recipes on them with"
            " `python -m export robustness --held-out N` instead of on the test set."
            " Needs an --output-dir other than weights/.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help=f"One epoch on {DRY_RUN_IMAGES} images: checks the pipeline.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train MNIST models on the real data set, save checkpoints and export them to ONNX."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from export.onnx_export import export_checkpoint, quiet_exporter_logs
    from training.augment import NO_AUGMENTATION
    from training.train import DEFAULTS, configure_threads, save_checkpoint, train

    if holdout is not None and output_dir.resolve() == SHIPPED.resolve():
        raise typer.BadParameter(
            "a run with digits held out does not make shipped weights", param_hint="--output-dir"
        )
    quiet_exporter_logs()
    architectures = _architectures(arch)
    configure_threads(threads)
    for name in architectures:
        config = replace(DEFAULTS[name], seed=seed)
        if epochs is not None:
            config = replace(config, epochs=epochs)
        if batch_size is not None:
            config = replace(config, batch_size=batch_size)
        if lr is not None:
            config = replace(config, lr=lr)
        if not augment:
            config = replace(config, augment=NO_AUGMENTATION)
        if holdout is not None:
            config = replace(config, train_holdout=holdout)
        if dry_run:
            config = replace(config, epochs=DRY_RUN_EPOCHS, train_limit=DRY_RUN_IMAGES)
        result = train(name, config, data_dir, show_progress=progress)
        checkpoint = save_checkpoint(result.model, checkpoint_dir / f"mnist_{name}.pt")
        report = export_checkpoint(checkpoint, name, output_dir / WEIGHT_FILES[name], data_dir)
        typer.echo(
            f"{name}: trained in {result.seconds:.0f} s, test accuracy "
            f"{100 * result.test_accuracy:.2f}% (PyTorch), "
            f"{100 * report.evaluation.accuracy:.2f}% (onnxruntime); checkpoint {checkpoint}; "
            f"ONNX {report.output} sha256 {report.sha256}; parity max abs diff "
            f"{report.parity.max_abs_diff:.3g}"
        )


def _architectures(name: str) -> tuple[Architecture, ...]:
    if name == "all":
        return ARCHITECTURES
    for candidate in ARCHITECTURES:
        if candidate == name:
            return (candidate,)
    raise typer.BadParameter(f"{name!r}: expected conv, mlp or all", param_hint="--arch")


if __name__ == "__main__":
    app()
