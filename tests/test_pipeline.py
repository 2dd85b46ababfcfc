"""The pipeline in front of the batcher: admission control (`--max-queue`) and deadlines."""

from __future__ import annotations

import asyncio
import io
import re
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import numpy.typing as npt
import pytest
from PIL import Image

from mnist_service.engine.batcher import Batcher
from mnist_service.engine.pipeline import Admission, Pipeline
from mnist_service.engine.preprocess import preprocess
from mnist_service.engine.views import unsure
from mnist_service.errors import DeadlineExpiredError, EmptyImageError, OverloadedError

from .test_batcher import RecordingClassifier
from .test_service import raw_image
from .waiting import eventually


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


async def test_work_past_max_queue_is_refused_at_once_and_slots_come_back(
    executor: ThreadPoolExecutor,
) -> None:
    gate = threading.Event()
    batcher = Batcher(RecordingClassifier(gate=gate), max_batch_size=8, executor=executor)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor, max_queue=4)

    admitted = [pipeline.start(raw_image(n)) for n in range(1, 5)]
    refused = pipeline.start(raw_image(5))
    with pytest.raises(OverloadedError, match="4 images waiting"):
        await pipeline.classify_many([raw_image(6), raw_image(7)])
    assert pipeline.pending == 4
    assert refused.done()
    assert isinstance(refused.exception(), OverloadedError)

    gate.set()
    await asyncio.gather(*admitted)

    assert pipeline.pending == 0
    assert len(await pipeline.classify_many([raw_image(1), raw_image(2)])) == 2
    assert pipeline.pending == 0


async def test_the_versions_of_a_model_share_its_max_queue(executor: ThreadPoolExecutor) -> None:
    """Two versions of one model (a swap: the old one still finishing its calls) hold no more
    than `--max-queue` together: their pipelines share the model's `Admission`."""
    gate = threading.Event()
    admission = Admission(max_queue=4)
    old, new = (
        Pipeline(
            Batcher(RecordingClassifier(gate=gate), max_batch_size=8, executor=executor),
            max_image_pixels=1 << 20,
            executor=executor,
            admission=admission,
        )
        for _ in range(2)
    )

    admitted = [old.start(raw_image(n)) for n in range(1, 4)]
    admitted.append(new.start(raw_image(4)))
    refused = new.start(raw_image(5))
    assert isinstance(refused.exception(), OverloadedError)
    assert old.pending == new.pending == admission.pending == 4

    gate.set()
    await asyncio.gather(*admitted)
    assert admission.pending == 0


async def test_a_bad_image_gives_its_slot_back_at_once(executor: ThreadPoolExecutor) -> None:
    batcher = Batcher(RecordingClassifier(), max_batch_size=8, executor=executor)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor, max_queue=1)

    bad = pipeline.start(b"")
    good = await pipeline.classify(raw_image(3))

    assert isinstance(bad.exception(), ValueError)
    assert good.shape == (10,)  # not refused: the bad image gave its one slot back
    assert pipeline.pending == 0


async def test_an_expired_deadline_is_refused_before_preprocessing(
    executor: ThreadPoolExecutor,
) -> None:
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=8, executor=executor)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor, max_queue=4)
    past = time.monotonic() - 1

    expired = pipeline.start(b"not even an image", past)  # refused before decoding is tried
    with pytest.raises(DeadlineExpiredError):
        await pipeline.classify_many([raw_image(1), raw_image(2)], past)
    in_time = await pipeline.classify(raw_image(3), time.monotonic() + 30)

    assert isinstance(expired.exception(), DeadlineExpiredError)
    assert in_time.shape == (10,)
    assert [len(batch) for batch in model.batches] == [1]  # only the call in time
    assert pipeline.pending == 0


async def test_big_images_waiting_for_the_decode_pool_are_bounded_in_bytes(
    executor: ThreadPoolExecutor,
) -> None:
    photo = _photo()  # over 320x320: decoded in the pool, not inline
    gate = threading.Event()
    executor.submit(gate.wait, 10)  # the pool's one thread is busy until the gate opens
    batcher = Batcher(RecordingClassifier(), max_batch_size=8)  # the model runs inline
    pipeline = Pipeline(
        batcher,
        max_image_pixels=1 << 22,
        executor=executor,
        max_decode_bytes=3 * len(photo),
    )

    waiting = [pipeline.start(photo) for _ in range(3)]
    refused = pipeline.start(photo)
    with pytest.raises(OverloadedError, match="bytes of big images waiting"):
        await pipeline.classify_many([photo])
    small = await pipeline.classify(raw_image(2))  # small images never wait for the pool

    assert isinstance(refused.exception(), OverloadedError)
    assert small.shape == (10,)
    gate.set()
    assert all(r.shape == (1, 10) for r in await asyncio.gather(*waiting))
    assert len(await pipeline.classify_many([photo, photo])) == 2  # the budget came back
    assert pipeline.pending == 0


def _photo() -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("L", (400, 400), 255)
    ImageDraw.Draw(image).line([(200, 60), (200, 340)], fill=0, width=30)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


class PixelEcho:
    """Answers each image with ten of its own pixels: any mix-up of images or rows shows."""

    info = RecordingClassifier.info

    def classify(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(batch.reshape(len(batch), -1)[:, 300:310])


async def test_classify_many_answers_each_item_as_classify_does(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
) -> None:
    digits = mnist_test_set[0][:40]
    png = io.BytesIO()
    Image.fromarray(255 - digits[1]).save(png, "PNG")
    mnist_pngs = [_png(digit) for digit in digits[5:25]]
    blank_png = _png(np.zeros((28, 28), np.uint8))
    mixes = {  # items, and how many of them fail (blank, empty)
        "all raw": ([d.tobytes() for d in digits], 0),
        "MNIST-format PNGs, one blank, one inverted": (
            [*mnist_pngs[:10], blank_png, png.getvalue(), *mnist_pngs[10:]],
            1,
        ),
        "PNGs and raw": ([*mnist_pngs[:3], digits[6].tobytes(), blank_png, bytes(784)], 2),
        "raw, inverted raw, png, blank and empty": (
            [
                digits[2].tobytes(),
                (255 - digits[3]).tobytes(),
                png.getvalue(),
                bytes(784),
                b"",
                digits[4].tobytes(),
            ],
            2,
        ),
    }
    pipeline = Pipeline(
        Batcher(PixelEcho(), max_batch_size=16), max_image_pixels=1 << 20, executor=executor
    )
    for items, failures in mixes.values():
        results = await pipeline.classify_many(items)
        assert len(results) == len(items)
        for item, result in zip(items, results, strict=True):
            if isinstance(result, np.ndarray):
                np.testing.assert_array_equal(result, await pipeline.classify(item))
            else:
                with pytest.raises(type(result), match=re.escape(str(result))):
                    await pipeline.classify(item)
        assert sum(isinstance(r, Exception) for r in results) == failures


async def test_start_many_answers_each_item_as_start_does(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
) -> None:
    digits = mnist_test_set[0][:30]
    drawing = np.full((60, 90), 255, np.uint8)
    drawing[15:45, 40:48] = 0  # a dark "1" on white paper: redrawn
    items = [
        *(_png(digit) for digit in digits[:12]),
        _png(255 - digits[12]),  # inverted: redrawn
        _png(np.zeros((28, 28), np.uint8)),  # blank
        b"",
        b"not an image",
        _png(drawing),
        bytes(784),  # blank raw pixels
        *(digit.tobytes() for digit in digits[13:]),
    ]
    # A batch size under the number of MNIST-format items: their one submission is split.
    batcher = Batcher(PixelEcho(), max_batch_size=8)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor)

    futures = pipeline.start_many(items)
    outcomes = await asyncio.gather(*futures, return_exceptions=True)

    assert pipeline.pending == 0
    executions = batcher.stats.executions
    for item, outcome in zip(items, outcomes, strict=True):
        if isinstance(outcome, np.ndarray):
            assert outcome.shape == (1, 10)
            np.testing.assert_array_equal(outcome, await pipeline.start(item))
        else:
            assert isinstance(outcome, Exception)
            with pytest.raises(type(outcome), match=re.escape(str(outcome))):
                await pipeline.start(item)
    assert sum(isinstance(outcome, Exception) for outcome in outcomes) == 4
    # Together, the 29 MNIST-format items rode in 4 model runs of at most 8, and the 2
    # redrawn ones took one or two runs each (their shifted views); one at a time, each item
    # took its own.
    assert executions <= 4 + 2 * 2
    assert batcher.stats.executions - executions >= 29 + 2


async def test_start_many_past_max_queue_refuses_the_images_that_do_not_fit(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
) -> None:
    gate = threading.Event()
    batcher = Batcher(RecordingClassifier(gate=gate), max_batch_size=8, executor=executor)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor, max_queue=4)
    held = [pipeline.start(raw_image(n)) for n in range(1, 3)]
    digits = [_png(digit) for digit in mnist_test_set[0][:3]]

    futures = pipeline.start_many([digits[0], b"", digits[1], b"not an image", digits[2]])

    # Item by item, as `start` would: the first PNG takes a place; the empty one takes one and
    # gives it back as it fails; the second PNG takes the last place; the rest are refused
    # before they are read (a file that is no image too).
    assert not futures[0].done()
    assert isinstance(futures[1].exception(), EmptyImageError)
    assert not futures[2].done()
    assert all(isinstance(future.exception(), OverloadedError) for future in futures[3:])
    assert pipeline.pending == 4
    gate.set()
    answers = await asyncio.gather(*held, futures[0], futures[2])
    assert [answer.shape for answer in answers] == [(1, 10)] * 4
    assert pipeline.pending == 0
    assert len(await asyncio.gather(*pipeline.start_many([raw_image(1)] * 4))) == 4
    assert pipeline.pending == 0


async def test_a_failed_model_run_fails_every_image_that_went_together(
    executor: ThreadPoolExecutor,
) -> None:
    batcher = Batcher(RecordingClassifier(fail_on=255), max_batch_size=8)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 20, executor=executor)

    futures = pipeline.start_many([raw_image(n) for n in range(1, 4)])

    outcomes = await asyncio.gather(*futures, return_exceptions=True)
    assert [str(outcome) for outcome in outcomes] == ["model run failed"] * 3
    assert pipeline.pending == 0


def _png(pixels: npt.NDArray[np.uint8]) -> bytes:
    file = io.BytesIO()
    Image.fromarray(pixels).save(file, "PNG")
    return file.getvalue()


class MiddleRow:
    """Answers each image with ten pixels of its middle row, where a digit has ink."""

    info = RecordingClassifier.info

    def classify(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        return np.ascontiguousarray(batch[:, 0, 14, 9:19])


def _by_hand(image: npt.NDArray[np.float32]) -> list[npt.NDArray[np.float32]]:
    """A [28, 28] image and its copies one pixel up, down, left and right (black comes in)."""
    copies = [np.zeros_like(image) for _ in range(4)]
    copies[0][:27], copies[1][1:] = image[1:], image[:27]
    copies[2][:, :27], copies[3][:, 1:] = image[:, 1:], image[:, :27]
    return [image, *copies]


@pytest.mark.parametrize("shift_views", [True, False])
async def test_an_unsure_redrawn_image_is_read_as_the_mean_over_its_shifted_copies(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    shift_views: bool,
) -> None:
    """Inline, in the decode pool and in `classify_many` alike; MNIST format is read once.
    The model's answers (pixels of the middle row) are never a sure reading."""
    digit = mnist_test_set[0][0]
    model = MiddleRow()
    batcher = Batcher(model, max_batch_size=64)
    pipeline = Pipeline(
        batcher, max_image_pixels=1 << 22, executor=executor, shift_views=shift_views
    )
    files = {"mnist format": digit.tobytes(), "inverted": (255 - digit).tobytes()}
    files["photo"] = _photo()  # over 320x320: prepared in the decode pool
    for name, data in files.items():
        image = preprocess(data, max_pixels=1 << 22)[0]
        redrawn = name != "mnist format"
        copies = _by_hand(image) if shift_views and redrawn else [image]
        expected = np.mean([model.classify(c[np.newaxis, np.newaxis])[0] for c in copies], 0)
        assert expected.any(), name  # the model sees ink, so a wrong copy shows
        assert unsure(model.classify(image[np.newaxis, np.newaxis]))[0], name
        rows_before = batcher.stats.images
        np.testing.assert_allclose(await pipeline.classify(data), expected, rtol=1e-6)
        assert batcher.stats.images - rows_before == len(copies), name
        (many,) = await pipeline.classify_many([data])
        assert isinstance(many, np.ndarray)
        np.testing.assert_allclose(many, expected, rtol=1e-6)
    assert pipeline.pending == 0


class SureOfInk:
    """Sure (0.97) of the digit 3 when the image's centre row holds ink, else split 50/50
    between 3 and 5: sure of a digit, unsure of an image shifted off its strokes."""

    info = RecordingClassifier.info

    def classify(self, batch: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        out = np.full((len(batch), 10), 0.003, np.float32)
        inked = batch[:, 0, 14].max(axis=1) > 0.5
        out[:, 3] = np.where(inked, 0.973, 0.5)
        out[:, 5] = np.where(inked, 0.003, 0.476)
        return out


@pytest.mark.parametrize("sure", [True, False], ids=["sure", "unsure"])
async def test_a_sure_reading_of_a_redrawn_image_costs_one_row(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    sure: bool,
) -> None:
    """The cascade: the own view alone when it is sure; all five when it is not (here the
    digit is blanked so that every view is unsure), inline, in the pool and in a batch."""
    digit = mnist_test_set[0][0].copy()
    if not sure:
        digit[12:17] = 0  # no ink across the middle rows: the model is unsure of every view
    model = SureOfInk()
    batcher = Batcher(model, max_batch_size=64)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 22, executor=executor)
    for name, data in {"inverted": (255 - digit).tobytes(), "large": _drawn_large(digit)}.items():
        image = preprocess(data, max_pixels=1 << 22)[0]
        own = model.classify(image[np.newaxis, np.newaxis])
        assert bool(unsure(own)[0]) is not sure, name
        copies = [image] if sure else _by_hand(image)
        expected = np.mean([model.classify(c[np.newaxis, np.newaxis])[0] for c in copies], 0)
        for classify in (pipeline.classify, _one_of_many(pipeline)):
            rows_before = batcher.stats.images
            np.testing.assert_allclose(await classify(data), expected, rtol=1e-6)
            assert batcher.stats.images - rows_before == len(copies), name
    assert pipeline.pending == 0


def _one_of_many(pipeline: Pipeline) -> Callable[[bytes], Awaitable[npt.NDArray[np.float32]]]:
    """`classify` by way of `classify_many`, with a failing item beside the image."""

    async def classify(data: bytes) -> npt.NDArray[np.float32]:
        result, empty = await pipeline.classify_many([data, b""])
        assert isinstance(empty, Exception)
        assert isinstance(result, np.ndarray)
        return result

    return classify


def _drawn_large(digit: npt.NDArray[np.uint8]) -> bytes:
    """The digit dark on light at 400x400: over 320x320, so prepared in the decode pool."""
    image = Image.fromarray(255 - digit).resize((400, 400), Image.Resampling.BILINEAR)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


async def test_a_redrawn_image_the_caller_gives_up_on_is_dropped_from_its_batch(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Cancelled while its own view waits for a batch: the view is dropped, not run; and so are
    an unsure image's shifted views when the caller gives up while they wait. Nothing is left
    behind: no slot, no error for the loop to log."""
    digit = mnist_test_set[0][0].copy()
    unsure_digit = digit.copy()
    unsure_digit[12:17] = 0  # `SureOfInk` is unsure of every view of it
    batcher = Batcher(SureOfInk(), max_batch_size=64, max_delay=0.05)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 22, executor=executor)

    waiting = pipeline.start((255 - digit).tobytes())  # a redrawn image
    await eventually(lambda: batcher.queued == 1, "its own view queued")
    waiting.cancel()
    sure = await pipeline.classify((255 - digit).tobytes())  # the next batch runs without it
    assert sure.argmax() == 3
    assert (batcher.stats.images, batcher.stats.dropped) == (1, 1)

    rereading = pipeline.start((255 - unsure_digit).tobytes())
    await eventually(lambda: batcher.queued == 4, "the unsure image's shifted views queued")
    assert batcher.stats.images == 2  # its own view, read
    rereading.cancel()
    await eventually(lambda: batcher.stats.dropped == 5, "the shifted views dropped")
    assert batcher.stats.images == 2
    assert pipeline.pending == 0
    assert not [r for r in caplog.records if r.levelname in ("ERROR", "CRITICAL")]


async def test_a_redrawn_image_whose_deadline_passes_in_the_queue_gets_the_error(
    executor: ThreadPoolExecutor,
    mnist_test_set: tuple[npt.NDArray[np.uint8], npt.NDArray[np.uint8]],
) -> None:
    batcher = Batcher(SureOfInk(), max_batch_size=64, max_delay=0.05)
    pipeline = Pipeline(batcher, max_image_pixels=1 << 22, executor=executor)
    inverted = (255 - mnist_test_set[0][0]).tobytes()
    with pytest.raises(DeadlineExpiredError):
        await pipeline.start(inverted, expires_at=time.monotonic() + 0.01)
    assert batcher.stats.dropped == 1
    assert pipeline.pending == 0
