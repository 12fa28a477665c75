"""How applications live in a site's replicated state (the ``apps`` table).

    app/{name}              the desired spec, canonical JSON, and its tenant (``AppRecord``)
    appver/{name}/{version} every version applied (rollback needs the old one), same record
    rollout/{name}          the rolling upgrade in progress, if any
    inst/{instance_id}      a placement: which host runs which version
    status/{instance_id}    what the host running it reports; for an instance the leader
                            cannot place, ``host_id`` "" and state ``unplaced`` or
                            ``over_quota`` with the reason (written by the leader)
    quota/{tenant}          a tenant's quota (``meshorch.apps.quotas``)
    hostinfo/{host_id}      a host's capacity and labels
    event/{app}/{seq}       what happened (rollouts, rollbacks, moves)

Records are versioned JSON (orjson); this module is pure.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import orjson

from meshorch.apps.quotas import DEFAULT_TENANT
from meshorch.apps.rollout import InFlight, RolloutState
from meshorch.apps.scheduler import HostInfo, Placement
from meshorch.apps.spec import AppSpec, from_json, to_json
from meshorch.state.tables import APPS_TABLE
from raft import StateView

APP_PREFIX = b"app/"
APPVER_PREFIX = b"appver/"
ROLLOUT_PREFIX = b"rollout/"
INST_PREFIX = b"inst/"
STATUS_PREFIX = b"status/"
HOSTINFO_PREFIX = b"hostinfo/"
HOSTRES_PREFIX = b"hostres/"  # hostres/<host>: what it uses (meshorch.apps.resources), JSON
EVENT_PREFIX = b"event/"


def app_key(name: str) -> bytes:
    return APP_PREFIX + name.encode()


def appver_key(name: str, version: str) -> bytes:
    return APPVER_PREFIX + f"{name}/{version}".encode()


def rollout_key(name: str) -> bytes:
    return ROLLOUT_PREFIX + name.encode()


def inst_key(instance_id: str) -> bytes:
    return INST_PREFIX + instance_id.encode()


def status_key(instance_id: str) -> bytes:
    return STATUS_PREFIX + instance_id.encode()


def hostinfo_key(host_id: str) -> bytes:
    return HOSTINFO_PREFIX + host_id.encode()


def event_key(app: str, seq: int) -> bytes:
    return EVENT_PREFIX + f"{app}/{seq:020d}".encode()


@dataclass(frozen=True, slots=True)
class AppRecord:
    """An ``app/`` (or ``appver/``) record: the spec and the tenant that owns the app.

    Version 2 added ``tenant``; a version 1 record (no tenant) belongs to ``default``.
    Readers that know only version 1 still find the spec under ``spec``.
    """

    spec: AppSpec
    tenant: str = DEFAULT_TENANT

    def encode(self) -> bytes:
        return orjson.dumps({"v": 2, "spec": to_json(self.spec), "tenant": self.tenant})

    @staticmethod
    def decode(raw: bytes) -> AppRecord:
        data = orjson.loads(raw)
        tenant = str(data.get("tenant") or DEFAULT_TENANT)
        return AppRecord(from_json(data["spec"], tenant=tenant), tenant)


def encode_spec(spec: AppSpec, tenant: str = DEFAULT_TENANT) -> bytes:
    return AppRecord(spec, tenant).encode()


def decode_spec(raw: bytes) -> AppSpec:
    return AppRecord.decode(raw).spec


def decode_app(raw: bytes) -> AppRecord:
    return AppRecord.decode(raw)


UNPLACED_STATES = frozenset({"unplaced", "over_quota"})


def encode_placement(placement: Placement) -> bytes:
    return orjson.dumps({"v": 1, **asdict(placement)})


def decode_placement(raw: bytes) -> Placement:
    data = orjson.loads(raw)
    data.pop("v", None)
    return Placement(**data)


def encode_hostinfo(host: HostInfo) -> bytes:
    return orjson.dumps(
        {
            "v": 1,
            "host_id": host.host_id,
            "labels": dict(host.labels),
            "cpu_millis": host.cpu_millis,
            "memory_bytes": host.memory_bytes,
            # Added with protocol 2; older readers ignore them, older writers leave them out.
            "agent_version": host.agent_version,
            "protocol": host.protocol,
        }
    )


def decode_hostinfo(raw: bytes, alive: bool) -> HostInfo:
    data = orjson.loads(raw)
    return HostInfo(
        str(data["host_id"]),
        dict(data["labels"]),
        int(data["cpu_millis"]),
        int(data["memory_bytes"]),
        alive,
        str(data.get("agent_version", "")),
        int(data.get("protocol", 1)),
    )


def encode_rollout(state: RolloutState) -> bytes:
    data = asdict(state)
    return orjson.dumps({"v": 1, **data})


def decode_rollout(raw: bytes) -> RolloutState:
    data = orjson.loads(raw)
    data.pop("v", None)
    flight = data.pop("in_flight")
    return RolloutState(
        **{**data, "done": tuple(data["done"]), "reverted": tuple(data["reverted"])},
        in_flight=InFlight(**flight) if flight else None,
    )


@dataclass(frozen=True, slots=True)
class InstanceReport:
    """What the host running an instance says about it."""

    instance_id: str
    host_id: str
    version: str
    state: str  # starting | running | backoff | exited | failed; unplaced | over_quota
    ready: bool
    restarts: int
    since: float  # when (version, ready, failed) last changed
    message: str = ""

    @property
    def failed(self) -> bool:
        return self.state == "failed"

    @property
    def unplaced(self) -> bool:
        """Written by the leader for an instance it cannot place (no host)."""
        return self.host_id == "" and self.state in UNPLACED_STATES

    def encode(self) -> bytes:
        return orjson.dumps({"v": 1, **asdict(self)})

    @staticmethod
    def decode(raw: bytes) -> InstanceReport:
        data: dict[str, Any] = orjson.loads(raw)
        data.pop("v", None)
        return InstanceReport(**data)

    def same_facts(self, other: InstanceReport | None) -> bool:
        """Equal but for timestamps: no need to write it again."""
        if other is None:
            return False
        mine, theirs = asdict(self), asdict(other)
        mine.pop("since")
        theirs.pop("since")
        return mine == theirs


def host_protocols(view: StateView) -> dict[str, int]:
    """The site protocol each registered host speaks (``meshorch.state.protocol``)."""
    records, _ = view.scan(APPS_TABLE, HOSTINFO_PREFIX, 100_000)
    return {
        info.host_id: info.protocol
        for info in (decode_hostinfo(r.value, alive=True) for _, r in records)
    }
