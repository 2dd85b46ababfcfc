"""Where a request's time went, for its `Server-Timing` header: preprocess, queue, inference.

Preprocessing a small image happens inline when the pipeline takes it, so it is timed around
that call. The batcher tells each caller when its model run delivered (`on_batch`), right
after the run: `ModelClock` notes how long that run took, so what is left of the caller's wait
was the queue. A big image's decode, which the pool does, counts as queue.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from ..engine.inference import Classifier, FloatArray, ModelInfo


class ModelClock:
    """A classifier that notes how long its latest model run took (one run at a time: the
    batcher's)."""

    def __init__(self, inner: Classifier) -> None:
        self._inner = inner
        self.last_run_s = 0.0

    @property
    def info(self) -> ModelInfo:
        """The wrapped model's."""
        return self._inner.info

    def classify(self, batch: FloatArray) -> FloatArray:
        """The wrapped model's answer, timed."""
        started = time.perf_counter()
        try:
            return self._inner.classify(batch)
        finally:
            self.last_run_s = time.perf_counter() - started


@dataclass(slots=True)
class Timing:
    """One request's time, split for `Server-Timing` (seconds)."""

    started: float = field(default_factory=time.perf_counter)
    preprocess: float = 0.0
    waited: float = 0.0
    """From the images' hand-over to the batcher to their answer: queue and inference."""
    inference: float = 0.0

    def header(self) -> str:
        """`preprocess;dur=0.110, queue;dur=0.020, inference;dur=0.310, total;dur=0.6` (ms)."""
        total = time.perf_counter() - self.started
        parts = []
        if self.preprocess or self.waited:
            queue = max(0.0, self.waited - self.inference)
            parts = [
                f"preprocess;dur={self.preprocess * 1000:.3f}",
                f"queue;dur={queue * 1000:.3f}",
                f"inference;dur={self.inference * 1000:.3f}",
            ]
        parts.append(f"total;dur={total * 1000:.3f}")
        return ", ".join(parts)
