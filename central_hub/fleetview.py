"""Site reports and the fleet view built from them (pure).

``parse_report`` validates a site report (docs/fleet-link.md) and returns its normalised
JSON form (known fields only), listing every problem. ``site_summary`` and ``site_detail``
turn a site record, its latest report and the time into what operators see.

The view merges two sources: the site's own reports over its link, and the compact
summaries it gossips (``central_hub.gossip``; they reach the hub through other sites when
the site's link is down). ``last_seen`` is the newer of the two receive times,
``applied_version`` the higher; ``seen_via`` says which source is fresh (``link`` first).

``counts`` (``site_counts``) sums up hosts, applications and instances for the fleet
listing, so a client needs no request per site: from the report unless only the gossip
summary is fresh (``source`` says which). A summary has no instances, and cannot be split
by tenant: ``instances`` is then null, and ``apps`` too in a tenant's view. A site never
heard from has ``counts`` null.

Health of a site:

    unknown      no report and no gossip summary yet
    unreachable  neither the latest report nor the latest summary is fresh (``stale_s``)
    degraded     an application is not healthy, a host is not alive, or the site
                 rejected a delta within ``rejection_window_s`` (by its fresh report;
                 when only the summary is fresh: an alert, or a host down)
    healthy      otherwise
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any, Literal

import orjson

from central_hub.errors import InputProblems
from central_hub.waves import AppStatus

Health = Literal["healthy", "degraded", "unreachable", "unknown"]
SeenVia = Literal["link", "gossip"]
Gossip = tuple[Mapping[str, Any], float]  # (normalised summary, received at)
REPORT_VERSION = 1
APP_STATES = ("healthy", "progressing", "failed")
MAX_ITEMS = 10_000
MAX_TEXT = 4096
MAX_INTEGER = 2**63 - 1  # what orjson writes back


class ReportError(InputProblems):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("bad_report", "the site report is invalid", problems[:20])


class _Checker:
    def __init__(self) -> None:
        self.problems: list[str] = []

    def obj(self, value: object, path: str) -> dict[str, Any]:
        if isinstance(value, dict):
            return value
        self.problems.append(f"{path}: must be an object")
        return {}

    def items(self, value: object, path: str) -> list[Any]:
        if isinstance(value, list) and len(value) <= MAX_ITEMS:
            return value
        self.problems.append(f"{path}: must be a list of at most {MAX_ITEMS}")
        return []

    def text(self, value: object, path: str, *, optional: bool = False) -> str:
        if optional and value is None:
            return ""
        if isinstance(value, str) and len(value) <= MAX_TEXT:
            return value
        self.problems.append(f"{path}: must be a string of at most {MAX_TEXT} characters")
        return ""

    def number(self, value: object, path: str) -> float:
        if type(value) in (int, float) and value == value:  # rejects bool and NaN
            return float(value)  # type: ignore[arg-type]
        self.problems.append(f"{path}: must be a number")
        return 0.0

    def integer(self, value: object, path: str, *, optional: bool = False) -> int | None:
        if optional and value is None:
            return None
        if type(value) is float and value.is_integer():  # JSON's 3.0 is 3
            value = int(value)
        if type(value) is int and 0 <= value <= MAX_INTEGER:  # stored as JSON again
            return value
        self.problems.append(f"{path}: must be an integer from 0 to {MAX_INTEGER}")
        return 0

    def flag(self, value: object, path: str) -> bool:
        if isinstance(value, bool):
            return value
        self.problems.append(f"{path}: must be true or false")
        return False


def parse_report(data: object, site_id: str) -> dict[str, Any]:
    """The normalised report, or ``ReportError`` with every problem."""
    c = _Checker()
    report = c.obj(data, "report")
    if report and report.get("v") != REPORT_VERSION:
        c.problems.append(f"v: must be {REPORT_VERSION}")
    if report and report.get("site") != site_id:
        c.problems.append(f"site: {report.get('site')!r} is not the signing site {site_id!r}")
    rejections = [
        {
            "reason": c.text(r.get("reason"), f"rejections[{i}].reason"),
            "message": c.text(r.get("message"), f"rejections[{i}].message", optional=True),
            "version": c.integer(r.get("version"), f"rejections[{i}].version", optional=True),
            "at": c.number(r.get("at"), f"rejections[{i}].at"),
        }
        for i, raw in enumerate(c.items(report.get("rejections", []), "rejections"))
        if (r := c.obj(raw, f"rejections[{i}]"))
    ]
    hosts = []
    for i, raw in enumerate(c.items(report.get("hosts", []), "hosts")):
        h = c.obj(raw, f"hosts[{i}]")
        if not h:
            continue
        instances = []
        for j, raw_inst in enumerate(c.items(h.get("instances", []), f"hosts[{i}].instances")):
            path = f"hosts[{i}].instances[{j}]"
            inst = c.obj(raw_inst, path)
            if not inst:
                continue
            instances.append(
                {
                    "app": c.text(inst.get("app"), f"{path}.app"),
                    "instance_id": c.text(inst.get("instance_id"), f"{path}.instance_id"),
                    "service": c.text(inst.get("service"), f"{path}.service", optional=True),
                    "version": c.text(inst.get("version"), f"{path}.version", optional=True),
                    "state": c.text(inst.get("state"), f"{path}.state"),
                    "ready": c.flag(inst.get("ready", False), f"{path}.ready"),
                    "restarts": c.integer(inst.get("restarts", 0), f"{path}.restarts"),
                }
            )
        host = {
            "host_id": c.text(h.get("host_id"), f"hosts[{i}].host_id"),
            "alive": c.flag(h.get("alive"), f"hosts[{i}].alive"),
            "instances": instances,
        }
        if "agent_version" in h:  # reported since site protocol 2
            host["agent_version"] = c.text(h["agent_version"], f"hosts[{i}].agent_version")
            host["protocol"] = c.integer(h.get("protocol", 1), f"hosts[{i}].protocol")
        use = h.get("resources")
        if use is not None:
            r = c.obj(use, f"hosts[{i}].resources")
            host["resources"] = {
                name: c.number(r.get(name), f"hosts[{i}].resources.{name}")
                for name in ("load1", "cpu_count", "memory_used_pct", "disk_used_pct", "at")
                if name in r
            }
        hosts.append(host)
    apps: dict[str, Any] = {}
    raw_apps = c.obj(report.get("apps", {}), "apps")
    if len(raw_apps) > MAX_ITEMS:
        c.problems.append(f"apps: at most {MAX_ITEMS}")
        raw_apps = {}
    for name, raw_app in raw_apps.items():
        a = c.obj(raw_app, f"apps.{name}")
        state = a.get("state")
        if a and state not in APP_STATES:
            c.problems.append(f"apps.{name}.state: {state!r} is not one of {APP_STATES}")
        apps[name] = {
            "version": c.text(a.get("version"), f"apps.{name}.version"),
            "desired": c.integer(a.get("desired", 0), f"apps.{name}.desired"),
            "ready": c.integer(a.get("ready", 0), f"apps.{name}.ready"),
            "state": state,
            "message": c.text(a.get("message"), f"apps.{name}.message", optional=True),
        }
    normalised = {
        "v": REPORT_VERSION,
        "site": site_id,
        "time": c.number(report.get("time"), "time"),
        "applied_version": c.integer(report.get("applied_version"), "applied_version"),
        "applied_head": c.text(report.get("applied_head"), "applied_head"),
        "rejections": rejections,
        "hosts": hosts,
        "apps": apps,
    }
    upgrade = report.get("agent_upgrade") if report else None
    if upgrade is not None:  # an agent upgrade under way or finished (docs/upgrades.md)
        u = c.obj(upgrade, "agent_upgrade")
        failed = u.get("failed") if isinstance(u.get("failed"), dict) else None
        normalised["agent_upgrade"] = {
            "version": c.text(u.get("version"), "agent_upgrade.version"),
            "state": c.text(u.get("state"), "agent_upgrade.state"),
            "current": c.text(u.get("current"), "agent_upgrade.current", optional=True) or None,
            "hosts_upgraded": c.integer(u.get("hosts_upgraded", 0), "agent_upgrade.hosts_upgraded"),
            "hosts": c.integer(u.get("hosts", 0), "agent_upgrade.hosts"),
            "failed": None
            if failed is None
            else {
                "host": c.text(failed.get("host"), "agent_upgrade.failed.host"),
                "reason": c.text(
                    str(failed.get("reason", ""))[:400], "agent_upgrade.failed.reason"
                ),
            },
        }
    ending = report.get("decommission") if report else None
    if ending is not None:  # sent while a site.decommission runs (docs/upgrades.md)
        d = c.obj(ending, "decommission")
        state = d.get("state")
        if state not in ("running", "stopping", "done"):
            c.problems.append("decommission.state: must be running, stopping or done")
        normalised["decommission"] = {
            "state": state,
            "version": c.integer(d.get("version"), "decommission.version"),
        }
    if c.problems:
        raise ReportError(c.problems)
    return normalised


REORDER_WINDOW_S = 5.0


def progress(report: Mapping[str, Any]) -> bytes:
    """What of a report moves anything when it changes: all but its time and the hosts'
    resource samples, which change with every report (``Reports.record`` and the report
    relay treat a report with the same ``progress`` as a renewal)."""
    hosts = [{k: v for k, v in h.items() if k != "resources"} for h in report.get("hosts", ())]
    rest = {k: v for k, v in report.items() if k != "time"}
    rest["hosts"] = hosts
    return orjson.dumps(rest, option=orjson.OPT_SORT_KEYS)


def progress_digest(progress_bytes: bytes) -> str:
    """A short digest of a report's ``progress``: a follower's mark names the report it
    renews by it (``central_hub.relay``)."""
    return hashlib.blake2b(progress_bytes, digest_size=12).hexdigest()


def is_stale_report(
    report: Mapping[str, Any], previous: Mapping[str, Any], previous_received_at: float, now: float
) -> bool:
    """A report overtaken in flight by a newer one (two requests racing, or two leaders of
    the site overlapping for a moment): lower applied version, or same and older by the
    site's clock. Only within a short window, so a site whose state or clock went back is
    not ignored for long."""
    if now - previous_received_at > REORDER_WINDOW_S:
        return False
    mine = (report["applied_version"], report["time"])
    theirs = (previous["applied_version"], previous["time"])
    return bool(mine < theirs)


def app_status(report: Mapping[str, Any] | None, app: str) -> AppStatus | None:
    """What a (normalised) report says about one application."""
    if report is None:
        return None
    status = report["apps"].get(app)
    if status is None:
        return None
    return AppStatus(str(status["version"]), str(status["state"]), str(status["message"]))


def seen_via(
    last_seen: float | None, gossip: Gossip | None, now: float, stale_s: float
) -> SeenVia | None:
    if last_seen is not None and now - last_seen <= stale_s:
        return "link"
    if gossip is not None and now - gossip[1] <= stale_s:
        return "gossip"
    return None


def site_health(
    report: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    stale_s: float,
    rejection_window_s: float,
    *,
    gossip: Gossip | None = None,
) -> Health:
    if (report is None or last_seen is None) and gossip is None:
        return "unknown"
    via = seen_via(None if report is None else last_seen, gossip, now, stale_s)
    if via is None:
        return "unreachable"
    if via == "gossip" or report is None:
        assert gossip is not None  # via is "gossip"
        summary = gossip[0]
        if summary["alerts"] or summary.get("more_alerts") or summary["up"] < summary["n"]:
            return "degraded"
        return "healthy"
    if any(a["state"] != "healthy" for a in report["apps"].values()):
        return "degraded"
    if not all(h["alive"] for h in report["hosts"]):
        return "degraded"
    if any(now - r["at"] <= rejection_window_s for r in report["rejections"]):
        return "degraded"
    return "healthy"


def site_counts(
    report: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    stale_s: float,
    *,
    gossip: Gossip | None = None,
    visible_apps: Collection[str] | None = None,
) -> dict[str, Any] | None:
    """Hosts (total, up), applications (total, healthy) and instances (total, ready) of
    a site; None when it was never heard from. ``visible_apps``: count only these
    applications and their instances (a tenant's view); None counts them all."""
    via = seen_via(None if report is None else last_seen, gossip, now, stale_s)
    if report is not None and via != "gossip":
        # The report even when stale (it has instances), unless only the summary is fresh.
        hosts = report["hosts"]
        apps = [
            a for name, a in report["apps"].items() if visible_apps is None or name in visible_apps
        ]
        instances = [
            i
            for h in hosts
            for i in h["instances"]
            if visible_apps is None or i["app"] in visible_apps
        ]
        return {
            "source": "report",
            "hosts": {"total": len(hosts), "up": sum(1 for h in hosts if h["alive"])},
            "apps": {"total": len(apps), "healthy": sum(a["state"] == "healthy" for a in apps)},
            "instances": {"total": len(instances), "ready": sum(i["ready"] for i in instances)},
        }
    if gossip is None:
        return None
    summary = gossip[0]
    failed = len(summary["alerts"]) + int(summary.get("more_alerts") or 0)
    return {
        "source": "gossip",
        "hosts": {"total": summary["n"], "up": summary["up"]},
        # The summary names failed apps only: "healthy" is "not failed" here.
        "apps": None
        if visible_apps is not None
        else {"total": summary["na"], "healthy": max(summary["na"] - failed, 0)},
        "instances": None,
    }


def site_summary(
    site: Mapping[str, Any],
    report: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    stale_s: float,
    rejection_window_s: float,
    *,
    gossip: Gossip | None = None,
    visible_apps: Collection[str] | None = None,
) -> dict[str, Any]:
    applied = None if report is None else report["applied_version"]
    seen = last_seen if report is not None else None
    if gossip is not None:
        applied = max(applied or 0, gossip[0]["av"])
        seen = gossip[1] if seen is None else max(seen, gossip[1])
    return {
        "id": site["id"],
        "labels": dict(site["labels"]),
        "enrolled": site.get("public_key") is not None,
        "applied_version": applied,
        "head": None if report is None else report["applied_head"],
        "last_seen": seen,
        "seen_via": seen_via(None if report is None else last_seen, gossip, now, stale_s),
        "health": site_health(report, last_seen, now, stale_s, rejection_window_s, gossip=gossip),
        # Two or more during an agent upgrade; "unknown" for hosts that do not report one.
        "agent_versions": sorted(
            {h.get("agent_version") or "unknown" for h in (report or {}).get("hosts", [])}
        ),
        "counts": site_counts(
            report, last_seen, now, stale_s, gossip=gossip, visible_apps=visible_apps
        ),
    }


def site_detail(
    site: Mapping[str, Any],
    report: Mapping[str, Any] | None,
    last_seen: float | None,
    now: float,
    stale_s: float,
    rejection_window_s: float,
    *,
    gossip: Gossip | None = None,
    visible_apps: Collection[str] | None = None,
) -> dict[str, Any]:
    summary = site_summary(
        site,
        report,
        last_seen,
        now,
        stale_s,
        rejection_window_s,
        gossip=gossip,
        visible_apps=visible_apps,
    )
    hosts = [] if report is None else report["hosts"]
    return {
        **summary,
        "report_received_at": None if report is None else last_seen,
        "gossip": None if gossip is None else {**gossip[0], "received_at": gossip[1]},
        "public_key": site.get("public_key"),
        "key_rotated_at": site.get("key_rotated_at"),
        "key_rotations": site.get("key_rotations", 0),
        "apps": {} if report is None else report["apps"],
        "agent_upgrade": None if report is None else report.get("agent_upgrade"),
        "hosts": [
            {
                "host_id": h["host_id"],
                "alive": h["alive"],
                # reported since site protocol 2
                **(
                    {"agent_version": h["agent_version"], "protocol": h["protocol"]}
                    if "agent_version" in h
                    else {}
                ),
                "instances": [
                    {
                        "app": i["app"],
                        "instance_id": i["instance_id"],
                        "service": i["service"],
                        "version": i["version"],
                        "state": i["state"],
                        "ready": i["ready"],
                        "restarts": i["restarts"],
                    }
                    for i in h["instances"]
                ],
            }
            for h in hosts
        ],
        "rejections": [] if report is None else report["rejections"],
    }
