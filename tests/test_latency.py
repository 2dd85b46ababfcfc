"""mnist_service.loadgen.latency: the one percentile every latency report uses.

Linear interpolation between closest ranks (numpy's default, Hyndman and Fan's type 7); the
cases are small enough to work out by hand.
"""

from __future__ import annotations

import statistics

import numpy as np
import pytest

from mnist_service.loadgen.latency import median, percentile, summarise_latency

FIVE = [10.0, 20.0, 30.0, 40.0, 50.0]


@pytest.mark.parametrize(
    ("q", "expected"),
    [
        pytest.param(0, 10.0, id="p0-is-the-least"),
        pytest.param(25, 20.0, id="p25-on-a-rank"),
        pytest.param(50, 30.0, id="p50-the-middle-value"),
        pytest.param(62.5, 35.0, id="p62.5-halfway-between-ranks"),
        pytest.param(87.5, 45.0, id="p87.5-halfway-between-the-top-two"),
        pytest.param(100, 50.0, id="p100-is-the-greatest"),
    ],
)
def test_percentile_interpolates_linearly_between_closest_ranks(q: float, expected: float) -> None:
    assert percentile(FIVE, q) == expected


def test_a_high_percentile_of_few_values_lies_between_the_two_largest() -> None:
    assert percentile([1.0, 2.0], 99) == pytest.approx(1.99)
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5


def test_one_value_is_every_percentile() -> None:
    assert [percentile([7.0], q) for q in (0, 50, 99, 100)] == [7.0] * 4


@pytest.mark.parametrize("q", [0, 10, 50, 90, 99, 100])
def test_percentile_is_numpys_default(q: float) -> None:
    values = sorted([3.0, 1.0, 4.0, 1.5, 9.0, 2.6, 5.0])

    assert percentile(values, q) == pytest.approx(np.percentile(values, q))


def test_median_takes_values_in_any_order_and_is_the_usual_median() -> None:
    assert median([3.0, 1.0, 2.0]) == 2.0
    assert median([4.0, 1.0, 3.0, 2.0]) == 2.5
    assert median(iter([5.0, 9.0])) == statistics.median([5.0, 9.0])


@pytest.mark.parametrize("q", [-1, 100.5])
def test_a_percentile_outside_0_to_100_is_refused(q: float) -> None:
    with pytest.raises(ValueError, match=r"\[0, 100\]"):
        percentile([1.0], q)


def test_no_values_have_no_percentile() -> None:
    with pytest.raises(ValueError, match="no values"):
        percentile([], 50)
    with pytest.raises(ValueError, match="no values"):
        median([])


def test_a_latency_summary_is_in_milliseconds() -> None:
    summary = summarise_latency([0.004, 0.001, 0.002, 0.003], "call")

    assert summary is not None
    assert (summary.of, summary.count) == ("call", 4)
    assert summary.mean_ms == pytest.approx(2.5)
    assert summary.p50_ms == pytest.approx(2.5)
    assert summary.p99_ms == pytest.approx(3.97)
    assert summary.max_ms == pytest.approx(4.0)
    assert summarise_latency([], "image") is None
