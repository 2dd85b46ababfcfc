"""Per-image preprocessing cost on one core, per input kind: the budgets of the real images.

    python -m bench.preprocess_speed                  # 64 test digits per kind, best of 5
    taskset -c 1 python -m bench.preprocess_speed --images 200 --json out.json

For each kind of `payloads.KINDS` it times, per image, what the server does before the model:
`open_image` (the header; for raw bytes and an MNIST-format PNG, the whole decode: `engine.png`),
the decode (the file's pixels as the server decodes them: a plain PNG inflated by zlib-ng and
unfiltered by Pillow, only the alpha channel of a transparent canvas; a JPEG at the reduced
scale the server asks for; or `open_image`'s), Pillow's own decode of the whole file at that
scale for reference (what a server that opens files with Pillow pays), and the whole of
`prepare` (decode, orientation, mode conversion, the ink map, the crop, the resize, the strokes
and the centring), and the model rows the image costs: its own view, and 4 more when that
reading is unsure (`views.unsure`, with the shipped ConvNet). "Ours" is `prepare` less the
server's decode: what the budgets of issue 20 are about. Each step is timed on each file
in turn, `--rounds` times; a file's time for a step is its best round, so a burst of noise
from the shared machine does not decide it, and "ours" is taken per file (its prepare less
its decode, both best of their rounds) before the median over the files. Not a test: nothing
asserts on the times.
"""

from __future__ import annotations

import io
import json
import platform
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Final

import numpy as np
import numpy.typing as npt
import typer
from PIL import Image

from export.evaluate import onnx_probabilities, open_session
from mnist_service.engine import png, preprocess
from mnist_service.engine.png import PngFile
from mnist_service.engine.preprocess import WORKING_SIDE, Prepared, open_image, prepare
from mnist_service.engine.views import SHIFTS, unsure
from training.data import load_mnist

from . import payloads
from .report import cpu_model

MAX_PIXELS = 16_777_216
WEIGHTS = Path(__file__).resolve().parents[1] / "weights" / "mnist_convnet.onnx"

app = typer.Typer(add_completion=False)


def _best_us(files: list[bytes], rounds: int) -> dict[str, npt.NDArray[np.float64]]:
    """Each step's time on each file in microseconds, the best of `rounds`: every round
    runs every step on one file before the next file, so the steps of a file share the
    machine's state of the moment."""
    best = {name: np.full(len(files), np.inf) for name in STEPS}
    for _ in range(rounds):
        for index, data in enumerate(files):
            for name, step in STEPS.items():
                start = time.perf_counter()
                step(data)
                elapsed = (time.perf_counter() - start) * 1e6
                best[name][index] = min(best[name][index], elapsed)
    return best


def _header(data: bytes) -> object:
    return open_image(data, MAX_PIXELS)


def _decode(data: bytes) -> object:
    """The decoder's share: the header, then the pixels the server decodes: a plain PNG's
    (only the alpha of a transparent canvas, `png.decode`), or Pillow's, at the scale `load`
    drafts JPEGs to (`open_image` alone for what it decodes itself)."""
    opened = open_image(data, MAX_PIXELS)
    if isinstance(opened, PngFile):
        return png.decode(opened, alpha_only=lambda alpha: True)
    if isinstance(opened, Image.Image):
        _pillow_load(opened)
    return opened


def _pillow_decode(data: bytes) -> object:
    """Pillow's decode of the whole file, at the scale `load` drafts JPEGs to."""
    if preprocess.is_raw(data):
        return data
    image = Image.open(io.BytesIO(data))
    _pillow_load(image)
    return image


def _pillow_load(image: Image.Image) -> None:
    if image.format in ("JPEG", "MPO"):
        image.draft("L", (WORKING_SIDE, WORKING_SIDE))
    image.load()


def _prepare(data: bytes) -> Prepared:
    return prepare(open_image(data, MAX_PIXELS))


STEPS: Final[dict[str, Callable[[bytes], object]]] = {
    "header": _header,
    "decode": _decode,
    "pillow": _pillow_decode,
    "total": _prepare,
}
"""What is timed on each file, by name."""


@app.command()
def main(
    images: Annotated[int, typer.Option(min=1, help="Test digits per kind.")] = 64,
    rounds: Annotated[int, typer.Option(min=1, help="Times per file; the best counts.")] = 5,
    kinds: Annotated[str, typer.Option(help="Comma-separated kinds.")] = ",".join(payloads.KINDS),
    json_out: Annotated[Path | None, typer.Option("--json", help="Also write JSON here.")] = None,
) -> None:
    """Print a table of per-image preprocessing times per input kind."""
    digits = load_mnist("test")[0][:images]
    session = open_session(WEIGHTS)
    rows = []
    for kind in kinds.split(","):
        files = [payloads.render(kind, digit, index) for index, digit in enumerate(digits)]
        best = _best_us(files, rounds)
        header, decode, pillow, total = (
            float(np.median(best[name])) for name in ("header", "decode", "pillow", "total")
        )
        ours = float(np.median(np.maximum(best["total"] - best["decode"], 0.0)))
        view_rows = _model_rows([_prepare(f) for f in files], session)
        rows.append(
            {
                "kind": kind,
                "bytes": statistics.median(len(f) for f in files),
                "header_us": round(header, 1),
                "decode_us": round(decode, 1),
                "pillow_decode_us": round(pillow, 1),
                "total_us": round(total, 1),
                "ours_us": round(ours, 1),
                "model_rows": view_rows,
            }
        )
    cpu = cpu_model()
    typer.echo(f"{cpu}; Python {platform.python_version()}; {images} images per kind\n")
    typer.echo(
        "| kind | bytes | header µs | decode µs | Pillow's decode µs | prepare in all µs"
        " | ours µs | model rows |"
    )
    typer.echo("|---|--:|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        typer.echo(
            f"| {row['kind']} | {row['bytes']:,.0f} | {row['header_us']:,.0f} |"
            f" {row['decode_us']:,.0f} | {row['pillow_decode_us']:,.0f} |"
            f" {row['total_us']:,.0f} | {row['ours_us']:,.0f} |"
            f" {row['model_rows']:.2f} |"
        )
    if json_out is not None:
        json_out.write_text(json.dumps({"cpu": cpu, "rows": rows}, indent=2) + "\n")


def _model_rows(prepared: list[Prepared], session: object) -> float:
    """The mean count of model rows an image costs the server (its views, `views.cascaded`)."""
    images = np.stack([p.image for p in prepared])
    recheck = unsure(onnx_probabilities(session, images)) & np.array([p.redrawn for p in prepared])
    return 1 + (len(SHIFTS) - 1) * float(recheck.mean())


if __name__ == "__main__":
    app()
