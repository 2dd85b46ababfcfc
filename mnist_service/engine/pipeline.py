"""Request bytes -> probabilities: preprocessing, then the predictor (the batcher).

Small images (a 28x28 PNG decodes in ~15 us, a 280x280 canvas in ~0.13 ms) are preprocessed
inline on the event loop: a thread hand-off costs more than that on a busy core. Images whose
header announces more than `inline_max_pixels` are decoded by Pillow in the executor, which
releases the GIL while it decodes, so a big file never stalls the loop and other cores can
decode beside it. The rest of
their preprocessing (the ink map and the redrawing: small numpy steps that hold the GIL, and
cost about the same whatever the image's size) runs back on the loop: in a thread it would
only contend with the loop for the GIL, which cost a quarter of the calls a canvas or a photo
made on one core (measured). An image the preprocessing redrew is read once, and again over
its shifted views when that reading is unsure (`views`), unless `shift_views` is off. Nothing
here knows about gRPC.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Final, TypeGuard

import numpy as np
import numpy.typing as npt
from PIL import Image

from ..errors import DeadlineExpiredError, MnistServiceError, OverloadedError
from .inference import FloatArray, ModelInfo, Predictor
from .preprocess import (
    Opened,
    Prepared,
    Undecoded,
    is_raw,
    load,
    open_image,
    pixel_count,
    pixels_batch,
    prepare,
    prepare_decoded,
    raw_batch,
)
from .views import SHIFTS, collapse, others, unsure

_ALL_VIEWS: Final = np.array([len(SHIFTS)], np.intp)
"""One image's count of views, for `collapse`."""

INLINE_MAX_PIXELS: Final = 320 * 320
"""Images up to this many pixels are decoded on the event loop (about 0.8 ms at most through
Pillow; a plain PNG, which `engine.png` inflates with zlib-ng, a fifth of that): the
drawing canvases of 280x280 and 300x300 that demos use among them. Handing such an image to
the decode pool cost more CPU than its decode saves on the loop: a 280x280 canvas took about
1,400 us of server CPU a call inline against 1,700-1,900 through the pool (one core, 64 in
flight, `python -m bench.profile --payload canvas-280`), the hand-off and its one-image
model runs included."""

ItemResult = FloatArray | Exception
"""One image's outcome in `classify_many`: probabilities [10], or why it failed."""


@dataclass(eq=False, slots=True)
class Admission:
    """What a model's pipelines hold, and its bounds: the images accepted and not yet
    answered (`max_queue`), and the bytes of big images waiting for the decode pool
    (`max_decode_bytes`). One per model, shared by the pipelines of its versions: while a
    swap's old version finishes its calls, the model still holds no more than the bounds."""

    max_queue: int = 2048
    max_decode_bytes: int = 64 * 1024 * 1024
    pending: int = 0
    decode_bytes: int = 0


class Pipeline:
    """Preprocess where it is cheapest, then predict through the shared predictor."""

    def __init__(
        self,
        predictor: Predictor,
        *,
        max_image_pixels: int,
        executor: Executor,
        max_queue: int = 2048,
        max_decode_bytes: int = 64 * 1024 * 1024,
        inline_max_pixels: int = INLINE_MAX_PIXELS,
        shift_views: bool = True,
        admission: Admission | None = None,
    ) -> None:
        """`admission` is shared with the model's other versions; without it, the pipeline
        has its own, bounded by `max_queue` and `max_decode_bytes`."""
        self._predictor = predictor
        self._max_image_pixels = max_image_pixels
        self._executor = executor
        self._admission = admission or Admission(max_queue, max_decode_bytes)
        self._inline_max_pixels = inline_max_pixels
        self._shift_views = shift_views

    @property
    def admission(self) -> Admission:
        """What the model holds, across its versions."""
        return self._admission

    @property
    def pending(self) -> int:
        """Images accepted and not yet answered (by every pipeline of its `admission`)."""
        return self._admission.pending

    def _admit(self, count: int) -> None:
        """Count `count` more images in, or refuse them all when that would pass `max_queue`."""
        admission = self._admission
        if admission.pending + count > admission.max_queue:
            raise OverloadedError(
                f"the server has {admission.pending} images waiting and takes at most "
                f"{admission.max_queue}; retry later or on another server"
            )
        admission.pending += count

    def _release(self, count: int) -> None:
        self._admission.pending -= count

    def _admit_decode(self, size: int) -> None:
        """Count `size` more bytes of big images waiting for (or in) the decode pool, or refuse
        them when that would pass `max_decode_bytes`: a queue of photos must not grow without
        bound while the pool works through it."""
        admission = self._admission
        waiting = admission.decode_bytes
        if waiting and waiting + size > admission.max_decode_bytes:
            raise OverloadedError(
                f"the server has {waiting} bytes of big images waiting to be decoded"
                f" and takes at most {admission.max_decode_bytes}; retry later or on another"
                " server"
            )
        admission.decode_bytes += size

    def _release_decode(self, size: int) -> None:
        self._admission.decode_bytes -= size

    def _release_one(self, _: object) -> None:
        self._admission.pending -= 1

    @property
    def info(self) -> ModelInfo:
        """What is being served."""
        return self._predictor.info

    async def classify(
        self,
        data: bytes,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> FloatArray:
        """One image's bytes -> its probabilities, float32 [10]; `on_batch` is told the size
        of the model run it rode in."""
        probabilities = await self.start(data, expires_at, on_batch)
        row: FloatArray = probabilities[0]
        return row

    def start(
        self,
        data: bytes,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> asyncio.Future[FloatArray]:
        """Start classifying one image without waiting: its probabilities [1, 10] arrive in
        the future (or the reason it failed). A small image costs no task: it is prepared
        now and goes straight into the batcher's queue.

        `expires_at` (a `time.monotonic()` value) is the caller's deadline: an image still
        waiting for preprocessing or for a batch then is dropped with `DeadlineExpiredError`.
        """
        opened = self._admit_and_open(data, expires_at)
        if isinstance(opened, asyncio.Future):
            return opened
        return self._start_opened(opened, len(data), expires_at, on_batch)

    def _admit_and_open(
        self, data: bytes, expires_at: float | None
    ) -> Opened | asyncio.Future[FloatArray]:
        """One image past the deadline's check and admission, its header read (`open_image`),
        in that order; or the failed future of its answer, with its place given back."""
        try:
            _check_deadline(expires_at)
            self._admit(1)
        except (DeadlineExpiredError, OverloadedError) as exc:
            return _failed(_as_result(exc))
        try:
            return open_image(data, self._max_image_pixels)
        except Exception as exc:  # the caller gets it from the future, like any other error
            self._release(1)
            return _failed(_as_result(exc))

    def _start_opened(
        self,
        opened: Opened,
        size: int,
        expires_at: float | None,
        on_batch: Callable[[int], None] | None,
    ) -> asyncio.Future[FloatArray]:
        """`start` from the opened image (of `size` bytes), admitted already."""
        try:
            if not self._is_big(opened):
                prepared = prepare(opened)
                if not self._has_views(prepared):
                    future = self._predictor.submit(
                        prepared.image[np.newaxis], expires_at, on_batch
                    )
                else:  # a drawing: its preprocessing costs far more than this task
                    future = asyncio.ensure_future(
                        self._predict_views(prepared, expires_at, on_batch)
                    )
            else:
                self._admit_decode(size)
                future = asyncio.ensure_future(
                    self._classify_big(opened, size, expires_at, on_batch)
                )
        except Exception as exc:  # the caller gets it from the future, like any other error
            self._release(1)
            return _failed(_as_result(exc))
        if future.done():  # the lone-caller path: answered already
            self._release(1)
        else:
            future.add_done_callback(self._release_one)
        return future

    def start_many(
        self, items: Sequence[bytes], expires_at: float | None = None
    ) -> list[asyncio.Future[FloatArray]]:
        """`start` for several images at once: one future each, in order, and each image
        admitted, refused or failed as `start` would (in order: the deadline, `max_queue`,
        then the image itself). Those in MNIST format (raw pixels, MNIST-format PNGs) are
        checked and scaled in one vectorised pass and go to the batcher together; the rest
        start one by one, as in `start`. Cancelling the future of one of those that went
        together does not take its image out of their model run."""
        if len(items) == 1:  # nothing to share: `start`, which may answer at once
            return [self.start(items[0], expires_at)]
        futures: list[asyncio.Future[FloatArray] | None] = [None] * len(items)
        pixels: dict[int, npt.NDArray[np.uint8]] = {}
        for index, data in enumerate(items):
            opened = self._admit_and_open(data, expires_at)
            if isinstance(opened, asyncio.Future):
                futures[index] = opened
            elif isinstance(opened, np.ndarray):
                pixels[index] = opened
            else:
                futures[index] = self._start_opened(opened, len(data), expires_at, None)
        if pixels:
            inputs, ready = pixels_batch(np.stack(list(pixels.values())))
            together = [index for row, index in enumerate(pixels) if ready[row]]
            for row, (index, array) in enumerate(pixels.items()):
                if not ready[row]:  # to be redrawn, or refused: as `start` does it
                    futures[index] = self._start_opened(array, array.size, expires_at, None)
            if together:
                futures_together = self._submit_together(inputs[ready], expires_at)
                for index, future in zip(together, futures_together, strict=True):
                    futures[index] = future
        return futures  # type: ignore[return-value]  # every item has its future by now

    def _submit_together(
        self, batch: FloatArray, expires_at: float | None
    ) -> list[asyncio.Future[FloatArray]]:
        """Model input [N, 1, 28, 28] of N images, admitted already, submitted as one: a
        future for each image's probabilities [1, 10]."""
        loop = asyncio.get_running_loop()
        futures: list[asyncio.Future[FloatArray]] = [loop.create_future() for _ in batch]

        def answer(shared: asyncio.Future[FloatArray]) -> None:
            self._release(len(batch))
            if shared.cancelled():
                for future in futures:
                    future.cancel()  # a no-op on those already done
                return
            error = shared.exception()
            if error is not None:
                for future in futures:
                    if not future.done():
                        future.set_exception(error)
                return
            probabilities = shared.result()
            for row, future in enumerate(futures):
                if not future.done():
                    future.set_result(probabilities[row : row + 1])

        # `predict`, not `submit`: it splits what is over the batcher's batch size.
        asyncio.ensure_future(self._predictor.predict(batch, expires_at)).add_done_callback(answer)
        return futures

    async def _classify_big(
        self,
        opened: Undecoded,
        size: int,
        expires_at: float | None,
        on_batch: Callable[[int], None] | None,
    ) -> FloatArray:
        loop = asyncio.get_running_loop()
        try:
            image = await loop.run_in_executor(self._executor, load, opened)
        finally:
            self._release_decode(size)
        prepared = prepare_decoded(image)
        return await self._predict_views(prepared, expires_at, on_batch)

    def _has_views(self, prepared: Prepared) -> bool:
        return self._shift_views and prepared.redrawn

    async def _predict_views(
        self,
        prepared: Prepared,
        expires_at: float | None,
        on_batch: Callable[[int], None] | None,
    ) -> FloatArray:
        """One prepared image -> its probabilities [1, 10]: its own view's, or, when that is
        unsure and the image has shifted views, the mean over all five."""
        own = await self._predictor.predict(prepared.image[np.newaxis], expires_at, on_batch)
        if not (self._has_views(prepared) and unsure(own)[0]):
            return own
        rest = await self._predictor.predict(others(prepared.image), expires_at, on_batch)
        return collapse(np.concatenate([own, rest]), _ALL_VIEWS)

    async def classify_prepared(
        self,
        batch: FloatArray,
        expires_at: float | None = None,
        on_batch: Callable[[int], None] | None = None,
    ) -> FloatArray:
        """Model input that needs no preprocessing (float32 [N, 1, 28, 28] in [0, 1]) -> its
        probabilities [N, 10], through the same admission, deadline and batcher as images;
        the batcher splits an N over its batch size."""
        _check_deadline(expires_at)
        self._admit(len(batch))
        try:
            return await self._predictor.predict(batch, expires_at, on_batch)
        finally:
            self._release(len(batch))

    async def classify_many(
        self, items: Sequence[bytes], expires_at: float | None = None
    ) -> list[ItemResult]:
        """Many images -> one result each, in order; a bad image fails only itself.

        Small images are prepared inline one after another (no task per item), big ones in
        the executor concurrently; the valid ones then go to the predictor as one batch. A
        deadline (`expires_at`) that passes first fails the whole call.
        """
        _check_deadline(expires_at)
        self._admit(len(items))
        try:
            return await self._classify_many(items, expires_at)
        finally:
            self._release(len(items))

    async def classify_all(
        self, items: Sequence[bytes], expires_at: float | None = None
    ) -> FloatArray:
        """Many images, all or nothing (the Open Inference Protocol's ModelInfer): their
        probabilities [N, 10], or the error of the first one that fails, raised."""
        results = await self.classify_many(items, expires_at)
        errors = [result for result in results if isinstance(result, Exception)]
        if not errors:
            rows: list[FloatArray] = results  # type: ignore[assignment]  # no errors left
            return np.stack(rows)
        error = errors[0]
        # Raised from this frame, the error's traceback holds it: no local may hold the error,
        # or the two make a cycle that keeps the request's images until the collector's next
        # pass.
        del results, errors
        try:
            raise error
        finally:
            del error

    async def _classify_many(
        self, items: Sequence[bytes], expires_at: float | None
    ) -> list[ItemResult]:
        prepared: list[Prepared | Exception | None] = [None] * len(items)
        raw = [index for index, data in enumerate(items) if is_raw(data)]
        if raw:  # raw pixels in one vectorised pass; what it cannot settle goes item by item
            raw_inputs, ready = raw_batch([items[index] for index in raw])
            if len(raw) == len(items) and bool(ready.all()):  # the usual call: one batch, as is
                return list(await self._predictor.predict(raw_inputs, expires_at))
            for row, index in enumerate(raw):
                if ready[row]:
                    prepared[index] = Prepared(raw_inputs[row], redrawn=False)
        pixels: dict[int, npt.NDArray[np.uint8]] = {}
        big: dict[int, Undecoded] = {}
        big_bytes = 0
        for index, data in enumerate(items):
            if prepared[index] is not None:
                continue
            try:
                image = open_image(data, self._max_image_pixels)
                if isinstance(image, np.ndarray):
                    pixels[index] = image
                elif self._is_big(image):
                    big[index] = image
                    big_bytes += len(data)
                else:
                    prepared[index] = prepare(image)
            except Exception as exc:  # per item; the service maps and logs it
                prepared[index] = _as_result(exc)
        if pixels:  # 28x28 pixels (MNIST-format PNGs) in one vectorised pass too
            inputs, ready = pixels_batch(np.stack(list(pixels.values())))
            for row, (index, array) in enumerate(pixels.items()):
                prepared[index] = (
                    Prepared(inputs[row], redrawn=False) if ready[row] else _prepare_item(array)
                )
        if big:
            self._admit_decode(big_bytes)  # or the whole call is refused: RESOURCE_EXHAUSTED
            loop = asyncio.get_running_loop()
            try:
                done = await asyncio.gather(
                    *(loop.run_in_executor(self._executor, load, i) for i in big.values()),
                    return_exceptions=True,
                )
            finally:
                self._release_decode(big_bytes)
            for index, outcome in zip(big, done, strict=True):
                prepared[index] = _prepared(outcome)
        valid = [item for item in prepared if isinstance(item, Prepared)]
        answers: Iterator[FloatArray] = iter(())
        if valid:
            answers = iter(await self._predict_many(valid, expires_at))
        results: list[ItemResult] = []
        for item in prepared:
            assert item is not None  # every item is prepared, or failed, by now
            results.append(next(answers) if isinstance(item, Prepared) else item)
        return results

    async def _predict_many(self, valid: list[Prepared], expires_at: float | None) -> FloatArray:
        """Prepared images -> their probabilities [N, 10]: every image's own view in one
        batch, then the shifted views of the redrawn ones whose reading is unsure in another."""
        own = await self._predictor.predict(np.stack([p.image for p in valid]), expires_at)
        recheck = [
            index for index in np.flatnonzero(unsure(own)) if self._has_views(valid[int(index)])
        ]
        if not recheck:
            return own
        rest = await self._predictor.predict(
            np.concatenate([others(valid[int(index)].image) for index in recheck]), expires_at
        )
        read = own.copy()
        extra = len(SHIFTS) - 1
        for at, index in enumerate(recheck):
            views = np.concatenate([own[index : index + 1], rest[extra * at : extra * (at + 1)]])
            read[index] = collapse(views, _ALL_VIEWS)[0]
        return read

    def _is_big(self, opened: Opened) -> TypeGuard[Undecoded]:
        """Whether an image is decoded in the pool: a file over `inline_max_pixels`."""
        return not isinstance(opened, np.ndarray) and pixel_count(opened) > self._inline_max_pixels


def _check_deadline(expires_at: float | None) -> None:
    if expires_at is not None and expires_at <= time.monotonic():
        raise DeadlineExpiredError("the call's deadline passed before its image was worked on")


def _failed(exc: Exception) -> asyncio.Future[FloatArray]:
    future: asyncio.Future[FloatArray] = asyncio.get_running_loop().create_future()
    future.set_exception(exc)
    return future


def _prepare_item(opened: Opened) -> Prepared | Exception:
    """One item of a batch, prepared, or why it failed."""
    try:
        return prepare(opened)
    except Exception as exc:  # per item; the service maps and logs it
        return _as_result(exc)


def _prepared(decoded: Image.Image | BaseException) -> Prepared | Exception:
    """What the decode pool gave for one item of a batch, prepared, or why it failed."""
    if isinstance(decoded, BaseException):
        return _error(decoded)
    try:
        return prepare_decoded(decoded)
    except Exception as exc:  # per item, as for the small ones
        return exc


def _as_result(exc: Exception) -> Exception:
    """An item's error, kept as its result. An expected one (a bad image, say) goes without
    its traceback and the error it was raised from: their frames hold this call's frame (as
    a traceback entry, or as a caller), and so the list of results that holds the error, in a
    cycle that kept the frames and the images' bytes until the collector's next pass. An
    unexpected one keeps them, for the log."""
    if isinstance(exc, MnistServiceError):
        exc.__traceback__ = exc.__context__ = exc.__cause__ = None
    return exc


def _error(outcome: BaseException) -> Exception:
    if isinstance(outcome, Exception):
        return outcome
    raise outcome  # cancellation and the like end the whole call
