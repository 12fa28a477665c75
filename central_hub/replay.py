"""The nonces of the site requests the hub accepted, for the validity window (pure).

A signed link request is valid while its time is within ``MAX_CLOCK_SKEW_S`` of the
hub's clock, so a nonce must be remembered until the hub's clock passes its signed time
plus that window. Nonces are kept as 64-bit digests of (site, nonce) in buckets by signed
time (``BUCKET_S``): a lookup and an insert touch the one bucket of the request's signed
time (O(1)), and whole buckets are dropped once they are out of the window (O(1)
amortised). Only requests whose signature checked are recorded, so the memory follows
the sites' own request rate: 10,000 sites reporting every 3 s is ~3,300 requests/s, ~2M
nonces over the ~600 s a nonce may live (signed up to 300 s ahead of the hub's clock)
at ~70 bytes each, ~140 MiB at worst, ~1M and half of that with clocks in step.
``capacity`` bounds it: past it, new requests are refused (503, retried by the sites)
rather than old nonces forgotten, which would make their requests replayable.

The nonces live in memory, so a restarted hub (or a new leader of a replicated hub) does
not know those its earlier run accepted. ``started_at``: requests that change something
(not GET) signed before it are refused (``remembers``) -- a request captured before the
restart could only be such a one; the sites sign anew when they retry.
"""

from __future__ import annotations

import hashlib
import logging
import math

from central_hub.errors import ApiError
from meshorch.fleet.link_auth import MAX_CLOCK_SKEW_S

logger = logging.getLogger(__name__)

BUCKET_S = 10.0
DEFAULT_CAPACITY = 4_000_000


class ReplayCacheFull(Exception):
    """More nonces in the window than ``capacity``."""


class NonceCache:
    def __init__(
        self,
        window_s: float = MAX_CLOCK_SKEW_S,
        capacity: int = DEFAULT_CAPACITY,
        started_at: float = -math.inf,
    ) -> None:
        self.window_s = window_s
        self.capacity = capacity
        self.started_at = started_at
        self._buckets: dict[int, set[int]] = {}
        self._size = 0
        self._oldest = math.inf  # the smallest bucket index held

    def __len__(self) -> int:
        return self._size

    def remembers(self, signed_at: float) -> bool:
        """Whether a nonce signed at ``signed_at`` would be here had it been seen."""
        return signed_at >= self.started_at

    def check_and_add(self, site: str, nonce: str, signed_at: float, now: float) -> bool:
        """Record the nonce; False when it was seen already (a replay)."""
        self._expire(now)
        index = int(signed_at // BUCKET_S)
        digest = hashlib.blake2b(f"{site}\0{nonce}".encode(), digest_size=8).digest()
        entry = int.from_bytes(digest, "big")
        bucket = self._buckets.get(index)
        if bucket is not None and entry in bucket:
            return False
        if self._size >= self.capacity:
            raise ReplayCacheFull(f"{self._size} nonces in the window")
        if bucket is None:
            bucket = self._buckets[index] = set()
            self._oldest = min(self._oldest, index)
        bucket.add(entry)
        self._size += 1
        return True

    def _expire(self, now: float) -> None:
        # A bucket may go once its newest signed time is past the window.
        last = int((now - self.window_s) // BUCKET_S) - 1
        while self._oldest <= last:
            dropped = self._buckets.pop(int(self._oldest), None)
            if dropped is not None:
                self._size -= len(dropped)
            self._oldest += 1
            if not self._buckets:
                self._oldest = math.inf
                break
        if self._buckets and self._oldest == math.inf:  # pragma: no cover - defensive
            self._oldest = min(self._buckets)


def admit(
    nonces: NonceCache, site: str, nonce: str, signed_at: float, now: float, *, changes: bool
) -> None:
    """Record a site request's nonce, or refuse the request (ApiError): 401
    ``signed_before_start`` for one that ``changes`` something signed before the cache
    began, 401 ``replayed_request`` for a nonce seen already, 503 ``busy`` when full."""
    if changes and not nonces.remembers(signed_at):
        raise ApiError(
            401,
            "signed_before_start",
            f"this request of site {site!r} was signed before the hub started: the record "
            "of the requests it accepted before is gone, so it could be a replay; sign it "
            "again (the site link does when it retries)",
        )
    try:
        fresh = nonces.check_and_add(site, nonce, signed_at, now)
    except ReplayCacheFull as exc:
        logger.error("site request refused: replay cache full (%s)", exc)
        raise ApiError(503, "busy", "too many site requests in the window") from None
    if not fresh:
        raise ApiError(
            401,
            "replayed_request",
            f"this request of site {site!r} (nonce {nonce}) was received already: a signed "
            "request is accepted once",
        )
