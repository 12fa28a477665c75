"""Retention of the hub's audit log: bounded in entries and in age, pruned incrementally.

The audit log (``central_hub.audit``) is keyed by sequence number, so its oldest entries
are its first keys: pruning reads from the first key on (a range read, never a scan of
the log) and deletes, in one transaction per batch of at most ``batch`` entries, those
past ``max_entries`` (the newest are kept) or older than ``max_age_s``; each transaction
holds the hub's write lock for one batch only. The hub's driver calls ``prune`` every
``every_s``; a run deletes at most ``max_batches`` batches and the next run goes on.
Sequence numbers never move back: ``GET /v1/audit?after=N`` keeps its meaning, it just
starts at the oldest entry kept. ``meta/audit_pruned_through`` is the last sequence
number pruned.
"""

from __future__ import annotations

import contextlib
import logging
from typing import Any

from central_hub.ledger import Ledger, Txn
from central_hub.store import version_key

logger = logging.getLogger(__name__)

EVERY_S = 60.0
BATCH = 1000
MAX_BATCHES = 20


class AuditRetention:
    """Prunes the audit log to ``max_entries`` and ``max_age_s`` (None: no bound)."""

    def __init__(
        self,
        ledger: Ledger,
        max_entries: int | None,
        max_age_s: float | None,
        *,
        every_s: float = EVERY_S,
        batch: int = BATCH,
        max_batches: int = MAX_BATCHES,
    ) -> None:
        self.ledger = ledger
        self.max_entries = max_entries
        self.max_age_s = max_age_s
        self.every_s = every_s
        self.batch = batch
        self.max_batches = max_batches
        self._pruned_at: float | None = None
        self.pruned = 0  # entries pruned since start

    def due(self, now: float) -> bool:
        if self.max_entries is None and self.max_age_s is None:
            return False
        return self._pruned_at is None or now - self._pruned_at >= self.every_s

    async def prune(self) -> int:
        """Delete what is past the bounds, a batch per transaction; the entries deleted."""
        self._pruned_at = self.ledger.now()
        deleted = 0
        for _ in range(self.max_batches):
            count = await self.ledger.transact(self._plan)
            deleted += count
            if count < self.batch:
                break
        self.pruned += deleted
        if deleted:
            logger.info("audit log: %d old entries pruned", deleted)
        return deleted

    def _plan(self, txn: Txn) -> int:
        store = self.ledger.store
        last = store.last_sequence("audit")
        keep_from = 0 if self.max_entries is None else last - self.max_entries + 1
        oldest = None if self.max_age_s is None else txn.now - self.max_age_s
        doomed: list[int] = []
        entries: Any = store.sequence_after("audit", 0)
        with contextlib.closing(entries):
            for entry in entries:
                seq = int(entry["seq"])
                if seq >= keep_from and (oldest is None or float(entry["at"]) >= oldest):
                    break
                doomed.append(seq)
                if len(doomed) >= self.batch:
                    break
        for seq in doomed:
            txn.writes.append(("audit", version_key(seq), None))
        if doomed:
            txn.put("meta", "audit_pruned_through", doomed[-1])
        return len(doomed)
