"""The site's side of the fleet log, pure: what verified deltas write, what a site reports.

Where the fleet link lives in the site's replicated state (``sys`` table)::

    fleet/site-key      the site's Ed25519 identity for the hub (``SiteKey``), created once
    fleet/link          the link configuration (``LinkConfig``): hub, fleet, root key
    fleet/trust         ``meshorch.fleet.delta.TrustState``: applied version, head, trusted keys
    fleet/rejections    the last ``MAX_REJECTIONS`` deltas refused (or operations skipped)
    fleet/applied/<v>   the envelope of version v as applied here (this site's view: a
                        format 2 delta for other sites as its header), for the last
                        ``APPLIED_KEEP`` versions (a batch adds its newest
                        ``APPLIED_BATCH_BYTES``): ``meshorch fleet export`` (v: 20 digits)

Application operations (``app.put``, ``app.delete``) and ``tenant.quota`` write the
``apps`` table (``meshorch.apps.records``, ``meshorch.apps.quotas``). Secrets operations
(``secret.put``, ``secret.delete``, ``site.lockdown``, ``site.unlock``, ``secrets.rotate``)
write the ``secrets`` table: see ``meshorch.secrets.keyring.op_writes``. The
applier cannot decrypt: a delivered secret is stored as sealed to the site's secrets key,
and the leader's upkeep (``meshorch.secrets.service``) moves it under a data key.

``plan_apply`` turns verified deltas into Raft operations (``plan_snapshot`` a verified
snapshot, ``meshorch.fleet.snapshot``): the application writes of the
deltas that target this site and the new trust state, the latter written with a
compare-and-set on the trust record read, so a stale leader cannot apply a delta twice or
move the site's version backwards. ``build_report`` makes the site report of
docs/fleet-link.md from the view; ``app_view`` is shared with the agent API.

Its size: every operation a delta can carry is turned into writes here, in one pure
place, so what a delta does at a site can be read and tested in one module.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from meshorch.apps import quotas
from meshorch.apps.quotas import DEFAULT_TENANT, check_tenant
from meshorch.apps.records import (
    InstanceReport,
    app_key,
    appver_key,
    decode_app,
    encode_spec,
    rollout_key,
)
from meshorch.apps.rollout import RolloutState
from meshorch.apps.scheduler import HostInfo, Placement
from meshorch.apps.spec import AppSpec, SpecError, from_json, require_own_secrets, spec_digest
from meshorch.errors import RemoteInputError
from meshorch.fleet import decommission, interlock
from meshorch.fleet import upgrade as agent_upgrade
from meshorch.fleet.client import HubTrust, normalize_fingerprint
from meshorch.fleet.delta import (
    DELTA_V2,
    Delta,
    DeltaRejected,
    TrustState,
    parse_key_id,
    view_for,
)
from meshorch.fleet.snapshot import Snapshot, SnapshotRejected
from meshorch.secrets import keyring as secrets
from meshorch.state.tables import APPS_TABLE, SYSTEM_TABLE
from raft import Delete, Guard, Put

SITE_KEY_KEY = b"fleet/site-key"
LINK_KEY = b"fleet/link"
TRUST_KEY = b"fleet/trust"
REJECTIONS_KEY = b"fleet/rejections"
APPLIED_PREFIX = b"fleet/applied/"
# Envelopes kept: a heartbeat's header is ~0.5 KiB, an app.put's a few KiB; at most
# 256 x MAX_DELTA_BYTES (64 MiB) in the worst case, which the hub's deltas never near.
APPLIED_KEEP = 256
APPLIED_BATCH_BYTES = 1024 * 1024
MAX_REJECTIONS = 20
REPORT_VERSION = 1
MAX_FLEET_NAME = 128
REPORT_INSTANCE_FIELDS = ("app", "instance_id", "service", "version", "state", "ready", "restarts")
OP_ERROR_REASON = "bad_op"  # a rejection entry for an operation skipped

Reader = Callable[[str, bytes], bytes | None]
Write = Put | Delete


# -- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SiteKey:
    """The site's Ed25519 identity towards the hub; every leader of the site uses it."""

    seed: bytes

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, "seed": self.seed.hex()})

    @staticmethod
    def decode(raw: bytes) -> SiteKey:
        return SiteKey(bytes.fromhex(str(orjson.loads(raw)["seed"])))


@dataclass(frozen=True, slots=True)
class LinkConfig:
    """How this site reaches its hub and which fleet root key it started from."""

    hub: str
    fleet: str
    root_key: str
    enroll_token: str | None = None
    enrolled: bool = False
    hub_fingerprint: str | None = None  # the hub's TLS certificate's SHA-256, pinned
    hub_ca: str | None = None  # or the PEM of the CA that signed it

    @property
    def trust_tls(self) -> HubTrust:
        """How the hub's TLS certificate is checked (``meshorch.fleet.client``)."""
        return HubTrust(self.hub_fingerprint, self.hub_ca)

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, **self.to_json(with_token=True)})

    def to_json(self, with_token: bool = False) -> dict[str, Any]:
        data: dict[str, Any] = {
            "hub": self.hub,
            "fleet": self.fleet,
            "root_key": self.root_key,
            "enrolled": self.enrolled,
            "hub_fingerprint": self.hub_fingerprint,
            "hub_ca": self.hub_ca,
        }
        if with_token:
            data["enroll_token"] = self.enroll_token
        else:
            data["enroll_token_set"] = self.enroll_token is not None
        return data

    @staticmethod
    def decode(raw: bytes) -> LinkConfig:
        data = orjson.loads(raw)
        token = data.get("enroll_token")
        return LinkConfig(
            hub=str(data["hub"]),
            fleet=str(data["fleet"]),
            root_key=str(data["root_key"]),
            enroll_token=None if token is None else str(token),
            enrolled=bool(data.get("enrolled", False)),
            hub_fingerprint=data.get("hub_fingerprint"),
            hub_ca=data.get("hub_ca"),
        )

    def initial_trust(self) -> TrustState:
        return TrustState(fleet=self.fleet, trusted_keys=frozenset({self.root_key}))


def _hub_urls_ok(hub: object) -> bool:
    if not isinstance(hub, str) or len(hub) > 4096:
        return False
    urls = hub.split(",")
    return all(u.strip().startswith(("http://", "https://")) and len(u.strip()) >= 8 for u in urls)


def check_link_config(
    hub: object,
    fleet: object,
    root_key: object,
    enroll_token: object = None,
    hub_fingerprint: object = None,
    hub_ca: object = None,
) -> LinkConfig:
    """Validate a link configuration (flags or API); raises RemoteInputError listing problems."""
    problems: list[str] = []
    if not _hub_urls_ok(hub):
        problems.append(
            "hub: an http:// or https:// URL (a replicated hub: its URLs, comma-separated)"
        )
    if (
        not isinstance(fleet, str)
        or not fleet
        or len(fleet) > MAX_FLEET_NAME
        or not fleet.isprintable()
    ):
        problems.append(f"fleet: a name of 1-{MAX_FLEET_NAME} printable characters")
    key = ""
    try:
        key = parse_key_id(root_key) if isinstance(root_key, str) else parse_key_id("")
    except ValueError as exc:
        problems.append(f"root_key: {exc}")
    if enroll_token is not None and (not isinstance(enroll_token, str) or not enroll_token):
        problems.append("enroll_token: a non-empty string when given")
    fingerprint = None
    if hub_fingerprint is not None:
        try:
            fingerprint = normalize_fingerprint(str(hub_fingerprint))
        except ValueError as exc:
            problems.append(f"hub_fingerprint: {exc}")
    if hub_ca is not None and (
        not isinstance(hub_ca, str) or "BEGIN CERTIFICATE" not in hub_ca or len(hub_ca) > 65536
    ):
        problems.append("hub_ca: PEM certificates (at most 64 KiB)")
    if fingerprint is not None and hub_ca is not None:
        problems.append("hub_fingerprint, hub_ca: give one (a pinned certificate or its CA)")
    if problems:
        raise RemoteInputError("bad_link", "; ".join(problems))
    assert isinstance(hub, str) and isinstance(fleet, str)
    token = enroll_token if isinstance(enroll_token, str) else None
    ca = hub_ca if isinstance(hub_ca, str) else None
    return LinkConfig(hub.rstrip("/"), fleet, key, token, False, fingerprint, ca)


def merge_link_config(
    wanted: LinkConfig, current: LinkConfig | None, trust: TrustState | None
) -> LinkConfig:
    """The link record to store for ``wanted``; refuses changing the fleet or the trust.

    Raises RemoteInputError ``fleet_conflict`` / ``root_key_conflict``. Only a signed
    ``root.rotate`` delta changes whom the site trusts: the root key given here must be
    the one the site started from or one it trusts now, and the stored one is kept.
    """
    fleet = trust.fleet if trust is not None else current.fleet if current else None
    if fleet is not None and fleet != wanted.fleet:
        raise RemoteInputError(
            "fleet_conflict", f"this site is in fleet {fleet!r}, not {wanted.fleet!r}"
        )
    if current is None:
        return wanted
    allowed = {current.root_key} | (set(trust.trusted_keys) if trust else set())
    if wanted.root_key not in allowed:
        raise RemoteInputError(
            "root_key_conflict",
            "the fleet root key changes only by a signed root.rotate delta",
        )
    same_token = wanted.enroll_token == current.enroll_token
    return LinkConfig(
        hub=wanted.hub,
        fleet=current.fleet,
        root_key=current.root_key,
        enroll_token=wanted.enroll_token,
        enrolled=current.enrolled and (same_token or wanted.enroll_token is None),
        hub_fingerprint=wanted.hub_fingerprint,
        hub_ca=wanted.hub_ca,
    )


def rejection_entry(
    reason: str, message: str, version: int | None, at: float, **extra: object
) -> dict[str, Any]:
    return {"reason": reason, "message": message, "version": version, "at": at, **extra}


def decode_rejections(raw: bytes | None) -> list[dict[str, Any]]:
    if raw is None:
        return []
    data = orjson.loads(raw)
    return list(data.get("rejections", []))[-MAX_REJECTIONS:]


def encode_rejections(entries: Iterable[Mapping[str, Any]]) -> bytes:
    return orjson.dumps({"v": 1, "rejections": list(entries)[-MAX_REJECTIONS:]})


# -- application writes (shared with the agent API) ----------------------------------


class VersionExists(RemoteInputError):
    def __init__(self, spec: AppSpec) -> None:
        super().__init__(
            "version_exists",
            f"{spec.name} version {spec.version} exists with other content; bump the version",
        )


class NameTaken(RemoteInputError):
    """The app name is another tenant's on this site (names are unique per site).

    Its message says so: it goes only into the site's delta rejections, which the hub
    shows to fleet-wide tokens. The agent API answers a tenant as for any name it cannot
    have, or as for an absent app (``meshorch.site.app_api``)."""

    def __init__(self, name: str) -> None:
        super().__init__("name_taken", f"application {name} belongs to another tenant")


def app_put_ops(
    spec: AppSpec,
    existing_version: bytes | None,
    tenant: str = DEFAULT_TENANT,
    current: bytes | None = None,
) -> list[Write]:
    """Writes that make ``spec`` the desired state of ``tenant``.

    ``existing_version`` is the appver record of this version, ``current`` the app record
    (None when absent). Raises ForeignSecret (``foreign_secret``) when the spec references
    a secret of another tenant, before anything is read; NameTaken when the app is another
    tenant's, VersionExists when the tenant applied that version before with other content
    (a version another tenant left behind, after deleting its app, is simply replaced).
    """
    require_own_secrets(spec, tenant)
    if current is not None and decode_app(current).tenant != tenant:
        raise NameTaken(spec.name)
    if existing_version is not None:
        before = decode_app(existing_version)
        if before.tenant == tenant and spec_digest(before.spec) != spec_digest(spec):
            raise VersionExists(spec)
    encoded = encode_spec(spec, tenant)
    return [
        Put(APPS_TABLE, appver_key(spec.name, spec.version), encoded),
        Put(APPS_TABLE, app_key(spec.name), encoded),
    ]


def app_delete_ops(
    name: str, tenant: str | None = None, current: bytes | None = None
) -> list[Write]:
    """Writes that forget the app; with ``tenant``, only if ``current`` (its record) is that
    tenant's (raises NameTaken otherwise)."""
    if tenant is not None and current is not None and decode_app(current).tenant != tenant:
        raise NameTaken(name)
    return [Delete(APPS_TABLE, app_key(name)), Delete(APPS_TABLE, rollout_key(name))]


def op_tenant(op: Mapping[str, Any]) -> str:
    """The ``tenant`` of an operation, ``default`` when absent (or null)."""
    tenant = op.get("tenant")
    return DEFAULT_TENANT if tenant is None else check_tenant(tenant)


# -- applying verified deltas ----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class OpError:
    """An operation of an accepted delta that this site skipped."""

    version: int
    index: int
    op: str
    message: str

    def rejection(self, at: float) -> dict[str, Any]:
        return rejection_entry(
            OP_ERROR_REASON, f"op {self.index} ({self.op}): {self.message}", self.version, at
        )


@dataclass(slots=True)
class ApplyPlan:
    ops: list[Write | Guard] = field(default_factory=list)
    op_errors: list[OpError] = field(default_factory=list)
    applied: list[int] = field(default_factory=list)  # versions
    for_site: list[int] = field(default_factory=list)  # versions whose ops targeted us


def plan_apply(
    deltas: Sequence[Delta],
    new_state: TrustState,
    trust_index: int,
    site_id: str,
    read: Reader,
    envelopes: Sequence[bytes] = (),
    running: Collection[str] = (),
) -> ApplyPlan:
    """Raft operations that apply ``deltas`` (verified, consecutive) at this site.

    ``read(table, key)`` returns the current value; ``trust_index`` is the Raft index
    of the trust record the deltas were verified against (the compare-and-set guard).
    ``envelopes`` (one per delta, as applied: ``as_applied``) are kept in the record of
    the last ``APPLIED_KEEP`` versions, in the same guarded proposal. ``running``: the
    names of the applications the site has (a delta that would delete them all without
    the operator's confirmation has its deletions refused: ``meshorch.fleet.interlock``).
    """
    plan = ApplyPlan()
    if envelopes:
        versions = [delta.version for delta in deltas]
        applied = list(zip(versions, envelopes, strict=True))
        plan.ops.extend(record_applied(applied, new_state.version))
    ops: list[tuple[int, int, Mapping[str, Any]]] = []
    for delta in deltas:
        plan.applied.append(delta.version)
        if not delta.target.includes(site_id):
            continue
        plan.for_site.append(delta.version)
        ops.extend((delta.version, index, op) for index, op in enumerate(delta.ops))
    by_version: dict[int, list[Mapping[str, Any]]] = {}
    for version, _, op in ops:
        by_version.setdefault(version, []).append(op)
    refused = interlock.refused_groups(by_version.items(), running)
    return _plan_ops(plan, ops, new_state, trust_index, site_id, read, running, refused)


def plan_snapshot(
    snapshot: Snapshot,
    new_state: TrustState,
    trust_index: int,
    site_id: str,
    read: Reader,
    running: Collection[str] = (),
) -> ApplyPlan:
    """Raft operations that make a verified snapshot the site's desired state, in one
    proposal guarded like ``plan_apply``: each of its operations is written as a delta's
    would be (an application it deletes is deleted, the last version of each put), then
    the trust state at the snapshot's version and head. An operation this site refuses is
    skipped and reported (``OpError``, its index in the snapshot). The snapshot is one
    change for the deletion interlock (``plan_apply``'s ``running``)."""
    plan = ApplyPlan(applied=[snapshot.version], for_site=[snapshot.version])
    # The envelopes kept lead to the versions the snapshot skips: the record starts anew.
    before = read(SYSTEM_TABLE, TRUST_KEY)
    applied = 0 if before is None else TrustState.from_json(orjson.loads(before)).version
    first = max(1, applied - APPLIED_KEEP + 1)
    plan.ops.extend(Delete(SYSTEM_TABLE, applied_key(v)) for v in range(first, applied + 1))
    ops = [(item.at, index, item.op) for index, item in enumerate(snapshot.ops)]
    whole = [(snapshot.version, [item.op for item in snapshot.ops])]
    refused = interlock.refused_groups(whole, running)
    refused_at = {at for at, _, _ in ops} if refused else set()
    return _plan_ops(plan, ops, new_state, trust_index, site_id, read, running, refused_at)


def applied_key(version: int) -> bytes:
    return APPLIED_PREFIX + b"%020d" % version


def applied_version(key: bytes) -> int:
    return int(key[len(APPLIED_PREFIX) :])


def as_applied(raw: bytes, delta: Delta, site_id: str) -> bytes:
    """The envelope of ``delta`` (verified from ``raw``) as this site applied it: a format 2
    delta that does not target it as its header, even when a relay sent the operations."""
    if delta.format == DELTA_V2 and not delta.has_ops:
        return view_for(raw, site_id)
    return bytes(raw)


def record_applied(applied: Sequence[tuple[int, bytes]], new_version: int) -> list[Write]:
    """Keep the envelopes of the versions ``applied`` (consecutive, up to ``new_version``)
    and forget the older ones: the record is the run of the last ``APPLIED_KEEP`` versions
    at most, of which a batch adds at most ``APPLIED_BATCH_BYTES`` (its newest: the Raft
    entry of the batch stays well under the entry limit). After a larger batch the record
    starts later."""
    if not applied:
        return []
    keep_from = new_version - APPLIED_KEEP + 1
    kept: list[tuple[int, bytes]] = []
    start, size = keep_from, 0  # the first version the record holds after this batch
    for version, envelope in reversed(applied):
        if version < keep_from:
            break
        if size + len(envelope) > APPLIED_BATCH_BYTES:
            start = version + 1
            break
        kept.append((version, envelope))
        size += len(envelope)
    # What the record held before this batch: (batch_first - 1 - KEEP, batch_first - 1].
    batch_first = applied[0][0]
    older = range(max(1, batch_first - APPLIED_KEEP), min(start, batch_first))
    writes: list[Write] = [Delete(SYSTEM_TABLE, applied_key(v)) for v in older]
    writes.extend(Put(SYSTEM_TABLE, applied_key(v), e) for v, e in reversed(kept))
    return writes


def _plan_ops(
    plan: ApplyPlan,
    ops: Iterable[tuple[int, int, Mapping[str, Any]]],
    new_state: TrustState,
    trust_index: int,
    site_id: str,
    read: Reader,
    running: Collection[str] = (),
    refused: Collection[int] = (),
) -> ApplyPlan:
    """``refused``: the versions whose ``app.delete`` operations the interlock refuses."""
    overlay: dict[tuple[str, bytes], bytes | None] = {}

    def current(table: str, key: bytes) -> bytes | None:
        if (table, key) in overlay:
            return overlay[(table, key)]
        return read(table, key)

    for version, index, op in ops:
        name = str(op.get("op"))
        if name == "app.delete" and version in refused:
            message = interlock.REFUSAL.format(count=len(running))
            plan.op_errors.append(OpError(version, index, name, message))
            continue
        try:
            writes = _op_writes(op, current, site_id, version)
        except RemoteInputError as exc:
            plan.op_errors.append(OpError(version, index, name, str(exc)))
            continue
        for write in writes:
            overlay[(write.table, write.key)] = write.value if isinstance(write, Put) else None
        plan.ops.extend(writes)
    # All or nothing: a leader that verified against a trust record another leader has
    # since replaced must not write the apps of deltas that are already applied.
    guarded = [*plan.ops, Put(SYSTEM_TABLE, TRUST_KEY, orjson.dumps(new_state.to_json()))]
    plan.ops = [Guard(SYSTEM_TABLE, TRUST_KEY, trust_index, len(guarded)), *guarded]
    return plan


def _op_writes(op: Mapping[str, Any], read: Reader, site_id: str, version: int) -> list[Write]:
    kind = op.get("op")
    if kind in secrets.OPS:
        return secrets.op_writes(op, site_id, version, read)
    if kind == "app.put":
        raw_spec = op.get("spec")
        if not isinstance(raw_spec, dict):
            raise RemoteInputError("bad_op", "'spec' is an application spec object")
        tenant = op_tenant(op)
        try:
            spec = from_json(raw_spec, tenant=tenant)  # a secret without tenant: the app's
            require_own_secrets(spec, tenant)
        except SpecError as exc:
            raise RemoteInputError(exc.code, "; ".join(exc.problems)) from exc
        return app_put_ops(
            spec,
            read(APPS_TABLE, appver_key(spec.name, spec.version)),
            tenant,
            read(APPS_TABLE, app_key(spec.name)),
        )
    if kind == "app.delete":
        name = op.get("name")
        if not isinstance(name, str) or not name:
            raise RemoteInputError("bad_op", "'name' is an application name")
        owner = None if op.get("tenant") is None else op_tenant(op)
        return app_delete_ops(name, owner, read(APPS_TABLE, app_key(name)))
    if kind == "tenant.quota":
        return list(quotas.op_writes(op))
    if kind == "root.rotate":
        return []  # the trust state carries it
    if kind == decommission.OP:
        return list(decommission.op_writes(version))
    if kind == agent_upgrade.OP:
        return list(agent_upgrade.op_writes(dict(op), version))
    raise RemoteInputError("unknown_op", f"unknown operation {kind!r}")


# -- what the site runs ------------------------------------------------------------------


def instance_views(
    placements: Iterable[Placement], reports: Mapping[str, InstanceReport]
) -> list[dict[str, Any]]:
    """Each placed instance with what its host reports (if that host runs it)."""
    views = []
    for placement in placements:
        report = reports.get(placement.instance_id)
        current = report if report is not None and report.host_id == placement.host_id else None
        views.append(
            {
                "app": placement.app,
                "instance_id": placement.instance_id,
                "service": placement.service,
                "host": placement.host_id,
                "version": placement.version,
                "state": current.state if current else "pending",
                "ready": bool(current and current.ready and current.version == placement.version),
                "restarts": current.restarts if current else 0,
                "message": current.message if current else "",
            }
        )
    return views


def rollout_json(rollout: RolloutState | None) -> dict[str, Any] | None:
    if rollout is None:
        return None
    return {
        "phase": rollout.phase,
        "from": rollout.from_version,
        "to": rollout.to_version,
        "reason": rollout.reason,
    }


def unplaced_views(
    placements: Iterable[Placement], reports: Mapping[str, InstanceReport]
) -> list[dict[str, Any]]:
    """The instances the leader could not place, with why (``status/`` records it wrote)."""
    placed = {p.instance_id for p in placements}
    return [
        {
            "app": r.instance_id.split(".")[0],
            "instance_id": r.instance_id,
            "version": r.version,
            "state": r.state,
            "reason": r.message,
        }
        for r in sorted(reports.values(), key=lambda r: r.instance_id)
        if r.unplaced and r.instance_id not in placed
    ]


def app_view(
    spec: AppSpec,
    placements: Iterable[Placement],
    reports: Mapping[str, InstanceReport],
    rollout: RolloutState | None,
    tenant: str = DEFAULT_TENANT,
) -> dict[str, Any]:
    """What the agent API shows of one application.

    ``unplaced``: the instances no host can take now, or that would take the tenant over
    its quota (``state`` ``unplaced`` or ``over_quota``), each with its ``reason``.
    """
    placements = list(placements)
    instances = instance_views((p for p in placements if p.app == spec.name), reports)
    for instance in instances:
        del instance["app"]
    unplaced = [u for u in unplaced_views(placements, reports) if u["app"] == spec.name]
    for item in unplaced:
        del item["app"]
    return {
        "name": spec.name,
        "tenant": tenant,
        "version": spec.version,
        "digest": spec_digest(spec),
        "instances": instances,
        "unplaced": unplaced,
        "ready": sum(1 for i in instances if i["ready"]),
        "rollout": rollout_json(rollout),
    }


def desired_instances(spec: AppSpec, hosts: Iterable[HostInfo]) -> int:
    """How many instances the spec asks for on these hosts (per-host services: alive hosts)."""
    alive = [h for h in hosts if h.alive]
    total = 0
    for service in spec.services:
        if service.replicas is None:
            total += sum(1 for h in alive if service.allows_host(h.labels))
        else:
            total += service.replicas
    return total


def app_health(
    spec: AppSpec,
    instances: Sequence[Mapping[str, Any]],
    rollout: RolloutState | None,
    desired: int,
    unplaced: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """``apps[name]`` of a site report: healthy, progressing or failed (docs/fleet-link.md).

    An instance refused by its tenant's quota (``unplaced`` in state ``over_quota``) makes
    the app ``failed``: only the operator can change that (raise the quota, shrink the
    app). One no host can take now makes it ``progressing``, with the reason.
    """
    ready = sum(1 for i in instances if i["ready"] and i["version"] == spec.version)
    rolled_back = (
        rollout is not None
        and rollout.phase == "rolled_back"
        and rollout.to_version == spec.version
    )
    failed_instances = [i for i in instances if i["state"] == "failed"]
    over_quota = [u for u in unplaced if u["state"] == "over_quota"]
    rolling = rollout is not None and rollout.phase in ("upgrading", "rolling_back")
    if rolled_back:
        state = "failed"
        assert rollout is not None
        message = f"rolled back to {rollout.from_version}: {rollout.reason}"
    elif failed_instances:
        state = "failed"
        message = "failed: " + ", ".join(str(i["instance_id"]) for i in failed_instances)
    elif over_quota:
        state, message = "failed", _not_placed(over_quota)
    elif (
        not rolling
        and not unplaced
        and len(instances) == desired
        and ready == desired
        and all(i["version"] == spec.version for i in instances)
    ):
        state, message = "healthy", ""
    else:
        state = "progressing"
        message = f"{ready}/{desired} ready" + (" (rollout in progress)" if rolling else "")
        if unplaced:
            message += "; " + _not_placed(unplaced)
    return {
        "version": spec.version,
        "desired": desired,
        "ready": ready,
        "state": state,
        "message": message,
    }


def _not_placed(unplaced: Sequence[Mapping[str, Any]]) -> str:
    first = unplaced[0]
    more = f" (and {len(unplaced) - 1} more)" if len(unplaced) > 1 else ""
    return f"{first['instance_id']} not placed{more}: {first['reason']}"


@dataclass(frozen=True, slots=True)
class SiteFacts:
    """What the report is made of, read from the site's view."""

    specs: Sequence[AppSpec]
    placements: Sequence[Placement]
    reports: Mapping[str, InstanceReport]
    rollouts: Mapping[str, RolloutState]
    hosts: Sequence[HostInfo]  # alive as the leader sees them
    members: Collection[str] = ()  # host ids of the site's members
    secrets_public_key: str | None = None  # hex X25519: the hub seals secrets to it
    resources: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)  # host -> use


REPORT_RESOURCE_FIELDS = ("load1", "cpu_count", "memory_used_pct", "disk_used_pct", "at")


def build_report(
    site_id: str,
    now: float,
    trust: TrustState,
    rejections: Sequence[Mapping[str, Any]],
    facts: SiteFacts,
) -> dict[str, Any]:
    """The site report of docs/fleet-link.md."""
    instances = instance_views(facts.placements, facts.reports)
    unplaced = unplaced_views(facts.placements, facts.reports)
    alive = {h.host_id for h in facts.hosts if h.alive}
    infos = {h.host_id: h for h in facts.hosts}
    host_ids = sorted(set(infos) | set(facts.members))
    hosts = [
        {
            "host_id": host_id,
            "alive": host_id in alive,
            "instances": [
                {k: i[k] for k in REPORT_INSTANCE_FIELDS} for i in instances if i["host"] == host_id
            ],
            **(
                {}
                if (info := infos.get(host_id)) is None
                else {"agent_version": info.agent_version, "protocol": info.protocol}
            ),
            **(
                {}
                if (use := facts.resources.get(host_id)) is None
                else {"resources": {k: use[k] for k in REPORT_RESOURCE_FIELDS if k in use}}
            ),
        }
        for host_id in host_ids
    ]
    apps = {
        spec.name: app_health(
            spec,
            [i for i in instances if i["app"] == spec.name],
            facts.rollouts.get(spec.name),
            desired_instances(spec, facts.hosts),
            [u for u in unplaced if u["app"] == spec.name],
        )
        for spec in facts.specs
    }
    report = {
        "v": REPORT_VERSION,
        "site": site_id,
        "time": now,
        "applied_version": trust.version,
        "applied_head": trust.head,
        "rejections": [dict(r) for r in rejections][-MAX_REJECTIONS:],
        "hosts": hosts,
        "apps": apps,
    }
    if facts.secrets_public_key is not None:
        report["secrets_public_key"] = facts.secrets_public_key
    return report


@dataclass(slots=True)
class CommitOutcome:
    """What committing a batch of verified deltas did (``SiteLink.commit``)."""

    applied: list[int] = field(default_factory=list)
    rejected: DeltaRejected | None = None
    op_errors: list[dict[str, Any]] = field(default_factory=list)
    state: TrustState | None = None
    conflict: bool = False  # another committer moved the trust state first
    snapshot_rejected: SnapshotRejected | None = None  # ``SiteLink.commit_snapshot``
