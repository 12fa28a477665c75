"""The site controller: run by the Raft leader, it decides where instances run.

Every tick it reads the desired applications, the hosts (their capacity and
labels, alive when the leader hears from them over Raft), the placements and
the instances' reports; steps each app's rolling upgrade (``meshorch.apps.rollout``);
runs the scheduler (``meshorch.apps.scheduler``); and commits the differences, with
the events, in one Raft entry. A host that dies is noticed when its Raft
connection drops, and its instances are placed elsewhere on the next tick.

Tenants and quotas (docs/app-spec.md): the scheduler gets each app's tenant and the
tenants' quotas. An instance it cannot place (over the quota, or no host can take it)
gets a ``status/`` record written here (no host, state ``over_quota`` or ``unplaced``,
the reason as its message) and an event, both only when the reason changes; the record
goes when the instance is placed or no longer wanted. A rolling upgrade to a version
that would take its tenant over the quota (all its instances at the new requests, with
the tenant's other apps as placed) rolls back at once with that reason, so the rollout
status, the app's events and the site report say why. An upgraded (or reverted)
instance's placement takes the requests of the version it now runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

import orjson

from meshorch.apps.quotas import (
    DEFAULT_TENANT,
    QUOTA_PREFIX,
    Quota,
    decode_quota,
    over_quota,
    spec_usage,
)
from meshorch.apps.records import (
    APP_PREFIX,
    HOSTINFO_PREFIX,
    INST_PREFIX,
    ROLLOUT_PREFIX,
    STATUS_PREFIX,
    InstanceReport,
    appver_key,
    decode_app,
    decode_hostinfo,
    decode_placement,
    decode_rollout,
    encode_placement,
    encode_rollout,
    event_key,
    inst_key,
    rollout_key,
    status_key,
)
from meshorch.apps.rollout import (
    InstanceHealth,
    RolloutEvent,
    RolloutState,
    UpgradeInstance,
    new_instance_version,
    start_rollout,
    step,
)
from meshorch.apps.scheduler import HostInfo, Placement, ScheduleResult, schedule
from meshorch.apps.spec import AppSpec
from meshorch.state.ports import Members, SiteState
from meshorch.state.protocol import FeatureUnavailable
from meshorch.state.tables import APPS_TABLE
from meshorch.streams.model import InvalidStreamName, NewEvent, StreamName
from raft import Append, Delete, Put
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

TICK_S = 0.2
GATE_TIMEOUT_S = 20.0
MIN_READY_S = 1.0


class EventLog(Protocol):
    """Where the controller's events go: the Raft operations that append them to a stream
    (``meshorch.streams.site.SiteStreams``), proposed with the change they explain."""

    def append_ops(self, name: StreamName, batch: Sequence[NewEvent]) -> list[Put | Append]: ...


class SiteController:
    def __init__(
        self,
        site: SiteState,
        members: Members,
        events: EventLog,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.members = members
        self.events = events
        self.clock = clock
        self._event_seq = itertools.count(int(clock() * 1000) * 1000)

    async def run(self) -> None:
        while True:
            if self.site.status().is_leader:
                try:
                    await self.tick()
                except ProposalError as exc:
                    logger.warning("controller: %s", exc)
                except Exception:
                    logger.exception("controller tick failed")
            await asyncio.sleep(TICK_S)

    def _scan(self, prefix: bytes) -> list[bytes]:
        records, _ = self.site.view.scan(APPS_TABLE, prefix, 1_000_000)
        return [record.value for _, record in records]

    def hosts(self) -> list[HostInfo]:
        alive = self.members.reachable_hosts()
        hosts = (decode_hostinfo(raw, alive=False) for raw in self._scan(HOSTINFO_PREFIX))
        return [dataclasses.replace(h, alive=h.host_id in alive) for h in hosts]

    async def tick(self) -> None:
        now = self.clock()
        records = [decode_app(raw) for raw in self._scan(APP_PREFIX)]
        apps = {r.spec.name: r.spec for r in records}
        tenants = {r.spec.name: r.tenant for r in records}
        quotas = dict(map(decode_quota, self._scan(QUOTA_PREFIX)))
        current = {p.instance_id: p for p in map(decode_placement, self._scan(INST_PREFIX))}
        reports = {r.instance_id: r for r in map(InstanceReport.decode, self._scan(STATUS_PREFIX))}
        rollouts = {r.app: r for r in map(decode_rollout, self._scan(ROLLOUT_PREFIX))}
        hosts = self.hosts()
        # Drained hosts stay members and alive; the scheduler just sees them as unable to
        # run anything, so their instances move as from a dead host.
        drained = self.members.drained_hosts()
        schedulable = [
            dataclasses.replace(h, alive=False) if h.host_id in drained else h for h in hosts
        ]
        ops: list[Put | Delete | Append] = []
        events: list[RolloutEvent] = []

        placements = dict(current)
        for name, spec in apps.items():
            mine = [p for p in current.values() if p.app == name]
            state = self._rollout_for(spec, mine, rollouts.get(name), now, events)
            if state is None:
                continue
            health = [_health(p, reports.get(p.instance_id)) for p in mine]
            blocked = None
            if state.phase == "upgrading":
                blocked = _version_blocked(spec, tenants, quotas, placements, schedulable)
            stepped = step(
                state,
                health,
                now,
                gate_timeout_s=GATE_TIMEOUT_S,
                min_ready_s=MIN_READY_S,
                blocked=blocked,
            )
            events.extend(stepped.events)
            if isinstance(stepped.decision, UpgradeInstance):
                target = placements[stepped.decision.instance_id]
                placements[target.instance_id] = self._upgraded(
                    target, stepped.decision.to_version, spec
                )
            if stepped.state != rollouts.get(name):
                ops.append(Put(APPS_TABLE, rollout_key(name), encode_rollout(stepped.state)))
            rollouts[name] = stepped.state
        for name in set(rollouts) - set(apps):
            ops.append(Delete(APPS_TABLE, rollout_key(name)))

        versions = {name: new_instance_version(r) for name, r in rollouts.items() if name in apps}
        result = schedule(
            list(apps.values()),
            schedulable,
            list(placements.values()),
            new_versions=versions,
            tenants=tenants,
            quotas=quotas,
        )
        wanted = {p.instance_id: p for p in result.placements}
        for instance_id in result.moved:
            moved_to = f"{instance_id} to {wanted[instance_id].host_id}"
            events.append(RolloutEvent("instance_moved", instance_id.split(".")[0], moved_to, now))
        for instance_id, placement in wanted.items():
            if current.get(instance_id) != placement:
                ops.append(Put(APPS_TABLE, inst_key(instance_id), encode_placement(placement)))
        for instance_id in set(current) - set(wanted):
            ops.append(Delete(APPS_TABLE, inst_key(instance_id)))
        ops.extend(self._unplaced_records(result, apps, versions, current, reports, now, events))
        for event in events:
            logger.info("%s: %s %s", event.app, event.kind, event.detail)
            body = orjson.dumps({"v": 1, **dataclasses.asdict(event)})
            ops.append(Put(APPS_TABLE, event_key(event.app, next(self._event_seq)), body))
        for stream, batch in event_batches(events, tenants).items():
            # Also in the app's events stream, in the same entry: forwarded to the hub,
            # searchable there. Not while a host still runs a release without streams.
            try:
                ops.extend(self.events.append_ops(stream, batch))
            except FeatureUnavailable:
                break
        if ops:
            await self.site.propose(ops)

    def _unplaced_records(
        self,
        result: ScheduleResult,
        apps: dict[str, AppSpec],
        versions: dict[str, str],
        current: dict[str, Placement],
        reports: dict[str, InstanceReport],
        now: float,
        events: list[RolloutEvent],
    ) -> list[Put | Delete]:
        """The ``status/`` records of the instances no host runs, each with its reason."""
        writes: list[Put | Delete] = []
        over = set(result.over_quota)
        for instance_id, reason in result.unplaced:
            app = instance_id.split(".")[0]
            before = current.get(instance_id)
            version = before.version if before else versions.get(app, apps[app].version)
            state = "over_quota" if instance_id in over else "unplaced"
            record = InstanceReport(instance_id, "", version, state, False, 0, now, reason)
            if record.same_facts(reports.get(instance_id)):
                continue
            logger.warning("cannot place %s: %s", instance_id, reason)
            writes.append(Put(APPS_TABLE, status_key(instance_id), record.encode()))
            events.append(RolloutEvent(f"instance_{state}", app, f"{instance_id}: {reason}", now))
        still = {u.instance_id for u in result.unplaced}
        for instance_id, report in reports.items():
            if report.unplaced and instance_id not in still:
                writes.append(Delete(APPS_TABLE, status_key(instance_id)))
        return writes

    def _upgraded(self, placement: Placement, version: str, spec: AppSpec) -> Placement:
        """The placement running ``version``, with that version's requests (when known)."""
        if version == spec.version:
            versioned: AppSpec | None = spec
        else:
            record = self.site.view.get(APPS_TABLE, appver_key(spec.name, version))
            versioned = decode_app(record.value).spec if record is not None else None
        service = versioned.service(placement.service) if versioned is not None else None
        if service is None:
            return dataclasses.replace(placement, version=version)
        return dataclasses.replace(
            placement,
            version=version,
            cpu_millis=service.cpu_request_millis,
            memory_bytes=service.memory_request_bytes,
        )

    def _rollout_for(
        self,
        spec: AppSpec,
        instances: list[Placement],
        state: RolloutState | None,
        now: float,
        events: list[RolloutEvent],
    ) -> RolloutState | None:
        """The rollout to step for this app, starting one when its version changed."""
        running = {p.version for p in instances}
        if state is not None and state.to_version == spec.version:
            return state if state.phase in ("upgrading", "rolling_back") else None
        if not running or running == {spec.version}:
            return None
        from_version = state.from_version if state and state.phase == "rolled_back" else None
        if from_version is None:
            # The version most instances run is the one that worked.
            from_version = max(running, key=lambda v: sum(p.version == v for p in instances))
        new_state, event = start_rollout(spec.name, from_version, spec.version, now)
        events.append(event)
        return new_state


def _health(placement: Placement, report: InstanceReport | None) -> InstanceHealth:
    if report is None or report.version != placement.version:
        return InstanceHealth(placement.instance_id, placement.version, False, False, 0.0)
    return InstanceHealth(
        placement.instance_id, placement.version, report.ready, report.failed, report.since
    )


def _version_blocked(
    spec: AppSpec,
    tenants: dict[str, str],
    quotas: dict[str, Quota],
    placements: dict[str, Placement],
    hosts: list[HostInfo],
) -> str | None:
    """Why ``spec``'s version cannot run within its tenant's quota, or None when it can:
    every instance it wants at its requests, with the tenant's other apps as placed."""
    tenant = tenants.get(spec.name, DEFAULT_TENANT)
    quota = quotas.get(tenant)
    if quota is None:
        return None
    usage = spec_usage(spec, [h.labels for h in hosts if h.alive])
    for p in placements.values():
        if p.app != spec.name and tenants.get(p.app, DEFAULT_TENANT) == tenant:
            usage = usage.plus(p.cpu_millis, p.memory_bytes)
    reason = over_quota(tenant, quota, usage)
    return None if reason is None else f"version {spec.version}: {reason}"


# Kinds that mean an instance is not where or how it should be: warnings (syslog level 4).
WARNING_EVENTS = frozenset({
    "instance_unplaced", "instance_over_quota", "instance_moved", "instance_gone",
    "instance_reverted", "revert_not_ready", "rollback_started", "rollback_done",
})  # fmt: skip
EVENTS_STREAM = "events"


def event_batches(
    events: list[RolloutEvent], tenants: dict[str, str]
) -> dict[StreamName, list[NewEvent]]:
    """The app events as stream events of ``TENANT/APP/events`` (text ``kind: detail``,
    key = kind); events of apps without a known tenant or a valid stream name are left
    to the apps table alone."""
    batches: dict[StreamName, list[NewEvent]] = {}
    for event in events:
        tenant = tenants.get(event.app)
        if tenant is None:
            continue
        try:
            name = StreamName(tenant, event.app, EVENTS_STREAM)
        except InvalidStreamName:
            continue
        level = 4 if event.kind in WARNING_EVENTS else 6
        text = f"{event.kind}: {event.detail}".encode()
        batches.setdefault(name, []).append(
            NewEvent(text, event.at, key=event.kind.encode(), level=level)
        )
    return batches
