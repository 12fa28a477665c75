"""The latest report of each site (the ``reports`` database).

Kept in memory for the fleet view, the rollout driver, the alerts and the vault, and
written to the store in batches: the sites whose report changed are written together
``PERSIST_EVERY_S`` after the first of them, in one transaction without a flush, and at
stop (``close``). A crash loses at most that much; a lost report is sent again seconds
later. A report overtaken by a newer one (``fleetview.is_stale_report``) is ignored.

A report that only renews the last one (the same ``fleetview.progress``: nothing changed
but its time and its hosts' resource samples, and the same for each of ``watchers``, e.g.
which hosts are over the alert thresholds) is kept without telling the listeners or
writing it, unless the last report they were told of is ``renew_s`` old: a site that
reports every few seconds costs them one call per ``renew_s``, and one per change. A site
heard again after a silence of ``renew_s`` is always told of (its alerts clear).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from central_hub import fleetview
from central_hub.ledger import Ledger
from central_hub.store import Store, put_json

logger = logging.getLogger(__name__)

PERSIST_EVERY_S = 1.0
# An unchanged report reaches the listeners (the host alerts and trends read its resource
# samples) and the store at least this often (``renew_after``).
RENEW_S = 15.0


def renew_after(site_stale_s: float) -> float:
    """How long an unchanged report is a renewal: at most half the stale window, so a
    site that was offline is heard of again with its first report."""
    return min(RENEW_S, site_stale_s / 2)


Received = tuple[dict[str, Any], float]  # a report and when the hub received it
# Called when a report is kept: the site, its previous report (None: none), the new one.
Listener = Callable[[str, dict[str, Any] | None, dict[str, Any]], None]


class Reports:
    """The sites' latest reports (see the module docstring). ``on_report`` is called
    when a report is kept (the hub wakes its rollout driver); each of ``listeners`` with
    the site and its previous and new reports (the alerts, the vault: O(1) each)."""

    def __init__(
        self,
        ledger: Ledger,
        on_report: Callable[[], None] | None = None,
        renew_s: float = RENEW_S,
    ) -> None:
        self.ledger = ledger
        self.on_report = on_report
        self.renew_s = renew_s
        self._reports: dict[str, Received] = {}
        self.listeners: list[Listener] = []
        self._unsaved: set[str] = set()  # sites whose latest report is not in the store
        # What listeners saw (the progress, then each watcher's), and when.
        self._told: dict[str, tuple[tuple[object, ...], float]] = {}
        # What else of a report must reach the listeners at once when it changes.
        self.watchers: list[Callable[[dict[str, Any]], object]] = []
        self._saving: asyncio.Task[None] | None = None

    def restore(self, store: Store) -> None:
        """The reports kept by the last run."""
        for record in store.values_json("reports"):
            self._reports[record["report"]["site"]] = (record["report"], record["received_at"])

    def view_args(self, site_id: str) -> tuple[dict[str, Any] | None, float | None]:
        """The site's report and when it was received (None, None: none yet)."""
        return self._reports.get(site_id, (None, None))

    def latest(self, site_id: str) -> dict[str, Any] | None:
        return self.view_args(site_id)[0]

    def all(self) -> dict[str, dict[str, Any]]:
        """Every site's latest report."""
        return {site: report for site, (report, _) in self._reports.items()}

    def forget(self, site_id: str) -> None:
        self._reports.pop(site_id, None)
        self._told.pop(site_id, None)

    async def record(self, site_id: str, report: dict[str, Any]) -> bool:
        """Keep ``report`` as the site's latest (False: a newer one is kept, it is ignored)."""
        now = self.ledger.now()
        previous = self._reports.get(site_id)
        if previous is not None and fleetview.is_stale_report(report, *previous, now):
            logger.info("site %s: a report overtaken by a newer one, ignored", site_id)
            return False
        self._reports[site_id] = (report, now)
        moved = (fleetview.progress(report), *(watch(report) for watch in self.watchers))
        told = self._told.get(site_id)
        if told is not None and told[0] == moved and 0 <= now - told[1] < self.renew_s:
            return True  # a renewal: nothing a listener reads has moved
        self._told[site_id] = (moved, now)
        for listener in self.listeners:
            listener(site_id, None if previous is None else previous[0], report)
        if self.on_report is not None:
            self.on_report()

        self._unsaved.add(site_id)
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save_later())
        return True

    def seen(self, site_id: str, site_time: float, digest: str) -> bool:
        """A replica's word that ``site_id`` reported again with nothing changed but its
        clock and its hosts' resource samples (``central_hub.relay``) since the report whose
        progress has ``fleetview.progress_digest`` ``digest``: if that is the kept one, it
        takes the new ``time`` and the site counts as heard now; nothing else moves, so no listener
        is told and nothing is written. False: the kept report is another (or none, or one
        restored from an earlier run): nothing renewed."""
        kept, told = self._reports.get(site_id), self._told.get(site_id)
        if kept is None or told is None:
            return False
        # The kept report's progress is the one listeners were told of (a renewal keeps it).
        told_progress = told[0][0]
        if (
            not isinstance(told_progress, bytes)
            or fleetview.progress_digest(told_progress) != digest
        ):
            return False
        report, _received_at = kept
        if site_time > float(report["time"]):
            report = {**report, "time": site_time}
        self._reports[site_id] = (report, self.ledger.now())
        return True

    async def _save_later(self) -> None:
        await asyncio.sleep(PERSIST_EVERY_S)
        await self.save()

    async def save(self) -> None:
        """Write the reports received since the last save (one transaction)."""
        unsaved, self._unsaved = self._unsaved, set()
        writes = [
            put_json("reports", site, {"report": received[0], "received_at": received[1]})
            for site in sorted(unsaved)
            if (received := self._reports.get(site)) is not None
        ]
        if writes and self.ledger.is_open:
            try:
                await self.ledger.store.apply(writes, sync=False)
            except Exception:
                logger.exception("site reports not saved; kept in memory")

    async def close(self) -> None:
        """Stop the timer and save what is left (the hub is stopping)."""
        saving, self._saving = self._saving, None
        if saving is not None and not saving.done():
            saving.cancel()
            await asyncio.gather(saving, return_exceptions=True)
        await self.save()
