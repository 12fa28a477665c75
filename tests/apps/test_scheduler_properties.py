"""Property tests of the scheduler: random sites, random apps, random histories."""

from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshorch.apps.scheduler import HostInfo, Placement, ScheduleResult, schedule
from meshorch.apps.spec import AppSpec
from tests.apps.strategies import app_lists, host_lists

SETTINGS = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def wanted_ids(apps: Sequence[AppSpec], hosts: Sequence[HostInfo]) -> set[str]:
    ids = set()
    for a in apps:
        for s in a.services:
            if s.replicas is not None:
                ids |= {f"{a.name}.{s.name}.{i}" for i in range(s.replicas)}
            else:
                ids |= {
                    f"{a.name}.{s.name}.{h.host_id}"
                    for h in hosts
                    if h.alive and s.allows_host(h.labels)
                }
    return ids


def check_invariants(
    apps: Sequence[AppSpec], hosts: Sequence[HostInfo], result: ScheduleResult
) -> None:
    by_host = {h.host_id: h for h in hosts}
    specs = {a.name: a for a in apps}
    cpu: Counter[str] = Counter()
    memory: Counter[str] = Counter()
    per_service: Counter[tuple[str, str, str]] = Counter()
    for p in result.placements:
        h = by_host[p.host_id]
        service = specs[p.app].service(p.service)
        assert service is not None
        assert h.alive, f"{p.instance_id} on dead host {h.host_id}"
        assert service.allows_host(h.labels), f"{p.instance_id} breaks constraints"
        cpu[h.host_id] += p.cpu_millis
        memory[h.host_id] += p.memory_bytes
        per_service[(p.app, p.service, p.host_id)] += 1
        if service.anti_affinity:
            assert per_service[(p.app, p.service, p.host_id)] == 1, "anti-affinity broken"
    for host_id, used in cpu.items():
        assert used <= by_host[host_id].cpu_millis, f"{host_id} CPU over capacity"
    for host_id, used in memory.items():
        assert used <= by_host[host_id].memory_bytes, f"{host_id} memory over capacity"
    placed = [p.instance_id for p in result.placements]
    unplaced = [u.instance_id for u in result.unplaced]
    assert len(set(placed)) == len(placed), "an instance placed twice"
    assert not set(placed) & set(unplaced)
    assert set(placed) | set(unplaced) == wanted_ids(apps, hosts)
    assert all(u.reason for u in result.unplaced)


def check_fixed_point(
    apps: Sequence[AppSpec], hosts: Sequence[HostInfo], result: ScheduleResult
) -> None:
    again = schedule(apps, hosts, result.placements)
    assert again.placements == result.placements
    assert again.moved == ()
    assert [u.instance_id for u in again.unplaced] == [u.instance_id for u in result.unplaced]


@SETTINGS
@given(app_lists(), host_lists())
def test_a_fresh_schedule_honours_every_rule(apps: list[AppSpec], hosts: list[HostInfo]) -> None:
    result = schedule(apps, hosts, [])
    check_invariants(apps, hosts, result)
    assert result.moved == ()
    check_fixed_point(apps, hosts, result)


@SETTINGS
@given(app_lists(), host_lists(), st.data())
def test_hosts_failing_and_returning(
    apps: list[AppSpec], hosts: list[HostInfo], data: st.DataObject
) -> None:
    first = schedule(apps, hosts, [])
    flips = data.draw(
        st.sets(st.sampled_from([h.host_id for h in hosts])) if hosts else st.just(set())
    )
    changed = [replace(h, alive=not h.alive) if h.host_id in flips else h for h in hosts]
    second = schedule(apps, changed, first.placements)
    check_invariants(apps, changed, second)
    check_fixed_point(apps, changed, second)
    alive = {h.host_id for h in changed if h.alive}
    wanted = wanted_ids(apps, changed)
    # Stability: whatever still runs on an alive host and is still wanted stays put.
    for p in first.placements:
        if p.host_id in alive and p.instance_id in wanted:
            assert p in second.placements
    # Only instances that lost their host move.
    before = {p.instance_id: p.host_id for p in first.placements}
    for iid in second.moved:
        assert before[iid] not in alive


def corrupt_placement(iid: str, host_id: str, cpu: int, memory: int) -> Placement:
    app, service, last = iid.split(".")
    index = int(last) if last.isdigit() else 0
    return Placement(iid, app, service, index, "0", host_id, cpu, memory)


@SETTINGS
@given(app_lists(), host_lists(), st.data())
def test_any_current_state_is_repaired(
    apps: list[AppSpec], hosts: list[HostInfo], data: st.DataObject
) -> None:
    """Even corrupt placements (wrong hosts, sizes, duplicates) give a valid result."""
    ids = [*sorted(wanted_ids(apps, hosts)), "ghost.web.0"]
    host_ids = [*(h.host_id for h in hosts), "gone"]
    placement = st.builds(
        corrupt_placement,
        st.sampled_from(ids),
        st.sampled_from(host_ids),
        st.integers(0, 3000),
        st.integers(0, 2**31),
    )
    current = data.draw(st.lists(placement, max_size=12))
    result = schedule(apps, hosts, current)
    check_invariants(apps, hosts, result)
    check_fixed_point(apps, hosts, result)
