"""The latest report of each site (the ``reports`` database).

Kept in memory for the fleet view, the rollout driver, the alerts and the vault, and
written to the store in batches: the sites whose report changed are written together
``PERSIST_EVERY_S`` after the first of them, in one transaction without a flush, and at
stop (``close``). A crash loses at most that much; a lost report is sent again seconds
later. A report overtaken by a newer one (``fleetview.is_stale_report``) is ignored.
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
Received = tuple[dict[str, Any], float]  # a report and when the hub received it
# Called when a report is kept: the site, its previous report (None: none), the new one.
Listener = Callable[[str, dict[str, Any] | None, dict[str, Any]], None]


class Reports:
    """The sites' latest reports (see the module docstring). ``on_report`` is called
    when a report is kept (the hub wakes its rollout driver); each of ``listeners`` with
    the site and its previous and new reports (the alerts, the vault: O(1) each)."""

    def __init__(self, ledger: Ledger, on_report: Callable[[], None] | None = None) -> None:
        self.ledger = ledger
        self.on_report = on_report
        self._reports: dict[str, Received] = {}
        self.listeners: list[Listener] = []
        self._unsaved: set[str] = set()  # sites whose latest report is not in the store
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

    async def record(self, site_id: str, report: dict[str, Any]) -> bool:
        """Keep ``report`` as the site's latest (False: a newer one is kept, it is ignored)."""
        now = self.ledger.now()
        previous = self._reports.get(site_id)
        if previous is not None and fleetview.is_stale_report(report, *previous, now):
            logger.info("site %s: a report overtaken by a newer one, ignored", site_id)
            return False
        self._reports[site_id] = (report, now)
        for listener in self.listeners:
            listener(site_id, None if previous is None else previous[0], report)
        if self.on_report is not None:
            self.on_report()

        self._unsaved.add(site_id)
        if self._saving is None or self._saving.done():
            self._saving = asyncio.ensure_future(self._save_later())
        return True

    def seen(self, site_id: str, site_time: float) -> bool:
        """A replica's word that ``site_id`` reported again with nothing changed but its
        clock and its hosts' resource samples (``central_hub.relay``): the kept report
        takes the new ``time`` and the site counts as heard now; nothing else moves, so no
        listener is told and nothing is written. False: no report is kept to renew."""
        kept = self._reports.get(site_id)
        if kept is None:
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
