"""The site scheduler: which host runs each instance of each application.

A pure core, run by the Raft leader: ``schedule(apps, hosts, current)`` takes the desired
applications, the hosts as the site knows them and the placements now in the replicated
state, and returns the placements to write back. The leader runs it on every change (an
app, a host gone or back) and commits the result; nothing here waits or reads a clock.

Rules, in the order they apply:

1. **Keep** a current placement while its host is alive, still matches the service's
   label constraints, and the instance is still wanted (app, service and index exist).
   Kept placements are never moved to balance load: a host that comes back gets new
   instances only (a per-host instance of its own, or replicas that could not be placed),
   because moving a healthy instance costs a restart and buys nothing at the time.
   A kept placement that would overflow its host (the host reports less capacity than
   before) or break anti-affinity (two copies on one host) is moved instead, so the
   result always honours every rule.
2. **Re-place** instances whose host is dead or gone: the same instance, with the same
   version, elsewhere. They appear in ``moved``. Like new instances they request what the
   spec says (the requests of a kept placement are the ones recorded when it was placed),
   so an instance that cannot be re-placed gets the same answer on the next run. One
   that cannot be re-placed is listed in ``unplaced`` and leaves the placements: placed
   later, it is a new instance.
3. **Create** missing instances: new replicas, and a per-host instance on every alive host
   that matches the constraints. A new instance gets the version ``new_versions`` names for
   its app, else the spec's version: the scheduler never changes an instance's version,
   the rollout does (``meshorch.apps.rollout``).
4. **Drop** instances of removed apps or services, replicas beyond the count, per-host
   instances of hosts that no longer qualify.

Placing an instance: a host qualifies when it is alive, matches the constraints, has the
free CPU and memory (the sum of requests on a host never exceeds its capacity) and, for an
``anti_affinity`` service, runs no other instance of it. Among qualifying hosts the choice
is, in order: fewest instances of the same service (spreading even without
anti-affinity), then least loaded once it holds the instance (the larger of its CPU and
memory fractions), then host id. Instances are placed per-host first (they have one
possible host), then those that lost their host, then new ones, each group by app,
service and index. An instance with no qualifying host is listed in ``unplaced`` with the
count of hosts refused for each reason. Input order never changes the result.

Tenant quotas (``meshorch.apps.quotas``): every app belongs to a tenant (``tenants``, default
``default``), and a tenant may have a quota on the sum of the CPU and memory requests of
its placed instances and on their number, over the whole site. The quota is booked in the
order above: kept placements first (in app, service, index order), then per-host, moved
and new instances. An instance that would take its tenant over the quota is not placed:
it is listed in ``unplaced`` with the reason (``tenant acme over its quota: memory 96Mi of
64Mi``) and in ``over_quota``, and the next instances are still tried (a smaller one may
fit). A kept placement over the quota (the quota was lowered) leaves the placements the
same way, so the result always honours every quota.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, TypeVar

from meshorch.apps.quotas import DEFAULT_TENANT, Quota, Usage, over_quota
from meshorch.apps.spec import AppSpec, ServiceSpec, format_cpu, format_memory

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class HostInfo:
    """A host as the scheduler sees it: capacity is what instances may request in total."""

    host_id: str
    labels: Mapping[str, str]
    cpu_millis: int
    memory_bytes: int
    alive: bool = True
    agent_version: str = ""  # the meshorch release the host's agent runs
    protocol: int = 1  # the site protocol it speaks (meshorch.state.protocol)


@dataclass(frozen=True, slots=True)
class Placement:
    """One instance on one host, as stored in the replicated state.

    ``instance_id`` is ``{app}.{service}.{index}``, or ``{app}.{service}.{host_id}`` for a
    per-host service (whose ``index`` is 0). Names hold no '.', so ids are unambiguous.
    """

    instance_id: str
    app: str
    service: str
    index: int
    version: str
    host_id: str
    cpu_millis: int
    memory_bytes: int


class Unplaced(NamedTuple):
    instance_id: str
    reason: str


@dataclass(frozen=True, slots=True)
class ScheduleResult:
    placements: tuple[Placement, ...]  # sorted by app, service, index, host
    unplaced: tuple[Unplaced, ...]  # sorted by instance id
    moved: tuple[str, ...]  # instances that had a host in ``current`` and now have another
    over_quota: tuple[str, ...] = ()  # unplaced because of their tenant's quota, sorted


def instance_id(app: str, service: str, index_or_host: int | str) -> str:
    return f"{app}.{service}.{index_or_host}"


def schedule(
    apps: Sequence[AppSpec],
    hosts: Sequence[HostInfo],
    current: Sequence[Placement],
    *,
    new_versions: Mapping[str, str] | None = None,
    tenants: Mapping[str, str] | None = None,
    quotas: Mapping[str, Quota] | None = None,
) -> ScheduleResult:
    """Place every wanted instance; see the module docstring for the rules.

    ``new_versions`` maps an app name to the version its *new* instances get (the rollout
    passes its from-version while an upgrade runs); by default, the spec's version.
    ``tenants`` maps an app name to its tenant (default ``default``), ``quotas`` a tenant
    to its quota (none: unlimited).
    Raises ValueError when two apps or two hosts share a name.
    """
    specs = _by_unique_name(apps, lambda a: a.name, "app")
    hosts_by_id = _by_unique_name(hosts, lambda h: h.host_id, "host")
    ledger = {h.host_id: _HostLoad(h) for h in sorted(hosts, key=_host_key) if h.alive}
    books = _QuotaBooks(tenants or {}, quotas or {})
    wanted = _wanted(specs, ledger)
    kept, displaced, refused = _keep_current(current, wanted, ledger, books)
    versions = new_versions or {}

    placements = list(kept)
    unplaced: list[Unplaced] = list(refused)
    over = [u.instance_id for u in refused]
    moved: list[str] = []
    done = {p.instance_id for p in kept} | set(over)
    for want in sorted(wanted.values(), key=lambda w: w.order(displaced)):
        if want.instance_id in done:
            continue
        before = displaced.get(want.instance_id)
        version = before.version if before else versions.get(want.app, specs[want.app].version)
        cpu, memory = want.service.cpu_request_millis, want.service.memory_request_bytes
        reason = books.refusal(want.app, cpu, memory)
        placement = None
        if reason is None:
            placement, reason = _place(want, version, ledger)
        else:
            over.append(want.instance_id)
        if placement is None:
            unplaced.append(Unplaced(want.instance_id, _lost(before, hosts_by_id) + reason))
            continue
        books.add(want.app, cpu, memory)
        placements.append(placement)
        if before is not None:
            moved.append(want.instance_id)
    return ScheduleResult(
        tuple(sorted(placements, key=_placement_key)),
        tuple(sorted(unplaced)),
        tuple(sorted(moved)),
        tuple(sorted(over)),
    )


# --- wanted instances -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Want:
    app: str
    service: ServiceSpec
    service_rank: int  # position in the spec, so services keep their written order
    index: int
    instance_id: str
    pinned_host: str | None  # per-host instances have exactly one possible host

    def order(self, displaced: Mapping[str, Placement]) -> tuple[int, str, int, int, str]:
        group = 0 if self.pinned_host else 1 if self.instance_id in displaced else 2
        return (group, self.app, self.service_rank, self.index, self.instance_id)

    def matches(self, p: Placement) -> bool:
        return (
            p.app == self.app
            and p.service == self.service.name
            and p.index == self.index
            and (self.pinned_host is None or p.host_id == self.pinned_host)
        )


def _wanted(specs: Mapping[str, AppSpec], ledger: Mapping[str, _HostLoad]) -> dict[str, _Want]:
    wanted: dict[str, _Want] = {}
    for app in specs.values():
        for rank, service in enumerate(app.services):
            if service.replicas is not None:
                for index in range(service.replicas):
                    iid = instance_id(app.name, service.name, index)
                    wanted[iid] = _Want(app.name, service, rank, index, iid, None)
                continue
            for host_id, load in ledger.items():
                if service.allows_host(load.host.labels):
                    iid = instance_id(app.name, service.name, host_id)
                    wanted[iid] = _Want(app.name, service, rank, 0, iid, host_id)
    return wanted


# --- keeping what runs ------------------------------------------------------------------


def _keep_current(
    current: Sequence[Placement],
    wanted: Mapping[str, _Want],
    ledger: Mapping[str, _HostLoad],
    books: _QuotaBooks,
) -> tuple[list[Placement], dict[str, Placement], list[Unplaced]]:
    """Split current placements into kept ones, wanted ones needing a new host, and ones
    over their tenant's quota (unplaced, with the reason).

    Placements of unwanted instances are simply left out (dropped). When the state holds
    one instance twice, a copy on an alive host is preferred and the others dropped.
    """
    kept: list[Placement] = []
    kept_ids: set[str] = set()
    displaced: dict[str, Placement] = {}
    refused: dict[str, Unplaced] = {}

    # Higher priorities are kept first: on a host that now reports less capacity (short of
    # memory or disk) the lowest priorities are the ones that move.
    def priority(p: Placement) -> int:
        want = wanted.get(p.instance_id)
        return 0 if want is None else want.service.priority

    ordered = sorted(
        current, key=lambda p: (p.host_id not in ledger, -priority(p), *_placement_key(p))
    )
    for p in ordered:
        want = wanted.get(p.instance_id)
        if want is None or p.instance_id in kept_ids or not want.matches(p):
            continue
        load = ledger.get(p.host_id)
        if load is None or _refusal(want, p.cpu_millis, p.memory_bytes, load) is not None:
            if p.instance_id not in refused:
                displaced.setdefault(p.instance_id, p)
            continue
        reason = books.refusal(p.app, p.cpu_millis, p.memory_bytes)
        if reason is not None:
            refused.setdefault(p.instance_id, Unplaced(p.instance_id, reason))
            displaced.pop(p.instance_id, None)
            continue
        books.add(p.app, p.cpu_millis, p.memory_bytes)
        load.add(p)
        kept.append(p)
        kept_ids.add(p.instance_id)
        displaced.pop(p.instance_id, None)
        refused.pop(p.instance_id, None)
    return kept, displaced, list(refused.values())


# --- tenant quotas ----------------------------------------------------------------------


@dataclass(slots=True)
class _QuotaBooks:
    """What each tenant's placements request so far in this run (mutable, run-local)."""

    tenants: Mapping[str, str]  # app -> tenant
    quotas: Mapping[str, Quota]
    used: dict[str, Usage] = field(default_factory=dict)

    def tenant(self, app: str) -> str:
        return self.tenants.get(app, DEFAULT_TENANT)

    def refusal(self, app: str, cpu: int, memory: int) -> str | None:
        tenant = self.tenant(app)
        after = self.used.get(tenant, Usage()).plus(cpu, memory)
        return over_quota(tenant, self.quotas.get(tenant), after)

    def add(self, app: str, cpu: int, memory: int) -> None:
        tenant = self.tenant(app)
        self.used[tenant] = self.used.get(tenant, Usage()).plus(cpu, memory)


# --- choosing a host --------------------------------------------------------------------


@dataclass(slots=True)
class _HostLoad:
    """What one run of the scheduler has put on a host so far (mutable, run-local)."""

    host: HostInfo
    cpu_used: int = 0
    memory_used: int = 0
    per_service: Counter[tuple[str, str]] = field(default_factory=Counter)

    def add(self, p: Placement) -> None:
        self.cpu_used += p.cpu_millis
        self.memory_used += p.memory_bytes
        self.per_service[(p.app, p.service)] += 1

    def load_with(self, cpu: int, memory: int) -> float:
        return max(
            _fraction(self.cpu_used + cpu, self.host.cpu_millis),
            _fraction(self.memory_used + memory, self.host.memory_bytes),
        )


def _fraction(used: int, capacity: int) -> float:
    if capacity <= 0:
        return 0.0 if used == 0 else float("inf")
    return used / capacity


_REASONS = {
    "constraints": "do not match the label constraints",
    "anti_affinity": "already run an instance of the service (anti-affinity)",
    "cpu": "lack CPU",
    "memory": "lack memory",
}


def _refusal(want: _Want, cpu: int, memory: int, load: _HostLoad) -> str | None:
    """Why ``load``'s host cannot take the instance, or None when it can."""
    service = want.service
    if want.pinned_host is not None and want.pinned_host != load.host.host_id:
        return "pinned"
    if not service.allows_host(load.host.labels):
        return "constraints"
    if service.anti_affinity and load.per_service[(want.app, service.name)] > 0:
        return "anti_affinity"
    if load.cpu_used + cpu > load.host.cpu_millis:
        return "cpu"
    if load.memory_used + memory > load.host.memory_bytes:
        return "memory"
    return None


def _place(
    want: _Want, version: str, ledger: Mapping[str, _HostLoad]
) -> tuple[Placement | None, str]:
    """Put the instance on the best host and book it there, or say why no host can."""
    cpu, memory = want.service.cpu_request_millis, want.service.memory_request_bytes
    host_id, reason = _choose_host(want, cpu, memory, ledger)
    if host_id is None:
        return None, reason
    service = want.service.name
    placement = Placement(
        want.instance_id, want.app, service, want.index, version, host_id, cpu, memory
    )
    ledger[host_id].add(placement)
    return placement, ""


def _choose_host(
    want: _Want, cpu: int, memory: int, ledger: Mapping[str, _HostLoad]
) -> tuple[str | None, str]:
    """The best host for the instance, or None and why no host qualifies."""
    refused: Counter[str] = Counter()
    best: tuple[int, float, str] | None = None
    for host_id, load in ledger.items():
        why = _refusal(want, cpu, memory, load)
        if why is not None:
            refused[why] += 1
            continue
        rank = (
            load.per_service[(want.app, want.service.name)],
            load.load_with(cpu, memory),
            host_id,
        )
        best = rank if best is None or rank < best else best
    if best is not None:
        return best[2], ""
    return None, _explain(refused, cpu, memory, len(ledger))


def _explain(refused: Counter[str], cpu: int, memory: int, alive: int) -> str:
    needs = f"needs {format_cpu(cpu)} CPU and {format_memory(memory)} memory"
    if alive == 0:
        return f"no alive host ({needs})"
    counts = [f"{n} {_REASONS[why]}" for why, n in sorted(refused.items()) if why in _REASONS]
    if not counts:  # only "pinned": a per-host instance whose host was refused elsewhere
        return f"its host cannot take it ({needs})"
    return f"no host can take it ({needs}): " + ", ".join(counts)


def _lost(before: Placement | None, hosts: Mapping[str, HostInfo]) -> str:
    if before is None:
        return ""
    host = hosts.get(before.host_id)
    state = "is gone" if host is None else "is down" if not host.alive else "no longer qualifies"
    return f"was on {before.host_id}, which {state}; "


# --- helpers ----------------------------------------------------------------------------


def _by_unique_name(items: Sequence[T], name: Callable[[T], str], what: str) -> dict[str, T]:
    result: dict[str, T] = {}
    for item in sorted(items, key=name):
        key = name(item)
        if key in result:
            raise ValueError(f"two {what}s are named {key!r}")
        result[key] = item
    return result


def _host_key(host: HostInfo) -> str:
    return host.host_id


def _placement_key(p: Placement) -> tuple[str, str, int, str, str]:
    return (p.app, p.service, p.index, p.host_id, p.instance_id)
