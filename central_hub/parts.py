"""The hub's parts, composed around its one ledger: what the HTTP routes are given.

``HubParts`` builds each part with only what it uses (the ledger, another part, a few
settings of ``HubConfig``) and wires the callbacks between them: a kept report or a new
deployment wakes the hub's driver, an appended delta is published by the gossip member
while it runs. ``central_hub.service.Hub`` opens the data directory into them, runs the
driver and the servers; ``central_hub.api`` and the other route modules call the parts.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from central_hub.accounts import Accounts
from central_hub.alerting import Alerting
from central_hub.config import HubConfig
from central_hub.deltaformat import DeltaFormat
from central_hub.deployments import Deployments
from central_hub.gossip import HubGossip
from central_hub.holds import SiteFacts
from central_hub.ledger import Ledger
from central_hub.logs import HubLogs, LogLimits
from central_hub.reports import Reports, renew_after
from central_hub.sites import Sites, SiteTimes
from central_hub.snapshots import Snapshots, registered_sites
from central_hub.trends import TrendBook
from central_hub.vault_service import VaultService


class HubParts:
    """The parts of one hub (see the module docstring). ``wake`` wakes the hub's driver;
    ``gossip`` is the gossip member while it runs (set by ``Hub``)."""

    def __init__(self, config: HubConfig, wake: Callable[[], None]) -> None:
        c = config
        self.gossip: HubGossip | None = None
        self.ledger = Ledger(c.data_dir, c.clock, c.delta_ttl_s, on_append=self._appended)
        self.ledger.kek = c.kek
        self.accounts = Accounts(self.ledger)
        self.reports = Reports(self.ledger, on_report=wake, renew_s=renew_after(c.site_stale_s))
        self.deployments = Deployments(
            self.ledger,
            self.accounts,
            self.reports,
            c.wave_timeout_s,
            on_activate=wake,
            thresholds=c.interlock,
        )
        self.vault = VaultService(self.ledger, self.reports)
        self.logs = HubLogs(
            self.ledger, LogLimits(c.logs_max_age_s, c.logs_max_bytes, c.logs_retention_every_s)
        )
        self.sites = Sites(
            self.ledger,
            self.reports,
            self.deployments,
            SiteTimes(c.enroll_ttl_s, c.site_stale_s, c.rejection_window_s),
            secrets=self.vault.site_view,
            gossip=lambda: self.gossip,
        )
        self.site_facts = SiteFacts(self.ledger)  # a site's key and hold, per report
        self.snapshots = Snapshots(self.ledger, self.reports, c.delta_keep, c.compact_every_s)
        self.delta_format = DeltaFormat(
            c.delta_format,
            lambda: registered_sites(self.ledger.store),
            lambda site: self.ledger.store.get_json("sites", site) is not None,
            self.reports.latest,
        )
        self.ledger.delta_format = self.delta_format.current
        self.ledger.signed_target = self.delta_format.signed_target
        self.sites.listeners.append(self.delta_format.site_changed)
        self.trends = TrendBook()
        self.reports.listeners.append(self._sample_trend)
        self.sites.listeners.append(self._forget_trend)
        self.reports.listeners.append(self.delta_format.reported)
        self.sites.listeners.append(self.vault.site_changed)
        self.alerting = Alerting(
            self.ledger,
            self.reports,
            self.sites,
            c.alert_thresholds,
            hold_s=c.site_stale_s,
            stale_s=c.site_stale_s,
        )

    def _sample_trend(
        self, site: str, _previous: dict[str, Any] | None, report: dict[str, Any]
    ) -> None:
        self.trends.record(site, report, self.ledger.now())

    def _forget_trend(self, site: str) -> None:
        if self.ledger.store.get_json("sites", site) is None:  # deleted
            self.trends.forget(site)

    def _appended(self) -> None:
        if self.gossip is not None:
            self.gossip.publish_head()
