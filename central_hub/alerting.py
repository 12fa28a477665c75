"""The hub's alerts over time: evaluated from the fleet view, kept in the ``alerts`` database.

``Alerting`` feeds the pure rules of ``central_hub.alerts`` (which conditions hold, the
``AlertBook`` of active and cleared alerts) with the sites' summaries and reports, and
keeps active alerts in the store: fired and cleared ones without a flush, one write after
the other under a lock (a clear never overtakes its firing); an acknowledgement durably,
with its audit entry, in that order too. After a restart the stored alerts are held for
``hold_s`` while the sites report again.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import orjson

from central_hub import alerts, tokens
from central_hub.alerts import Alert, AlertBook, Thresholds, record_key
from central_hub.errors import ApiError, BadStoredRecord
from central_hub.ledger import Ledger, Txn
from central_hub.reports import Reports
from central_hub.store import Store, Write, delete, put_json
from central_hub.tokens import TokenRecord

logger = logging.getLogger(__name__)

ALERTS_EVERY_S = 2.0

Summaries = Callable[[], list[dict[str, Any]]]  # every site's summary (Sites.list_sites)


class Alerting:
    """Alerts fired, cleared and acknowledged (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        reports: Reports,
        summaries: Summaries,
        thresholds: Thresholds,
        hold_s: float,
    ) -> None:
        self.ledger = ledger
        self.reports = reports
        self.summaries = summaries
        self.thresholds = thresholds
        self.hold_s = hold_s
        self.book = AlertBook()
        self._behind_since: dict[str, float] = {}  # site -> first seen behind the head
        self._refreshed_at = 0.0
        self._started_at = 0.0
        self._lock = asyncio.Lock()

    def restore(self, store: Store, started_at: float) -> None:
        """The alerts kept by the last run; sites heard of only before ``started_at``
        keep theirs for ``hold_s``."""
        self._started_at = started_at
        self.book.restore(stored_alerts(store), hold_until=started_at + self.hold_s)

    def due(self, now: float) -> bool:
        """Whether the driver should ``refresh`` (every ``ALERTS_EVERY_S``)."""
        return now - self._refreshed_at >= ALERTS_EVERY_S

    def refresh(self) -> None:
        """Fire and clear alerts from the fleet view as it is now (central_hub.alerts)."""
        now = self.ledger.now()
        self._refreshed_at = now
        summaries = self.summaries()
        head = self.ledger.head.version
        for summary in summaries:
            site = summary["id"]
            if (summary.get("applied_version") or 0) < head:
                self._behind_since.setdefault(site, now)
            else:
                self._behind_since.pop(site, None)
        tenants = {
            app["name"]: app.get("tenant", "default")
            for app in self.ledger.store.values_json("apps")
        }
        found = alerts.conditions(
            summaries, self.reports.all(), tenants, head, self._behind_since, now, self.thresholds
        )
        heard = {s["id"] for s in summaries if (s["last_seen"] or 0) >= self._started_at}
        changes = self.book.update(found, now, heard)
        writes = [put_json("alerts", record_key(a.id), a.to_record()) for a in changes.fired]
        writes += [delete("alerts", record_key(a.id)) for a in changes.cleared]
        if writes:
            self._keep(writes)

    def _keep(self, writes: list[Write]) -> None:
        """Commit fired and cleared alerts in a worker thread, in order (no flush: the
        conditions are evaluated again after a crash)."""

        async def write() -> None:
            async with self._lock:
                if self.ledger.is_open:
                    await asyncio.to_thread(self.ledger.store.commit, writes, sync=False)

        task = asyncio.ensure_future(write())
        self.ledger.track(task)
        task.add_done_callback(_log_write_failure)

    def list_alerts(self, token: TokenRecord) -> list[dict[str, Any]]:
        tokens.authorize(token, "alerts.read")
        self.refresh()
        return [
            a.to_json()
            for a in self.book.listing()
            if tokens.is_fleet(token) or (a.tenant is not None and tokens.reaches(token, a.tenant))
        ]

    async def acknowledge_alert(self, token: TokenRecord, alert_id: str) -> dict[str, Any]:
        tokens.authorize(token, "alerts.ack")

        def plan(txn: Txn) -> Alert:
            alert = self.book.acknowledge(alert_id, token.id, txn.now)
            if alert is None:
                raise ApiError(404, "not_found", f"no active alert {alert_id!r}")
            txn.put("alerts", record_key(alert_id), alert.to_record())
            txn.audit(token, "alert.ack", alert.tenant, "alert", alert_id, "ok")
            return alert

        async with self._lock:  # after the alert's firing is written
            alert = await self.ledger.transact(plan)
        return alert.to_json()


def stored_alerts(store: Store) -> list[Alert]:
    """The active alerts kept by the last run; a record that does not parse is skipped."""
    found = []
    for key, raw in store.items("alerts"):
        try:
            found.append(Alert.from_record(key, orjson.loads(raw)))
        except (BadStoredRecord, orjson.JSONDecodeError) as exc:
            logger.warning("stored alert %r skipped: %s", key[:200], exc)
    return found


def _log_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("alerts were not written to the store: %s", future.exception())
