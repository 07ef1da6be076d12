"""Run ahead: submit the next items' work while the caller consumes the current one."""

from __future__ import annotations

from collections import deque
from itertools import islice
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
H = TypeVar("H")


def prefetched(items: Iterable[T], submit: Callable[[T], H], ahead: int = 1) -> Iterator[tuple[T, H]]:
    """Yield ``(item, submit(item))`` in order; the next ``ahead`` items are already submitted when an item
    is yielded, so their work (a future, or a list of futures) runs while the caller waits on and consumes it.

    The caller owns the pool behind ``submit`` and shuts it down (cancelling what is left) when it stops early.
    """
    it = iter(items)
    pending = deque((x, submit(x)) for x in islice(it, max(1, ahead)))
    while pending:
        item, handle = pending.popleft()
        for x in islice(it, 1):
            pending.append((x, submit(x)))
        yield item, handle
