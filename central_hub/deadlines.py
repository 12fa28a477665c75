"""A deadline per key, and the keys whose deadline has passed (pure).

``Deadlines`` keeps at most one entry per key in a heap. ``schedule`` moves a key's
deadline: to an earlier time it pushes an entry (the later one left in the heap is
skipped when it comes up); to a later time it only notes it, and when the earlier entry
comes up it is pushed again at the noted time. So a site reporting every few seconds
costs O(1) per report and about one heap push per deadline period, and ``expired(now)``
costs O(log n) per entry it takes out: O(expired), not O(keys), per pass.
"""

from __future__ import annotations

import heapq
from collections.abc import Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)


class Deadlines(Generic[K]):
    def __init__(self) -> None:
        self._heap: list[tuple[float, int, K]] = []
        self._due: dict[K, float] = {}  # key -> its deadline now
        self._queued: dict[K, float] = {}  # key -> the earliest entry it has in the heap
        self._seq = 0  # keeps the heap from comparing keys

    def __len__(self) -> int:
        return len(self._due)

    def __contains__(self, key: object) -> bool:
        return key in self._due

    def when(self, key: K) -> float | None:
        return self._due.get(key)

    def schedule(self, key: K, at: float) -> None:
        """``key`` is due at ``at`` (replacing its deadline, earlier or later)."""
        self._due[key] = at
        queued = self._queued.get(key)
        if queued is None or at < queued:
            self._push(key, at)

    def cancel(self, key: K) -> None:
        self._due.pop(key, None)

    def expired(self, now: float, limit: int | None = None) -> list[K]:
        """The keys due at or before ``now`` (at most ``limit``), taken out."""
        found: list[K] = []
        heap = self._heap
        while heap and heap[0][0] <= now and (limit is None or len(found) < limit):
            at, _, key = heapq.heappop(heap)
            if self._queued.get(key) == at:
                del self._queued[key]
            due = self._due.get(key)
            if due is None or key in self._queued:
                continue  # cancelled, or an earlier entry of it is still queued
            if due <= now:
                del self._due[key]
                found.append(key)
            else:
                self._push(key, due)  # moved later since this entry was pushed
        return found

    def _push(self, key: K, at: float) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, self._seq, key))
        self._queued[key] = at
