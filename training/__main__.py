"""Command line of training: ``python -m training --arch conv|mlp|all ...``.

Trains with the defaults of ``training.train.DEFAULTS`` (or the options given) and saves a .pt
checkpoint per architecture in ``--checkpoint-dir``. Making ONNX of one, with its parity and
accuracy checks, is export's job: ``python -m export onnx CHECKPOINT --arch ARCH``, and
``nox -s train`` runs both. export builds on training (its networks, pen strokes and data), so
training never imports export.
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

SHIPPED = Path("checkpoints")
"""Where the checkpoints that the shipped weights are exported from go (`nox -s train`)."""
DRY_RUN_IMAGES = 2048
DRY_RUN_EPOCHS = 1


@app.command()
def main(
    arch: Annotated[str, typer.Option(help="conv, mlp or all.")] = "all",
    epochs: Annotated[int | None, typer.Option(min=1, help="Default: per architecture.")] = None,
    batch_size: Annotated[int | None, typer.Option(min=1)] = None,
    lr: Annotated[float | None, typer.Option(help="Peak learning rate of OneCycle.")] = None,
    seed: Annotated[int, typer.Option()] = DEFAULT_SEED,
    checkpoint_dir: Annotated[Path, typer.Option(help="Where .pt checkpoints go.")] = SHIPPED,
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
            " Needs a --checkpoint-dir other than checkpoints/.",
        ),
    ] = None,
    dry_run: Annotated[
        bool, typer.Option(help=f"One epoch on {DRY_RUN_IMAGES} images: checks the pipeline.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show progress bars.")] = True,
) -> None:
    """Train MNIST models on the real data set and save their checkpoints."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    from training.augment import NO_AUGMENTATION
    from training.train import DEFAULTS, configure_threads, save_checkpoint, train

    if holdout is not None and checkpoint_dir.resolve() == SHIPPED.resolve():
        raise typer.BadParameter(
            "a run with digits held out does not make shipped weights",
            param_hint="--checkpoint-dir",
        )
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
        # The shipped checkpoints export to weights/ (export's default); others beside them.
        shipped = checkpoint_dir.resolve() == SHIPPED.resolve()
        output = "" if shipped else f" --output {checkpoint_dir / WEIGHT_FILES[name]}"
        typer.echo(
            f"{name}: trained in {result.seconds:.0f} s, test accuracy "
            f"{100 * result.test_accuracy:.2f}% (PyTorch); checkpoint {checkpoint}; "
            f"to ONNX: python -m export onnx {checkpoint} --arch {name}{output}"
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
