"""The hub's alerts over time: evaluated from the fleet view, kept in the ``alerts`` database.

``Alerting`` feeds the pure rules of ``central_hub.alerts`` (which conditions hold, the
``AlertBook`` of active and cleared alerts) with the sites' summaries and reports, one
site at a time: a site is evaluated again when something that moves its alerts happens
(its report or gossip summary arrives, it is registered, relabelled or deleted: it is
marked) or when its next deadline passes (``central_hub.deadlines``: its last word gets
older than the stale window, it has been behind the head for ``lag_s``, the hold after
a restart ends). A pass (``refresh``, every ``ALERTS_EVERY_S`` and before a listing)
costs O(marked + expired sites), not O(sites); the first one after the start looks at
every site, ``MAX_PER_PASS`` at a time.

It keeps active alerts in the store: fired and cleared ones without a flush, one write after
the other under a lock (a clear never overtakes its firing); an acknowledgement durably,
with its audit entry, in that order too. After a restart the stored alerts are held for
``hold_s`` while the sites report again.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Protocol

import orjson

from central_hub import alerts, tokens
from central_hub.alerts import Alert, AlertBook, Thresholds, record_key
from central_hub.deadlines import Deadlines
from central_hub.errors import ApiError, BadStoredRecord
from central_hub.ledger import Ledger, Txn
from central_hub.model import DEFAULT_TENANT, is_id
from central_hub.reports import Reports
from central_hub.store import Store, Write, delete, put_json
from central_hub.tokens import TokenRecord

logger = logging.getLogger(__name__)

ALERTS_EVERY_S = 2.0
STALE_MARGIN_S = 0.001  # past the stale window, so the site is stale when evaluated
MAX_PER_PASS = 2000  # sites evaluated in one pass at most (the rest: the next pass)


class SiteViews(Protocol):
    """What the alerts read of the sites (``central_hub.sites.Sites``)."""

    listeners: list[Callable[[str], None]]

    def summary(self, site_id: str) -> dict[str, Any] | None: ...

    def site_ids(self) -> list[str]: ...


class _AppTenants(Mapping[str, str]):
    """The tenant of an application, read from the store when asked (an unhealthy
    application's alert belongs to its tenant)."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def __getitem__(self, name: str) -> str:
        app = self.store.get_json("apps", name) if is_id(name) else None
        if app is None:
            raise KeyError(name)
        return str(app.get("tenant", DEFAULT_TENANT))

    def __iter__(self) -> Iterator[str]:
        return iter(self.store.keys("apps"))

    def __len__(self) -> int:
        return len(self.store.keys("apps"))


class Alerting:
    """Alerts fired, cleared and acknowledged (see the module docstring)."""

    def __init__(
        self,
        ledger: Ledger,
        reports: Reports,
        sites: SiteViews,
        thresholds: Thresholds,
        hold_s: float,
        stale_s: float | None = None,
    ) -> None:
        self.ledger = ledger
        self.reports = reports
        self.sites = sites
        self.thresholds = thresholds
        self.hold_s = hold_s
        self.stale_s = hold_s if stale_s is None else stale_s  # the sites' stale window
        self.book = AlertBook()
        self._behind_since: dict[str, float] = {}  # site -> first seen behind the head
        self._refreshed_at = 0.0
        self._started_at = 0.0
        self._lock = asyncio.Lock()
        self._marked: dict[str, None] = {}  # sites to evaluate on the next pass, in order
        self._everyone = True  # the first pass evaluates every site
        self.deadlines: Deadlines[str] = Deadlines()
        reports.listeners.append(lambda site, _previous, _report: self.mark(site))
        reports.watchers.append(lambda report: alerts.over_thresholds(report, self.thresholds))
        sites.listeners.append(self.mark)

    def mark(self, site: str) -> None:
        """Something that may move ``site``'s alerts happened: evaluate it on the next pass."""
        self._marked[site] = None

    def restore(self, store: Store, started_at: float) -> None:
        """The alerts kept by the last run; sites heard of only before ``started_at``
        keep theirs for ``hold_s``."""
        self._started_at = started_at
        self.book.restore(stored_alerts(store), hold_until=started_at + self.hold_s)

    def due(self, now: float) -> bool:
        """Whether the driver should ``refresh`` (every ``ALERTS_EVERY_S``)."""
        return now - self._refreshed_at >= ALERTS_EVERY_S

    def refresh(self) -> None:
        """Fire and clear alerts of the sites marked or due (see the module docstring)."""
        now = self.ledger.now()
        self._refreshed_at = now
        if self._everyone:
            self._everyone = False
            for site in [*self.sites.site_ids(), *(a.site for a in self.book.active.values())]:
                self._marked[site] = None
        todo = list(itertools.islice(self._marked, MAX_PER_PASS))
        for site in todo:
            del self._marked[site]
        todo += self.deadlines.expired(now, MAX_PER_PASS)
        if not todo:
            return
        head = self.ledger.head.version
        tenants = _AppTenants(self.ledger.store)
        fired: list[Alert] = []
        cleared: list[Alert] = []
        for site in dict.fromkeys(todo):
            changes = self._evaluate(site, now, head, tenants)
            fired += changes.fired
            cleared += changes.cleared
        writes = [put_json("alerts", record_key(a.id), a.to_record()) for a in fired]
        writes += [delete("alerts", record_key(a.id)) for a in cleared]
        if writes:
            self._keep(writes)

    def _evaluate(
        self, site: str, now: float, head: int, tenants: Mapping[str, str]
    ) -> alerts.Changes:
        """One site's conditions now, into the book; its next deadline scheduled."""
        # Behind what concerns the site: with per-site views it gets other sites' deltas
        # (their headers) only with its next poll answer, up to a poll's wait later.
        head = min(head, self.ledger.site_head(site))
        summary = self.sites.summary(site)
        if summary is None:  # deleted: its alerts clear
            self._behind_since.pop(site, None)
            self.deadlines.cancel(site)
            return self.book.update_site(site, [], now, heard=True)
        behind = (summary.get("applied_version") or 0) < head
        if behind:
            self._behind_since.setdefault(site, now)
        else:
            self._behind_since.pop(site, None)
        report = self.reports.latest(site)
        found = alerts.conditions(
            [summary],
            {} if report is None else {site: report},
            tenants,
            head,
            self._behind_since,
            now,
            self.thresholds,
        )
        last_seen = summary.get("last_seen")
        heard = last_seen is not None and last_seen >= self._started_at
        changes = self.book.update_site(site, found, now, heard)
        offline = any(c.kind == "site_offline" for c in found)
        due = []
        if last_seen is not None and not offline:
            due.append(last_seen + self.stale_s + STALE_MARGIN_S)  # goes silent
        since = self._behind_since.get(site)
        if behind and since is not None and now - since < self.thresholds.lag_s:
            due.append(since + self.thresholds.lag_s)  # lags for long enough
        if self.book.holds_restored(site) and now < self.book.hold_until:
            due.append(self.book.hold_until)
        if due:
            self.deadlines.schedule(site, min(due))
        else:
            self.deadlines.cancel(site)
        return changes

    def _keep(self, writes: list[Write]) -> None:
        """Commit fired and cleared alerts in a worker thread, in order (no flush: the
        conditions are evaluated again after a crash)."""

        async def write() -> None:
            async with self._lock:
                if self.ledger.is_open:
                    await self.ledger.store.apply(writes, sync=False)

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
