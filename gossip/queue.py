"""The transmit-limited broadcast queue (memberlist's TransmitLimitedQueue).

Updates waiting to be piggybacked are kept in buckets by how often they were
sent already; a packet is filled from the least transmitted bucket first and,
inside a bucket, newest first, so fresh updates overtake old ones. An update is
dropped after ``limit`` transmissions; a newer update with the same key (same
member, same kind) replaces the older one at once.
"""

from __future__ import annotations

from gossip.messages import COMPOUND_ITEM_OVERHEAD

Key = tuple[int, str]

# Give up filling a packet after this many updates that did not fit.
_MAX_SKIPPED = 8


class TransmitQueue:
    """Encoded updates keyed by (kind, member), each sent at most ``limit`` times."""

    __slots__ = ("_buckets", "_count", "_max_items", "_where")

    def __init__(self, max_items: int) -> None:
        self._buckets: list[dict[Key, bytes]] = [{}]
        self._where: dict[Key, int] = {}
        self._count = 0
        self._max_items = max_items

    def __len__(self) -> int:
        return self._count

    def __bool__(self) -> bool:
        return self._count > 0

    def put(self, key: Key, body: bytes) -> None:
        """Queue ``body`` as fresh, replacing any queued update with the same key."""
        old = self._where.get(key)
        if old is not None:
            del self._buckets[old][key]
            self._count -= 1
        self._buckets[0][key] = body
        self._where[key] = 0
        self._count += 1
        if self._count > self._max_items:
            self._drop_most_sent()

    def take(self, budget: int, limit: int, count: bool = True) -> list[bytes]:
        """Bodies that fit in ``budget`` bytes (with compound overhead), freshest first.

        Counts a transmission of each unless ``count`` is false (a free ride).
        """
        out: list[bytes] = []
        moves: list[tuple[Key, bytes, int]] = []
        skipped = 0
        buckets = self._buckets
        for t, bucket in enumerate(buckets):
            if not bucket:
                continue
            for key, body in reversed(bucket.items()):
                need = len(body) + COMPOUND_ITEM_OVERHEAD
                if need > budget:
                    skipped += 1
                    if skipped >= _MAX_SKIPPED:
                        break
                    continue
                budget -= need
                out.append(body)
                if count:
                    moves.append((key, body, t))
            if skipped >= _MAX_SKIPPED or budget <= COMPOUND_ITEM_OVERHEAD + 8:
                break
        for key, body, t in moves:
            del buckets[t][key]
            if t + 1 >= limit:
                del self._where[key]
                self._count -= 1
                continue
            if t + 1 == len(buckets):
                buckets.append({})
            buckets[t + 1][key] = body
            self._where[key] = t + 1
        return out

    def has(self, key: Key) -> bool:
        return key in self._where

    def clear(self) -> None:
        self._buckets = [{}]
        self._where.clear()
        self._count = 0

    def _drop_most_sent(self) -> None:
        for bucket in reversed(self._buckets):
            if bucket:
                key = next(iter(bucket))  # the oldest of the most transmitted
                del bucket[key]
                del self._where[key]
                self._count -= 1
                return
