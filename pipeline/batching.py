"""Dynamic batching as pure functions: collect until ``max_batch`` items or a deadline; check outputs match inputs.

``collect_batch`` takes the read function and the clock as arguments, so it is tested without Redis or sleeping.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sized
from typing import TypeVar

ItemT = TypeVar("ItemT")

# fetch(max_items, wait_s) -> items; waits at most wait_s for the first item (wait_s None: do not wait).
Fetch = Callable[[int, float | None], list[ItemT]]


def collect_batch(
    fetch: Fetch[ItemT],
    max_batch: int,
    max_wait_s: float,
    first_wait_s: float | None,
    clock: Callable[[], float] = time.monotonic,
) -> list[ItemT]:
    """Wait up to ``first_wait_s`` for a first item, then keep collecting until ``max_batch`` or ``max_wait_s``.

    The deadline starts at the first item, so a lone frame waits at most ``max_wait_s`` for company.
    """
    if max_batch < 1:
        msg = f"max_batch must be at least 1, got {max_batch}"
        raise ValueError(msg)
    items = list(fetch(max_batch, first_wait_s))[:max_batch]
    if not items:
        return items
    deadline = clock() + max_wait_s
    while len(items) < max_batch:
        remaining_s = deadline - clock()
        if remaining_s <= 0:
            break
        items.extend(fetch(max_batch - len(items), remaining_s)[: max_batch - len(items)])
    return items


class BatchMismatchError(RuntimeError):
    """A model returned a different number of outputs than it was given inputs."""


def check_one_to_one(n_inputs: int, outputs: Sized, what: str) -> None:
    """Raise BatchMismatchError unless ``outputs`` has exactly one row per input."""
    if len(outputs) != n_inputs:
        msg = f"{what}: got {len(outputs)} outputs for {n_inputs} inputs"
        raise BatchMismatchError(msg)
