"""Fleet alerts: conditions read from the fleet view, fired and cleared over time (pure).

``conditions`` turns what the hub knows of each site (its summary, its last report, the
delta head) into the conditions that hold now; ``AlertBook.update`` fires an alert when
its condition appears, keeps it while it holds (an acknowledgement sticks until it
clears), and clears it when the condition is gone. Ids are stable
(``kind:site[:subject]``), so an alert that clears and comes back is a new firing.

``update`` takes the conditions of the whole fleet; ``update_site`` those of one site
and touches only that site's alerts (the hub evaluates a site when its state changes:
O(1) in the number of sites). The book does no I/O: both return what changed
(``Changes``: fired, cleared) and the service keeps the active alerts in its store
(``to_record``, ``from_record``), written on fire, acknowledgement and clear. At start
``restore`` puts them back: one whose condition still holds keeps its id, ``since`` and
acknowledgement; one whose condition is gone is cleared, but only once the hub knows,
i.e. its site was heard from since the start or ``hold_until`` has passed (a hub down for
a while first sees every site stale).

Kinds: ``site_offline`` (no report or gossip within the stale window; a site never heard
from since it was registered says it is awaiting its first report), ``site_lagging``
(applied delta version behind the head for longer than ``lag_s``), ``app_unhealthy`` (an
application failed or degraded at a site), ``host_disk`` / ``host_memory`` (a host over a
threshold).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Container, Iterable, Mapping
from dataclasses import dataclass, replace
from typing import Any

from central_hub.errors import BadStoredRecord

UNHEALTHY_APP_STATES = ("failed", "degraded")
RESOLVED_KEPT = 200
RECORD_VERSION = 1
_MAX_KEY_BYTES = 400  # LMDB keys stop at 511 bytes; a host id may be longer


def record_key(alert_id: str) -> str:
    """The store key of an alert: its id, or a digest of a very long one."""
    raw = alert_id.encode()
    return alert_id if len(raw) <= _MAX_KEY_BYTES else "sha256:" + hashlib.sha256(raw).hexdigest()


@dataclass(frozen=True, slots=True)
class Thresholds:
    disk_used_pct: float = 90.0
    memory_used_pct: float = 95.0
    lag_s: float = 120.0


@dataclass(frozen=True, slots=True)
class Condition:
    id: str
    kind: str
    site: str
    message: str
    tenant: str | None = None  # app alerts belong to the app's tenant


@dataclass(frozen=True, slots=True)
class Alert:
    id: str
    kind: str
    site: str
    message: str
    since: float
    tenant: str | None = None
    acknowledged_by: str | None = None
    acknowledged_at: float | None = None
    cleared_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "kind": self.kind,
            "site": self.site,
            "message": self.message,
            "since": self.since,
            "acknowledged": self.acknowledged_by is not None,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
            "cleared_at": self.cleared_at,
            "active": self.cleared_at is None,
        }

    def to_record(self) -> dict[str, Any]:
        """The stored form of an active alert (``from_record`` reads it back)."""
        return {
            "v": RECORD_VERSION,
            "id": self.id,
            "kind": self.kind,
            "site": self.site,
            "message": self.message,
            "since": self.since,
            "tenant": self.tenant,
            "acknowledged_by": self.acknowledged_by,
            "acknowledged_at": self.acknowledged_at,
        }

    @classmethod
    def from_record(cls, key: str, data: object) -> Alert:
        """An active alert from its stored record under ``key``, or BadStoredRecord."""
        if not isinstance(data, dict) or data.get("v") != RECORD_VERSION:
            raise BadStoredRecord(f"alert {key!r}: not a version {RECORD_VERSION} record")

        def text(name: str, optional: bool = False) -> Any:
            value = data.get(name)
            if isinstance(value, str) or (optional and value is None):
                return value
            raise BadStoredRecord(f"alert {key!r}: {name} must be a string")

        def number(name: str, optional: bool = False) -> Any:
            value = data.get(name)
            if type(value) in (int, float) or (optional and value is None):
                return value
            raise BadStoredRecord(f"alert {key!r}: {name} must be a number")

        alert = cls(
            text("id"),
            text("kind"),
            text("site"),
            text("message"),
            number("since"),
            text("tenant", optional=True),
            text("acknowledged_by", optional=True),
            number("acknowledged_at", optional=True),
        )
        if record_key(alert.id) != key:
            raise BadStoredRecord(f"alert {key!r}: the record is of {alert.id!r}")
        return alert


@dataclass(frozen=True, slots=True)
class Changes:
    """What an ``update`` changed, for the store: alerts fired (to keep) and cleared (to
    forget). A changed message alone is not a change (it is recomputed on every update)."""

    fired: list[Alert]
    cleared: list[Alert]


def conditions(
    summaries: Iterable[Mapping[str, Any]],
    reports: Mapping[str, Mapping[str, Any]],
    app_tenants: Mapping[str, str],
    head: int,
    lag_since: Mapping[str, float],
    now: float,
    thresholds: Thresholds,
) -> list[Condition]:
    """``lag_since``: when each site was first seen behind the head (kept by the caller)."""
    found: list[Condition] = []
    for summary in summaries:
        site = str(summary["id"])
        if summary.get("health") == "unreachable" or summary.get("last_seen") is None:
            # Registered before its agents started is the usual start: not "offline" yet.
            waiting = summary.get("last_seen") is None
            message = "is awaiting its first report" if waiting else "is not heard from"
            found.append(
                Condition(f"site_offline:{site}", "site_offline", site, f"site {site} {message}")
            )
            continue
        applied = summary.get("applied_version") or 0
        behind_since = lag_since.get(site)
        if applied < head and behind_since is not None and now - behind_since >= thresholds.lag_s:
            found.append(
                Condition(
                    f"site_lagging:{site}",
                    "site_lagging",
                    site,
                    f"site {site} applied delta {applied}, the head is {head} "
                    f"(behind for {now - behind_since:.0f} s)",
                )
            )
        report = reports.get(site)
        if report is None:
            continue
        for app, status in report.get("apps", {}).items():
            if status.get("state") in UNHEALTHY_APP_STATES:
                found.append(
                    Condition(
                        f"app_unhealthy:{site}:{app}",
                        "app_unhealthy",
                        site,
                        f"{app} at {site} is {status['state']}: {status.get('message') or '-'}",
                        app_tenants.get(app),
                    )
                )
        for host in report.get("hosts", []):
            use = host.get("resources") or {}
            host_id = host["host_id"]
            for kind, field, limit in (
                ("host_disk", "disk_used_pct", thresholds.disk_used_pct),
                ("host_memory", "memory_used_pct", thresholds.memory_used_pct),
            ):
                value = use.get(field)
                if isinstance(value, int | float) and value >= limit:
                    what = "disk" if kind == "host_disk" else "memory"
                    found.append(
                        Condition(
                            f"{kind}:{site}:{host_id}",
                            kind,
                            site,
                            f"{site}/{host_id} {what} {value:.0f}% used (threshold {limit:.0f}%)",
                        )
                    )
    return found


def over_thresholds(report: Mapping[str, Any], thresholds: Thresholds) -> tuple[object, ...]:
    """Which of the report's hosts are over the disk and memory thresholds: what of its
    resource samples moves a host alert (``Reports`` tells its listeners when it changes)."""
    flags: list[object] = []
    for host in report.get("hosts", []):
        use = host.get("resources") or {}
        for field, limit in (
            ("disk_used_pct", thresholds.disk_used_pct),
            ("memory_used_pct", thresholds.memory_used_pct),
        ):
            value = use.get(field)
            if isinstance(value, int | float) and value >= limit:
                flags.append((host["host_id"], field))
    return tuple(flags)


class AlertBook:
    """Active alerts and the recently resolved ones."""

    def __init__(self) -> None:
        self.active: dict[str, Alert] = {}
        self.resolved: list[Alert] = []
        self._of_site: dict[str, set[str]] = {}  # site -> ids of its active alerts
        self._restored: set[str] = set()  # put back by restore, condition not seen since
        self._hold_until = 0.0

    def restore(self, stored: Iterable[Alert], hold_until: float) -> None:
        """Alerts kept by an earlier run (see the module docstring)."""
        for alert in stored:
            self._add(alert)
            self._restored.add(alert.id)
        self._hold_until = hold_until

    def update(
        self, current: Iterable[Condition], now: float, heard: Container[str] = ()
    ) -> Changes:
        """``heard``: the sites heard from since the hub started."""
        holding = {c.id: c for c in current}
        gone = [a for a in self.active if a not in holding]
        return self._apply(holding, gone, now, lambda site: site in heard)

    def update_site(
        self, site: str, current: Iterable[Condition], now: float, heard: bool
    ) -> Changes:
        """``update`` for one site: ``current`` are its conditions (of no other site), and
        only its alerts may fire or clear. ``heard``: whether it was heard from since the
        hub started."""
        holding = {c.id: c for c in current}
        gone = [a for a in self._of_site.get(site, ()) if a not in holding]
        return self._apply(holding, gone, now, lambda _: heard)

    def holds_restored(self, site: str) -> bool:
        """Whether a restored alert of ``site`` is kept only until the hold ends."""
        return any(a in self._restored for a in self._of_site.get(site, ()))

    @property
    def hold_until(self) -> float:
        return self._hold_until

    def _add(self, alert: Alert) -> None:
        self.active[alert.id] = alert
        self._of_site.setdefault(alert.site, set()).add(alert.id)

    def _remove(self, alert_id: str) -> Alert:
        alert = self.active.pop(alert_id)
        ids = self._of_site.get(alert.site)
        if ids is not None:
            ids.discard(alert_id)
            if not ids:
                del self._of_site[alert.site]
        return alert

    def _apply(
        self,
        holding: Mapping[str, Condition],
        gone: Iterable[str],
        now: float,
        heard: Callable[[str], bool],
    ) -> Changes:
        changes = Changes([], [])
        for alert_id in list(gone):
            if (
                alert_id in self._restored
                and now < self._hold_until
                and not heard(self.active[alert_id].site)
            ):
                continue  # restored, and the hub does not know its site's state yet
            self._restored.discard(alert_id)
            cleared = replace(self._remove(alert_id), cleared_at=now)
            self.resolved.append(cleared)
            changes.cleared.append(cleared)
        del self.resolved[:-RESOLVED_KEPT]
        for alert_id, condition in holding.items():
            self._restored.discard(alert_id)
            alert = self.active.get(alert_id)
            if alert is None:
                self._add(
                    Alert(
                        alert_id,
                        condition.kind,
                        condition.site,
                        condition.message,
                        now,
                        condition.tenant,
                    )
                )
                changes.fired.append(self.active[alert_id])
            elif alert.message != condition.message:
                self.active[alert_id] = replace(alert, message=condition.message)
        return changes

    def acknowledge(self, alert_id: str, by: str, now: float) -> Alert | None:
        alert = self.active.get(alert_id)
        if alert is None:
            return None
        self.active[alert_id] = replace(alert, acknowledged_by=by, acknowledged_at=now)
        return self.active[alert_id]

    def listing(self) -> list[Alert]:
        """Active first (unacknowledged, then by age), then resolved, newest first."""
        active = sorted(
            self.active.values(), key=lambda a: (a.acknowledged_by is not None, a.since)
        )
        return active + list(reversed(self.resolved))
