"""What a site will do when it next applies the deltas it has not applied yet (pure).

``preview`` folds the operations of the pending deltas that target the site (or all sites)
over what its last report says it runs: applications added, removed, upgraded (from which
version to which), secrets added, rotated or removed, keys rotated, lock-down and unlock,
agent upgrades, quotas, decommission, root key rotations, each with the delta versions
that cause it. It is only as fresh as the report (``report_age_s``, ``stale``): the site
may have moved since. ``GET /v1/sites/{id}/pending`` serves it (``central_hub.deltas_api``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from meshorch.fleet.delta import ROTATE_OP, Delta


@dataclass
class _Change:
    """One thing the pending deltas change: from what the report says to the last op."""

    before: Any
    after: Any
    versions: list[int] = field(default_factory=list)


@dataclass
class _Fold:
    apps: dict[str, _Change] = field(default_factory=dict)
    owners: dict[str, str | None] = field(default_factory=dict)
    secrets: dict[str, _Change] = field(default_factory=dict)
    quotas: dict[str, _Change] = field(default_factory=dict)
    lockdown: _Change | None = None
    agent: _Change | None = None
    key_rotations: list[int] = field(default_factory=list)
    root_rotations: list[int] = field(default_factory=list)
    decommission: list[int] = field(default_factory=list)
    unknown: list[dict[str, Any]] = field(default_factory=list)


def preview(
    site: str,
    report: Mapping[str, Any] | None,
    report_age_s: float | None,
    stale_after_s: float,
    pending: Iterable[Delta],
) -> dict[str, Any]:
    """The answer of ``GET /v1/sites/{id}/pending`` but for the log's bounds (which the
    caller adds): ``pending`` are the deltas after the report's applied version, in order."""
    apps = {} if report is None else dict(report.get("apps") or {})
    secrets_state = {} if report is None else dict(report.get("secrets_state") or {})
    secrets = {f"{s['tenant']}/{s['name']}": s["version"] for s in secrets_state.get("secrets", [])}
    fold = _Fold()
    count = targeted = 0
    for delta in pending:
        count += 1
        if not delta.target.includes(site):
            continue
        targeted += 1
        for op in delta.ops:
            _fold_op(fold, op, delta.version, apps, secrets, secrets_state, report)
    return {
        "site": site,
        "applied_version": None if report is None else report["applied_version"],
        "report_age_s": report_age_s,
        "stale": report_age_s is None or report_age_s > stale_after_s,
        "deltas_pending": count,
        "deltas_for_site": targeted,
        "apps": [
            _app_json(name, fold.owners.get(name), c) for name, c in sorted(fold.apps.items())
        ],
        "secrets": [_secret_json(name, c) for name, c in sorted(fold.secrets.items())],
        "key_rotations": fold.key_rotations,
        "lockdown": None if fold.lockdown is None else _lockdown_json(fold.lockdown),
        "agent_upgrade": None
        if fold.agent is None
        else {"from": fold.agent.before, "to": fold.agent.after, "versions": fold.agent.versions},
        "quotas": [
            {"tenant": tenant, "to": c.after, "versions": c.versions}
            for tenant, c in sorted(fold.quotas.items())
        ],
        "decommission": fold.decommission,
        "root_rotations": fold.root_rotations,
        "other_ops": fold.unknown,
    }


def _change(found: dict[str, _Change], key: str, before: Any) -> _Change:
    if key not in found:
        found[key] = _Change(before, before)
    return found[key]


def _fold_op(
    fold: _Fold,
    op: Mapping[str, Any],
    version: int,
    apps: Mapping[str, Any],
    secrets: Mapping[str, int],
    secrets_state: Mapping[str, Any],
    report: Mapping[str, Any] | None,
) -> None:
    kind = op.get("op")
    tenant = op.get("tenant")
    if kind in ("app.put", "app.delete"):
        spec = op.get("spec") if kind == "app.put" else None
        name = spec.get("name") if isinstance(spec, dict) else op.get("name")
        if not isinstance(name, str):
            return
        running = apps.get(name)
        change = _change(fold.apps, name, None if running is None else running.get("version"))
        change.after = str(spec.get("version")) if isinstance(spec, dict) else None
        change.versions.append(version)
        fold.owners[name] = tenant if isinstance(tenant, str) else None
    elif kind in ("secret.put", "secret.delete"):
        name = f"{tenant}/{op.get('name')}"
        change = _change(fold.secrets, name, secrets.get(name))
        change.after = op.get("version") if kind == "secret.put" else None
        change.versions.append(version)
    elif kind in ("site.lockdown", "site.unlock"):
        if fold.lockdown is None:
            fold.lockdown = _Change(bool(secrets_state.get("locked_down")), False)
        fold.lockdown.after = kind == "site.lockdown"
        fold.lockdown.versions.append(version)
    elif kind == "secrets.rotate":
        fold.key_rotations.append(version)
    elif kind == "agent.upgrade":
        if fold.agent is None:
            fold.agent = _Change(_agent_versions(report), None)
        fold.agent.after = op.get("version")
        fold.agent.versions.append(version)
    elif kind == "tenant.quota":
        change = _change(fold.quotas, str(tenant), None)
        change.after = {k: v for k, v in op.items() if k not in ("op", "tenant")}
        change.versions.append(version)
    elif kind == "site.decommission":
        fold.decommission.append(version)
    elif kind == ROTATE_OP:
        fold.root_rotations.append(version)
    else:
        fold.unknown.append({"op": str(kind), "version": version})


def _agent_versions(report: Mapping[str, Any] | None) -> list[str]:
    if report is None:
        return []
    return sorted({h["agent_version"] for h in report.get("hosts", []) if "agent_version" in h})


def _app_json(name: str, tenant: str | None, c: _Change) -> dict[str, Any]:
    if c.before is None and c.after is None:
        kind = "added and removed"
    elif c.before is None:
        kind = "added"
    elif c.after is None:
        kind = "removed"
    elif c.before == c.after:
        kind = "unchanged"
    else:
        kind = "upgraded"
    return {"app": name, "tenant": tenant, "change": kind, "from": c.before, "to": c.after,
            "versions": c.versions}  # fmt: skip


def _secret_json(name: str, c: _Change) -> dict[str, Any]:
    if c.after is None:
        kind = "removed" if c.before is not None else "added and removed"
    elif c.before is None:
        kind = "added"
    else:
        kind = "rotated" if c.after != c.before else "unchanged"
    return {"secret": name, "change": kind, "from": c.before, "to": c.after,
            "versions": c.versions}  # fmt: skip


def _lockdown_json(c: _Change) -> dict[str, Any]:
    if c.before == c.after:
        kind = "locked down, then unlocked" if not c.after else "stays locked down"
    else:
        kind = "lock down" if c.after else "unlock"
    return {"change": kind, "from": c.before, "to": c.after, "versions": c.versions}
