"""runtime.collector: what a serving process does to the garbage collector once it is ready."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from mnist_service.runtime import collector


@pytest.fixture
def restored() -> Iterator[None]:
    thresholds = gc.get_threshold()
    yield
    gc.unfreeze()
    gc.set_threshold(*thresholds)


@pytest.mark.usefixtures("restored")
def test_settle_freezes_what_exists_and_raises_only_the_young_threshold() -> None:
    _, older, oldest = gc.get_threshold()
    held = [[index] for index in range(1000)]  # lives on, as the model and the server do

    collector.settle()

    assert gc.get_threshold() == (collector.YOUNG_THRESHOLD, older, oldest)
    assert gc.get_freeze_count() >= len(held)
    assert collector.YOUNG_THRESHOLD > 700  # Python's default, which the server outgrew


@pytest.mark.usefixtures("restored")
def test_cycles_are_still_collected_once_they_accumulate() -> None:
    collector.settle()
    collected: list[dict[str, int]] = []

    def on_collection(phase: str, info: dict[str, int]) -> None:
        if phase == "stop":
            collected.append(info)

    gc.callbacks.append(on_collection)
    try:
        for _ in range(collector.YOUNG_THRESHOLD):  # each a cycle only the collector frees
            node: list[object] = []
            node.append(node)
        assert collected, "no collection after YOUNG_THRESHOLD cycles"
    finally:
        gc.callbacks.remove(on_collection)
