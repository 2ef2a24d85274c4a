"""collect_batch with a scripted fetch and a fake clock: sizes and deadlines without Redis or sleeping."""

from __future__ import annotations

import pytest

from pipeline.batching import BatchMismatchError, check_one_to_one, collect_batch


class FakeSource:
    """Hands out queued items; each fetch that finds nothing advances the fake clock by the wait it was given."""

    def __init__(self, arrivals: list[list[int]]) -> None:
        self.arrivals = arrivals
        self.now = 0.0
        self.calls: list[tuple[int, float | None]] = []

    def clock(self) -> float:
        return self.now

    def fetch(self, max_items: int, wait_s: float | None) -> list[int]:
        self.calls.append((max_items, wait_s))
        if self.arrivals:
            return self.arrivals.pop(0)[:max_items]
        self.now += wait_s or 0.0
        return []


def test_returns_empty_when_nothing_arrives() -> None:
    source = FakeSource([])
    assert collect_batch(source.fetch, max_batch=8, max_wait_s=0.02, first_wait_s=0.2, clock=source.clock) == []
    assert source.calls == [(8, 0.2)]


def test_stops_at_max_batch_without_waiting_for_the_deadline() -> None:
    source = FakeSource([[1, 2, 3], [4, 5, 6], [7, 8, 9, 10]])
    batch = collect_batch(source.fetch, max_batch=8, max_wait_s=10.0, first_wait_s=0.2, clock=source.clock)
    assert batch == [1, 2, 3, 4, 5, 6, 7, 8]
    assert [max_items for max_items, _ in source.calls] == [8, 5, 2]
    assert source.now == 0.0


def test_stops_at_deadline_with_a_partial_batch() -> None:
    source = FakeSource([[1], [2]])
    batch = collect_batch(source.fetch, max_batch=8, max_wait_s=0.05, first_wait_s=0.2, clock=source.clock)
    assert batch == [1, 2]
    assert source.now == pytest.approx(0.05)
    assert source.calls[-1][1] == pytest.approx(0.05)


def test_zero_wait_takes_only_what_the_first_fetch_returned() -> None:
    source = FakeSource([[1, 2], [3]])
    assert collect_batch(source.fetch, max_batch=8, max_wait_s=0.0, first_wait_s=None, clock=source.clock) == [1, 2]


def test_rejects_empty_batches() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        collect_batch(FakeSource([]).fetch, max_batch=0, max_wait_s=0.0, first_wait_s=None)


def test_check_one_to_one() -> None:
    check_one_to_one(3, [0.1, 0.2, 0.3], "scores")
    with pytest.raises(BatchMismatchError, match="2 outputs for 3 inputs"):
        check_one_to_one(3, [0.1, 0.2], "scores")
