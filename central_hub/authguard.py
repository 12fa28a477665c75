"""What a failed authentication costs the hub: a few bytes of memory, never a write each.

A request whose bearer token is missing, malformed, unknown, revoked or expired is
refused (401) and *counted* here, by source address (``request.remote``; behind a proxy
that is the proxy's):

- **Sampled into the audit log.** Failures are added up per source and written every
  ``every_s`` (10 s): one entry per source that failed in the interval, with its
  ``count``, all in one transaction (one fsync for every source). The table of pending
  counts holds ``max_sources`` sources; past it the rest are added to source ``"*"``.
- **Rate-limited per source.** Each source has a token bucket of ``burst`` failures
  refilled at ``rate`` a second; a failure with the bucket empty answers 429
  ``too_many_failed_authentications`` with ``Retry-After`` (the seconds until the bucket
  holds one again) instead of 401. The table keeps the ``max_sources`` most recently seen
  sources (least recently seen evicted first). A request with a good token is never
  refused by this, whatever its source's failures: the check follows the authentication
  (a read of the store and a hash), so a client behind the same address as an attacker
  keeps working.

Pure bookkeeping plus one scheduled write (``flush``); the API's guard calls ``refused``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from central_hub import audit
from central_hub.errors import ApiError
from central_hub.ledger import Ledger, Txn

logger = logging.getLogger(__name__)

EVERY_S = 10.0
BURST = 20.0
RATE = 2.0  # failures a second, per source, once the burst is spent
MAX_SOURCES = 10_000
OTHER_SOURCES = "*"


@dataclass(slots=True)
class _Bucket:
    tokens: float
    at: float


@dataclass(slots=True)
class _Pending:
    count: int = 0
    limited: int = 0  # of which answered 429
    first_at: float = 0.0
    last_at: float = 0.0
    action: str = ""
    last: str = ""
    routes: set[str] = field(default_factory=set)


class FailedAuth:
    """Counts, samples and rate-limits failed authentications (module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        *,
        every_s: float = EVERY_S,
        burst: float = BURST,
        rate: float = RATE,
        max_sources: int = MAX_SOURCES,
        clock: Callable[[], float] | None = None,
    ) -> None:
        self.ledger = ledger
        self.every_s = every_s
        self.burst = burst
        self.rate = rate
        self.max_sources = max_sources
        self.clock = clock or ledger.now
        self.total = 0  # failures since start (metrics, tests)
        self.limited = 0  # of which answered 429
        self._buckets: OrderedDict[str, _Bucket] = OrderedDict()
        self._pending: dict[str, _Pending] = {}
        self._timer: asyncio.TimerHandle | None = None

    @property
    def sources(self) -> int:
        return len(self._buckets)

    def refused(self, source: str | None, action: str, what: str, error: ApiError) -> ApiError:
        """Count a failed authentication of ``source``; the error to answer with: 429
        with ``Retry-After`` when the source's bucket is empty, else ``error``."""
        now = self.clock()
        source = source or "unknown"
        self.total += 1
        wait = self._take(source, now)
        self._note(source, action, f"{what}: {error.code}", now, limited=wait is not None)
        if wait is None:
            return error
        self.limited += 1
        return ApiError(
            429,
            "too_many_failed_authentications",
            f"too many requests with a bad token from {source}: retry in {wait} s",
            headers={"Retry-After": str(wait)},
        )

    def _take(self, source: str, now: float) -> int | None:
        """Take one from the source's bucket: None if it had one, else the seconds until
        it will."""
        bucket = self._buckets.get(source)
        if bucket is None:
            bucket = self._buckets[source] = _Bucket(self.burst, now)
            while len(self._buckets) > self.max_sources:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(source)
            bucket.tokens = min(self.burst, bucket.tokens + (now - bucket.at) * self.rate)
            bucket.at = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return max(1, math.ceil((1 - bucket.tokens) / self.rate))

    def _note(self, source: str, action: str, what: str, now: float, *, limited: bool) -> None:
        if source not in self._pending and len(self._pending) >= self.max_sources:
            source = OTHER_SOURCES
        pending = self._pending.get(source)
        if pending is None:
            pending = self._pending[source] = _Pending(first_at=now, action=action)
        pending.count += 1
        pending.limited += limited
        pending.last_at = now
        pending.last = what
        if len(pending.routes) < 8:
            pending.routes.add(what.split(":", 1)[0])
        if self._timer is None:
            with contextlib.suppress(RuntimeError):  # no running loop: flushed at stop
                loop = asyncio.get_running_loop()
                self._timer = loop.call_later(self.every_s, self._flush_soon)

    def _flush_soon(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self.flush())
        task.add_done_callback(_log_failure)

    async def flush(self) -> None:
        """Write the pending counts: one audit entry per source, one transaction."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        pending, self._pending = self._pending, {}
        if not pending or not self.ledger.is_open:
            return

        def plan(txn: Txn) -> None:
            for source, p in sorted(pending.items()):
                detail = (
                    f"{p.count} failed authentication(s) from {source} in "
                    f"{p.last_at - p.first_at:.1f} s ({p.limited} answered 429); routes "
                    f"{', '.join(sorted(p.routes))}; last: {p.last}"
                )
                entry: dict[str, Any] = audit.entry(
                    None, p.action, None, "source", source, "refused 401", detail, p.first_at
                )
                txn.audit_entries.append({**entry, "count": p.count})

        await self.ledger.transact(plan)


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("failed authentications were not audited: %s", future.exception())
