"""The robustness report (`python -m export robustness`): real MNIST test digits drawn the ways
people make digits, through the serving preprocessing, the shipped model and a real server."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image, ImageOps
from typer.testing import CliRunner

from export.__main__ import app
from export.evaluate import onnx_probabilities, open_session
from export.robustness import (
    MAX_PIXELS,
    VARIANTS,
    Variant,
    centre_line,
    format_table,
    predict_locally,
    predict_remotely,
    render,
    run_report,
)
from mnist_service.constants import WEIGHT_FILES
from mnist_service.engine.preprocess import preprocess

from .conftest import ServerProcess

ROOT = Path(__file__).resolve().parent.parent
CONVNET = ROOT / "weights" / WEIGHT_FILES["conv"]
SUBSET = 60
MIN_SUBSET_ACCURACY = 0.9
"""The drawings are seeded, so the run is deterministic; the bound is set by statistics all the
same: a variant at the full set's worst accuracy (97.5 %) errs 1.5 times on 60 images, and 6
errors or more happen with probability ~0.5 %, so the test fails on a broken variant, not on
an unlucky choice of images."""

Split = tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]]


def test_there_are_at_least_15_ways_besides_plain_mnist() -> None:
    names = [v.name for v in VARIANTS]
    assert names[0] == "mnist"
    assert len(set(names)) == len(names) >= 16


@pytest.mark.parametrize("variant", VARIANTS[1:], ids=lambda v: v.name)
def test_each_variant_is_a_seeded_image_file_that_shows_the_digit(
    variant: Variant, mnist_test_set: Split
) -> None:
    digit = mnist_test_set[0][0]
    data = render(variant, 0, digit, seed=0)
    assert data == render(variant, 0, digit, seed=0)
    assert data != render(variant, 0, digit, seed=1) or variant.name in _UNRANDOMISED
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data)))
    assert image.size != (28, 28) or variant.name == "inverted-28px"


_UNRANDOMISED = {"inverted-28px", "canvas-black", "canvas-white", "thumbnail-48px"}
"""Variants drawn without a random choice (no placement on a page, no noise)."""


def test_the_pens_trace_a_one_pixel_centre_line(mnist_test_set: Split) -> None:
    line = centre_line(mnist_test_set[0][1])  # a 2
    assert line.any()
    # One pixel wide: no 2x2 block of the line is full.
    blocks = line[:-1, :-1] & line[1:, :-1] & line[:-1, 1:] & line[1:, 1:]
    assert not blocks.any()


def test_pens_range_from_hairline_to_broad(mnist_test_set: Split) -> None:
    digit = mnist_test_set[0][0]
    by_name = {v.name: v for v in VARIANTS}

    def inked(name: str) -> int:
        data = render(by_name[name], 0, digit, 0)
        return int(np.count_nonzero(np.asarray(Image.open(io.BytesIO(data)).convert("L")) < 128))

    assert inked("felt-tip") > 4 * inked("hairline-pen") > 0


def test_report_on_a_subset_meets_the_bound_for_every_variant(mnist_test_set: Split) -> None:
    images, labels = mnist_test_set[0][:SUBSET], mnist_test_set[1][:SUBSET]
    rows = run_report([predict_locally(open_session(CONVNET))], images, labels)
    assert [row.variant for row in rows] == list(VARIANTS)
    for row in rows:
        assert row.total == SUBSET
        assert row.accuracy[0] >= MIN_SUBSET_ACCURACY, row.variant.name
    table = format_table(["convnet"], rows)
    assert table.count("\n") == len(VARIANTS) + 1
    assert "| `mnist` |" in table


async def test_the_server_answers_as_the_local_pipeline_does(
    mnist_test_set: Split, server: ServerProcess
) -> None:
    images = mnist_test_set[0][:12]
    files = [render(v, i, images[i], 0) for v in VARIANTS[::3] for i in range(len(images))]
    local = predict_locally(open_session(CONVNET))(files)[0]
    remote = await predict_remotely(server.address, files)
    np.testing.assert_array_equal(remote, local)


def test_command_prints_a_table_with_a_column_per_model() -> None:
    result = CliRunner().invoke(app, ["robustness", str(CONVNET), str(CONVNET), "--limit", "3"])
    assert result.exit_code == 0, result.output
    assert "Accuracy on 3 MNIST test images" in result.output
    lines = [line for line in result.output.splitlines() if line.startswith("| `")]
    assert len(lines) == len(VARIANTS)
    assert all(line.count(" %") == 2 for line in lines)


def test_views_both_gives_each_model_a_column_with_and_without_shifted_views(
    mnist_test_set: Split,
) -> None:
    result = CliRunner().invoke(
        app, ["robustness", str(CONVNET), "--limit", "3", "--views", "both"]
    )
    assert result.exit_code == 0, result.output
    assert "| mnist_convnet.onnx | mnist_convnet.onnx, one view |" in result.output

    images = mnist_test_set[0][:40]
    files = [render(v, i, images[i], 0) for v in VARIANTS[2:6] for i in range(len(images))]
    session = open_session(CONVNET)
    shifted, alone = predict_locally(session, views=(True, False))(files)
    np.testing.assert_array_equal(shifted, predict_locally(session)(files)[0])
    singles = np.concatenate([preprocess(f, max_pixels=MAX_PIXELS) for f in files])[:, None]
    np.testing.assert_array_equal(alone, onnx_probabilities(session, singles).argmax(axis=1))
    assert (shifted != alone).sum() < len(files) // 10  # the same model, read a little apart


def test_held_out_training_digits_replace_the_test_set() -> None:
    """`--held-out N` draws the last N training digits (for models trained without them)."""
    result = CliRunner().invoke(
        app, ["robustness", str(CONVNET), "--held-out", "20", "--limit", "3"]
    )
    assert result.exit_code == 0, result.output
    assert "Accuracy on 3 held-out MNIST training images (59980-59982)" in result.output
    assert sum(line.startswith("| `") for line in result.output.splitlines()) == len(VARIANTS)
    refused = CliRunner().invoke(
        app, ["robustness", str(CONVNET), "--held-out", "60000"], env={"COLUMNS": "200"}
    )
    assert refused.exit_code != 0
    assert "cannot hold out 60000 of 60000 training digits" in refused.output
