"""The dynamic batcher: results fan back to the right callers, limits hold, nothing leaks.

Correctness only: nothing here asserts on timings (the benchmark measures speed).
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from mnist_service.config import shipped_weights
from mnist_service.constants import IMAGE_SIZE, NUM_CLASSES
from mnist_service.engine.batcher import Batcher
from mnist_service.engine.inference import FloatArray, ModelInfo, OnnxClassifier
from mnist_service.engine.preprocess import model_batch
from mnist_service.errors import DeadlineExpiredError

from .conftest import MnistSplit
from .test_service import FAKE_INFO
from .waiting import eventually, within


class RecordingClassifier:
    """Answers one-hot on each image's first pixel value (×255, mod 10); records batch sizes.

    `entered` is set when a model run starts; with a `gate`, the run then waits for it.
    """

    info: ModelInfo = FAKE_INFO

    def __init__(self, *, fail_on: int | None = None, gate: threading.Event | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = gate
        self.entered = threading.Event()

    def classify(self, batch: FloatArray) -> FloatArray:
        self.entered.set()
        if self.gate is not None:
            self.gate.wait(10)
        ids = [round(float(image[0, 0, 0]) * 255) for image in batch]
        self.batches.append(ids)
        if self.fail_on is not None and self.fail_on in ids:
            raise RuntimeError("model run failed")
        probabilities = np.zeros((len(batch), NUM_CLASSES), dtype=np.float32)
        probabilities[np.arange(len(batch)), np.array(ids) % NUM_CLASSES] = 1.0
        return probabilities


def image(ident: int, count: int = 1) -> FloatArray:
    """`count` images whose first pixel encodes `ident`."""
    batch = np.zeros((count, 1, IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    batch[:, 0, 0, 0] = ident / 255
    return batch


@pytest.fixture
def executor() -> Iterator[ThreadPoolExecutor]:
    with ThreadPoolExecutor(1) as pool:
        yield pool


@pytest.fixture(scope="module")
def convnet() -> OnnxClassifier:
    return OnnxClassifier.load(shipped_weights("conv"), architecture="conv", device="cpu")


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
async def test_concurrent_callers_get_their_own_results(
    convnet: OnnxClassifier,
    mnist_test_set: MnistSplit,
    executor: ThreadPoolExecutor,
    inline: bool,
) -> None:
    """200 concurrent callers on real digits: each gets what batch-1 inference gives it."""
    images = model_batch(mnist_test_set[0][:200])
    batcher = Batcher(convnet, max_batch_size=32, executor=None if inline else executor)

    results = await asyncio.gather(*(batcher.predict(images[i : i + 1]) for i in range(200)))

    for i, result in enumerate(results):
        np.testing.assert_allclose(result, convnet.classify(images[i : i + 1]), atol=1e-6)
    stats = batcher.stats
    assert stats.images == 200
    assert stats.executions < 200  # they really were batched
    assert stats.largest_batch <= 32


async def test_batch_size_limit_holds_and_big_requests_are_split() -> None:
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=4)

    singles = [batcher.predict(image(i)) for i in range(10)]
    big = batcher.predict(image(50, count=9))
    results = await asyncio.gather(*singles, big)

    assert all(len(ids) <= 4 for ids in model.batches)
    assert sum(len(ids) for ids in model.batches) == 19
    assert [int(r.argmax()) for r in results[:10]] == [i % 10 for i in range(10)]
    assert results[10].shape == (9, NUM_CLASSES)


async def test_a_failed_model_run_fails_only_its_own_batch() -> None:
    model = RecordingClassifier(fail_on=3)
    batcher = Batcher(model, max_batch_size=4)

    results = await asyncio.gather(
        *(batcher.predict(image(i)) for i in range(8)), return_exceptions=True
    )

    assert [isinstance(r, RuntimeError) for r in results] == [True] * 4 + [False] * 4
    assert [int(r.argmax()) for r in results[4:]] == [4, 5, 6, 7]  # type: ignore[union-attr]


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
async def test_cancelled_callers_are_dropped_before_inference(
    executor: ThreadPoolExecutor, inline: bool
) -> None:
    """The batch is held open (by a delay no test run reaches) until 7 more images fill it."""
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=8, max_delay=60, executor=None if inline else executor)

    keep = asyncio.create_task(batcher.predict(image(1)))
    drop = asyncio.create_task(batcher.predict(image(2)))
    expire = asyncio.create_task(asyncio.wait_for(batcher.predict(image(3)), 0.01))
    await eventually(
        lambda: batcher.queued == 3 and expire.done(), "three queued, the third one expired"
    )
    drop.cancel()
    fill = asyncio.create_task(batcher.predict(image(9, count=7)))
    done = await within(
        asyncio.gather(keep, drop, expire, fill, return_exceptions=True), "the filled batch"
    )

    assert int(done[0].argmax()) == 1  # type: ignore[union-attr]
    assert isinstance(done[1], asyncio.CancelledError)
    assert isinstance(done[2], TimeoutError)
    assert [int(row.argmax()) for row in done[3]] == [9] * 7  # type: ignore[union-attr]
    assert model.batches == [[1] + [9] * 7]  # neither the cancelled nor the expired image
    assert batcher.stats.dropped == 2
    assert batcher.queued == 0


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "executor"])
async def test_images_whose_deadline_passes_in_the_queue_are_dropped(
    executor: ThreadPoolExecutor, inline: bool
) -> None:
    model = RecordingClassifier()
    batcher = Batcher(
        model, max_batch_size=8, max_delay=0.05, executor=None if inline else executor
    )
    now = time.monotonic()

    done = await asyncio.gather(
        batcher.predict(image(1), expires_at=now + 30),
        batcher.predict(image(2), expires_at=now + 0.01),  # passes while the batch is held
        batcher.predict(image(3)),
        return_exceptions=True,
    )

    assert int(done[0].argmax()) == 1  # type: ignore[union-attr]
    assert isinstance(done[1], DeadlineExpiredError)
    assert int(done[2].argmax()) == 3  # type: ignore[union-attr]
    assert model.batches == [[1, 3]]
    assert batcher.stats.dropped == 1


async def test_greedy_batches_what_queues_while_the_model_runs(
    executor: ThreadPoolExecutor,
) -> None:
    """The first caller runs at once; those arriving during its run share the next batch."""
    gate = threading.Event()
    model = RecordingClassifier(gate=gate)
    batcher = Batcher(model, max_batch_size=16, executor=executor)

    first = asyncio.create_task(batcher.predict(image(0)))
    await eventually(model.entered.is_set, "the first batch to be inside the model")
    rest = [asyncio.create_task(batcher.predict(image(i))) for i in range(1, 6)]
    await eventually(lambda: batcher.queued == 5, "five callers queued behind the model run")
    gate.set()
    await within(asyncio.gather(first, *rest), "both batches")

    assert model.batches == [[0], [1, 2, 3, 4, 5]]


async def test_max_delay_holds_a_batch_open_and_a_full_batch_goes_at_once() -> None:
    """A delay no test run reaches (60 s): the batch goes when full, or never in this test."""
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=3, max_delay=60)

    first = asyncio.create_task(batcher.predict(image(1)))
    await eventually(lambda: batcher.queued or model.batches, "the first caller to be queued")
    for _ in range(3):  # turns of the loop in which a batcher without a delay runs the batch
        await asyncio.sleep(0)
    assert model.batches == []  # still waiting for company
    second = asyncio.create_task(batcher.predict(image(2)))
    third = asyncio.create_task(batcher.predict(image(3)))  # the batch is full: go now
    await within(asyncio.gather(first, second, third), "the full batch, long before its delay")

    assert model.batches == [[1, 2, 3]]


async def test_idle_model_runs_a_lone_caller_without_waiting_for_company() -> None:
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=64)

    result = await asyncio.wait_for(batcher.predict(image(7)), 1.0)

    assert int(result.argmax()) == 7
    assert model.batches == [[7]]


async def test_a_lone_caller_on_an_idle_model_is_answered_without_a_loop_turn() -> None:
    """Relies on CPython's `loop._ready`: if it goes, this fails instead of going slow."""
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=8)

    future = batcher.submit(image(4))

    assert future.done()
    assert int(future.result().argmax()) == 4
    assert model.batches == [[4]]


async def test_callers_ready_in_the_same_turn_share_a_batch() -> None:
    model = RecordingClassifier()
    batcher = Batcher(model, max_batch_size=8)

    calls = [asyncio.ensure_future(batcher.predict(image(i))) for i in range(5)]
    await asyncio.gather(*calls)

    assert model.batches == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize(("size", "delay"), [(0, 0.0), (4, -1.0)])
def test_invalid_settings_are_refused(size: int, delay: float) -> None:
    with pytest.raises(ValueError, match="max_"):
        Batcher(RecordingClassifier(), max_batch_size=size, max_delay=delay)
