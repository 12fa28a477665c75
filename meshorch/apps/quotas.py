"""Per-tenant resource quotas at a site: the records, their validation and the accounting.

A tenant's quota caps, over the whole site, the sum of the CPU and memory requests of its
placed instances and their number (docs/app-spec.md, "Tenants and quotas"). The site
scheduler (``meshorch.apps.scheduler``) enforces it when it places instances; the container
limits enforce each instance's share at run time.

Where quotas live in the replicated state (``apps`` table)::

    quota/{tenant}    {"v": 1, "tenant", "cpu_millis", "memory_bytes", "instances"}

A field that is null is unlimited; a quota with every field null is no quota (its record
is deleted). Pure: no I/O, no clock.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from meshorch.apps.spec import AppSpec, format_cpu, format_memory
from meshorch.errors import RemoteInputError
from meshorch.secrets.keyring import DEFAULT_TENANT, TENANT_RULE, is_tenant
from meshorch.state.tables import APPS_TABLE
from raft import Delete, Put

__all__ = [
    "DEFAULT_TENANT",
    "QUOTA_FIELDS",
    "QUOTA_PREFIX",
    "Quota",
    "Usage",
    "check_tenant",
    "decode_quota",
    "over_quota",
    "parse_quota",
    "quota_key",
    "quota_writes",
    "spec_usage",
]

QUOTA_PREFIX = b"quota/"
QUOTA_FIELDS = ("cpu_millis", "memory_bytes", "instances")
# Bounds: far above any site, low enough that sums stay exact everywhere.
MAX_CPU_MILLIS = 10**9  # a million cores
MAX_MEMORY_BYTES = 2**60  # an exbibyte
MAX_INSTANCES = 10**6


@dataclass(frozen=True, slots=True)
class Quota:
    """What a tenant may use at the site; None is unlimited."""

    cpu_millis: int | None = None
    memory_bytes: int | None = None
    instances: int | None = None

    @property
    def unlimited(self) -> bool:
        return self.cpu_millis is None and self.memory_bytes is None and self.instances is None

    def to_json(self) -> dict[str, int | None]:
        return {
            "cpu_millis": self.cpu_millis,
            "memory_bytes": self.memory_bytes,
            "instances": self.instances,
        }


@dataclass(frozen=True, slots=True)
class Usage:
    """What a tenant's placed instances request in total."""

    cpu_millis: int = 0
    memory_bytes: int = 0
    instances: int = 0

    def plus(self, cpu_millis: int, memory_bytes: int, instances: int = 1) -> Usage:
        return Usage(
            self.cpu_millis + cpu_millis,
            self.memory_bytes + memory_bytes,
            self.instances + instances,
        )

    def to_json(self) -> dict[str, int]:
        return {
            "cpu_millis": self.cpu_millis,
            "memory_bytes": self.memory_bytes,
            "instances": self.instances,
        }


def over_quota(tenant: str, quota: Quota | None, usage: Usage) -> str | None:
    """Why ``usage`` breaks the tenant's quota, or None when it does not.

    The reason names every resource over its cap, as *what it would use* of *the cap*:
    ``tenant acme over its quota: memory 96Mi of 64Mi, instances 5 of 4``.
    """
    if quota is None:
        return None
    over = []
    if quota.cpu_millis is not None and usage.cpu_millis > quota.cpu_millis:
        over.append(f"cpu {format_cpu(usage.cpu_millis)} of {format_cpu(quota.cpu_millis)}")
    if quota.memory_bytes is not None and usage.memory_bytes > quota.memory_bytes:
        used, cap = format_memory(usage.memory_bytes), format_memory(quota.memory_bytes)
        over.append(f"memory {used} of {cap}")
    if quota.instances is not None and usage.instances > quota.instances:
        over.append(f"instances {usage.instances} of {quota.instances}")
    if not over:
        return None
    return f"tenant {tenant} over its quota: " + ", ".join(over)


def spec_usage(spec: AppSpec, alive_labels: Iterable[Mapping[str, str]]) -> Usage:
    """What every instance of ``spec`` requests, once all are placed on the alive hosts
    (given by their labels): replicas, and per-host instances on the hosts that qualify."""
    hosts = list(alive_labels)
    usage = Usage()
    for service in spec.services:
        if service.replicas is None:
            count = sum(1 for labels in hosts if service.allows_host(labels))
        else:
            count = service.replicas
        usage = usage.plus(
            service.cpu_request_millis * count, service.memory_request_bytes * count, count
        )
    return usage


# -- validation ----------------------------------------------------------------------------


def check_tenant(tenant: object, field: str = "tenant") -> str:
    """A tenant id (1-63 of a-z, 0-9, '-'); raises RemoteInputError ``bad_tenant``."""
    if not isinstance(tenant, str) or not is_tenant(tenant):
        raise RemoteInputError("bad_tenant", f"{field}: {tenant!r} is not a tenant: {TENANT_RULE}")
    return tenant


_BOUNDS = {
    "cpu_millis": MAX_CPU_MILLIS,
    "memory_bytes": MAX_MEMORY_BYTES,
    "instances": MAX_INSTANCES,
}


def parse_quota(data: Mapping[str, Any], extra_fields: Iterable[str] = ()) -> Quota:
    """A quota from ``{"cpu_millis", "memory_bytes", "instances"}`` (each an integer >= 0 or
    null; a field left out is null). Raises RemoteInputError ``bad_quota`` listing every
    problem; unknown fields are problems (``extra_fields`` are the caller's own)."""
    problems = []
    unknown = set(data) - set(QUOTA_FIELDS) - set(extra_fields)
    if unknown:
        problems.append(f"unknown fields: {', '.join(sorted(unknown))}")
    values: dict[str, int | None] = {}
    for name in QUOTA_FIELDS:
        value = data.get(name)
        if value is None:
            values[name] = None
        elif isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{name}: an integer or null, not {value!r}")
        elif not 0 <= value <= _BOUNDS[name]:
            problems.append(f"{name}: {value} is not between 0 and {_BOUNDS[name]}")
        else:
            values[name] = value
    if problems:
        raise RemoteInputError("bad_quota", "; ".join(problems))
    return Quota(values["cpu_millis"], values["memory_bytes"], values["instances"])


# -- records -------------------------------------------------------------------------------


def quota_key(tenant: str) -> bytes:
    return QUOTA_PREFIX + tenant.encode()


def encode_quota(tenant: str, quota: Quota) -> bytes:
    return orjson.dumps({"v": 1, "tenant": tenant, **quota.to_json()})


def decode_quota(raw: bytes) -> tuple[str, Quota]:
    data = orjson.loads(raw)

    def field(name: str) -> int | None:
        value = data.get(name)
        return None if value is None else int(value)

    return str(data["tenant"]), Quota(
        field("cpu_millis"), field("memory_bytes"), field("instances")
    )


def quota_writes(tenant: str, quota: Quota) -> list[Put | Delete]:
    """The Raft write that sets ``tenant``'s quota (removes it when unlimited)."""
    if quota.unlimited:
        return [Delete(APPS_TABLE, quota_key(tenant))]
    return [Put(APPS_TABLE, quota_key(tenant), encode_quota(tenant, quota))]


def op_writes(op: Mapping[str, Any]) -> list[Put | Delete]:
    """The ``tenant.quota`` delta operation (docs/fleet-link.md)."""
    tenant = check_tenant(op.get("tenant"))
    quota = parse_quota(op, extra_fields=("op", "tenant"))
    return quota_writes(tenant, quota)
