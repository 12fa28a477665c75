import random
from dataclasses import replace

import pytest

from meshorch.apps.scheduler import HostInfo, Placement, ScheduleResult, schedule
from meshorch.apps.spec import AppSpec, Constraint, ContainerSpec, Resources, ServiceSpec

MI = 2**20


def svc(
    name: str,
    replicas: int | None = 1,
    *,
    cpu: int = 100,
    memory: int = 64 * MI,
    constraints: tuple[Constraint, ...] = (),
    anti_affinity: bool = False,
) -> ServiceSpec:
    container = ContainerSpec("main", "busybox", Resources(cpu, None, memory, memory))
    return ServiceSpec(
        name, (container,), replicas, constraints=constraints, anti_affinity=anti_affinity
    )


def app(name: str, *services: ServiceSpec, version: str = "1") -> AppSpec:
    return AppSpec(name, version, services)


def host(
    host_id: str,
    *,
    cpu: int = 1000,
    memory: int = 1024 * MI,
    alive: bool = True,
    **labels: str,
) -> HostInfo:
    return HostInfo(host_id, labels, cpu, memory, alive)


def where(result: ScheduleResult) -> dict[str, str]:
    return {p.instance_id: p.host_id for p in result.placements}


def test_replicas_spread_over_hosts() -> None:
    result = schedule([app("a", svc("web", 3))], [host("h1"), host("h2"), host("h3")], [])
    assert where(result) == {"a.web.0": "h1", "a.web.1": "h2", "a.web.2": "h3"}
    assert result.unplaced == () and result.moved == ()
    p = result.placements[0]
    assert (p.app, p.service, p.index, p.version, p.cpu_millis, p.memory_bytes) == (
        "a",
        "web",
        0,
        "1",
        100,
        64 * MI,
    )


def test_least_loaded_host_first() -> None:
    busy = app("busy", svc("db", 1, memory=512 * MI))
    first = schedule([busy], [host("h1"), host("h2")], [])
    assert where(first) == {"busy.db.0": "h1"}
    second = schedule([busy, app("new", svc("web", 1))], [host("h1"), host("h2")], first.placements)
    assert where(second)["new.web.0"] == "h2"


def test_capacity_is_never_exceeded() -> None:
    apps = [app("a", svc("web", 5, cpu=400, memory=100 * MI))]
    result = schedule(apps, [host("h1"), host("h2")], [])  # 2 fit on each by CPU
    assert len(result.placements) == 4
    [(iid, reason)] = result.unplaced
    assert iid == "a.web.4"
    assert reason == "no host can take it (needs 400m CPU and 100Mi memory): 2 lack CPU"


def test_memory_capacity() -> None:
    result = schedule([app("a", svc("db", 2, memory=768 * MI))], [host("h1")], [])
    assert where(result) == {"a.db.0": "h1"}
    assert result.unplaced[0].reason.endswith("1 lack memory")


def test_label_constraints() -> None:
    ssd = (Constraint("disk", "equals", ("ssd",)), Constraint("zone", "not_in", ("dmz",)))
    apps = [app("a", svc("db", 2, constraints=ssd))]
    hosts = [host("h1", disk="hdd"), host("h2", disk="ssd", zone="dmz"), host("h3", disk="ssd")]
    result = schedule(apps, hosts, [])
    assert where(result) == {"a.db.0": "h3", "a.db.1": "h3"}
    only_h1 = [host("h1", disk="hdd")]
    result = schedule(apps, only_h1, [])
    assert [u.reason for u in result.unplaced] == [
        "no host can take it (needs 100m CPU and 64Mi memory): 1 do not match the label constraints"
    ] * 2


def test_anti_affinity_spreads_or_leaves_unplaced() -> None:
    apps = [app("a", svc("web", 3, anti_affinity=True))]
    result = schedule(apps, [host("h1"), host("h2")], [])
    assert sorted(where(result).values()) == ["h1", "h2"]
    [(iid, reason)] = result.unplaced
    assert iid == "a.web.2"
    assert "2 already run an instance of the service (anti-affinity)" in reason


def test_without_anti_affinity_replicas_may_share_a_host() -> None:
    result = schedule([app("a", svc("web", 3))], [host("h1"), host("h2")], [])
    assert sorted(where(result).values()) == ["h1", "h1", "h2"]


def test_per_host_runs_one_instance_on_every_eligible_alive_host() -> None:
    gpu = (Constraint("gpu", "exists"),)
    apps = [app("a", svc("agent", None, constraints=gpu))]
    hosts = [host("h1", gpu="1"), host("h2"), host("h3", gpu="1"), host("h4", gpu="1", alive=False)]
    result = schedule(apps, hosts, [])
    assert where(result) == {"a.agent.h1": "h1", "a.agent.h3": "h3"}
    assert {p.index for p in result.placements} == {0}
    # A host that dies loses its per-host instance: nothing to re-place, nothing unplaced.
    hosts[0] = replace(hosts[0], alive=False)
    after = schedule(apps, hosts, result.placements)
    assert where(after) == {"a.agent.h3": "h3"}
    assert after.unplaced == () and after.moved == ()
    # And gets it back when it returns.
    hosts[0] = replace(hosts[0], alive=True)
    assert schedule(apps, hosts, after.placements).placements == result.placements


def test_per_host_instance_that_does_not_fit_is_unplaced() -> None:
    apps = [app("a", svc("agent", None, memory=512 * MI))]
    result = schedule(apps, [host("h1"), host("h2", memory=256 * MI)], [])
    assert where(result) == {"a.agent.h1": "h1"}
    [(iid, reason)] = result.unplaced
    assert iid == "a.agent.h2"
    assert reason.endswith("1 lack memory")


def test_instances_of_a_dead_host_are_replaced_with_their_version() -> None:
    apps = [app("a", svc("web", 2), svc("db", 1), version="2")]
    current = [
        Placement("a.web.0", "a", "web", 0, "1", "h1", 100, 64 * MI),
        Placement("a.web.1", "a", "web", 1, "1", "h2", 100, 64 * MI),
        Placement("a.db.0", "a", "db", 0, "1", "h1", 100, 64 * MI),
    ]
    hosts = [host("h1", alive=False), host("h2"), host("h3")]
    result = schedule(apps, hosts, current)
    assert where(result) == {"a.web.0": "h3", "a.web.1": "h2", "a.db.0": "h2"}
    assert result.moved == ("a.db.0", "a.web.0")
    assert {p.version for p in result.placements} == {"1"}  # versions are the rollout's job
    # The survivor is untouched.
    assert current[1] in result.placements


def test_a_host_coming_back_moves_nothing() -> None:
    apps = [app("a", svc("web", 2, anti_affinity=True), svc("db", 1))]
    hosts = [host("h1"), host("h2"), host("h3")]
    first = schedule(apps, hosts, [])
    down = [replace(h, alive=h.host_id != "h1") for h in hosts]
    during = schedule(apps, down, first.placements)
    assert "h1" not in where(during).values()
    back = schedule(apps, hosts, during.placements)
    assert back.placements == during.placements
    assert back.moved == () and back.unplaced == ()


def test_a_host_gone_from_the_site_counts_as_dead() -> None:
    current = [Placement("a.web.0", "a", "web", 0, "1", "old", 100, 64 * MI)]
    result = schedule([app("a", svc("web"))], [host("h1")], current)
    assert where(result) == {"a.web.0": "h1"} and result.moved == ("a.web.0",)


def test_unplaced_instance_of_a_dead_host_says_so() -> None:
    current = [Placement("a.web.0", "a", "web", 0, "1", "h1", 100, 64 * MI)]
    result = schedule([app("a", svc("web"))], [host("h1", alive=False)], current)
    assert result.placements == () and result.moved == ()
    assert result.unplaced[0].reason == (
        "was on h1, which is down; no alive host (needs 100m CPU and 64Mi memory)"
    )


def test_removed_apps_services_and_excess_replicas_are_dropped() -> None:
    hosts = [host("h1"), host("h2")]
    first = schedule([app("a", svc("web", 3), svc("db")), app("b", svc("x"))], hosts, [])
    second = schedule([app("a", svc("web", 1))], hosts, first.placements)
    assert set(where(second)) == {"a.web.0"}
    assert where(second)["a.web.0"] == where(first)["a.web.0"]


def test_new_instances_get_the_spec_version_or_the_pinned_one() -> None:
    hosts = [host("h1")]
    current = [Placement("a.web.0", "a", "web", 0, "1", "h1", 100, 64 * MI)]
    apps = [app("a", svc("web", 3), version="2")]
    result = schedule(apps, hosts, current)
    assert [p.version for p in result.placements] == ["1", "2", "2"]
    pinned = schedule(apps, hosts, current, new_versions={"a": "1"})
    assert [p.version for p in pinned.placements] == ["1", "1", "1"]


def test_a_shrunken_host_sheds_what_no_longer_fits() -> None:
    apps = [app("a", svc("web", 2, memory=400 * MI))]
    first = schedule(apps, [host("h1"), host("h2", memory=100 * MI)], [])
    assert where(first) == {"a.web.0": "h1", "a.web.1": "h1"}
    hosts = [host("h1", memory=500 * MI), host("h2")]
    second = schedule(apps, hosts, first.placements)
    assert where(second) == {"a.web.0": "h1", "a.web.1": "h2"}
    assert second.moved == ("a.web.1",)


def test_a_host_losing_a_label_sheds_constrained_instances() -> None:
    apps = [app("a", svc("db", constraints=(Constraint("disk", "in", ("ssd",)),)))]
    first = schedule(apps, [host("h1", disk="ssd"), host("h2")], [])
    second = schedule(apps, [host("h1"), host("h2", disk="ssd")], first.placements)
    assert where(second) == {"a.db.0": "h2"} and second.moved == ("a.db.0",)


def test_duplicate_placements_keep_the_live_copy() -> None:
    current = [
        Placement("a.web.0", "a", "web", 0, "1", "h1", 100, 64 * MI),
        Placement("a.web.0", "a", "web", 0, "1", "h2", 100, 64 * MI),
    ]
    result = schedule([app("a", svc("web"))], [host("h1", alive=False), host("h2")], current)
    assert result.placements == (current[1],) and result.moved == ()


def test_inconsistent_placement_records_are_replaced() -> None:
    current = [Placement("a.web.0", "a", "db", 0, "1", "h1", 100, 64 * MI)]
    result = schedule([app("a", svc("web"))], [host("h1")], current)
    assert result.placements[0].service == "web"


def test_the_result_does_not_depend_on_input_order() -> None:
    apps = [
        app("a", svc("web", 4, anti_affinity=True), svc("agent", None)),
        app("b", svc("db", 3, memory=300 * MI)),
    ]
    hosts = [host(f"h{i}", zone="a" if i % 2 else "b") for i in range(5)]
    first = schedule(apps, hosts, [])
    hosts[2] = replace(hosts[2], alive=False)
    expected = schedule(apps, hosts, first.placements)
    rng = random.Random(7)
    for _ in range(20):
        again = schedule(
            rng.sample(apps, len(apps)),
            rng.sample(hosts, len(hosts)),
            rng.sample(first.placements, len(first.placements)),
        )
        assert again == expected


def test_duplicate_names_are_a_programming_error() -> None:
    with pytest.raises(ValueError, match="two apps are named 'a'"):
        schedule([app("a", svc("x")), app("a", svc("y"))], [], [])
    with pytest.raises(ValueError, match="two hosts are named 'h1'"):
        schedule([], [host("h1"), host("h1")], [])


def test_zero_replicas_and_no_hosts() -> None:
    assert schedule([app("a", svc("web", 0))], [host("h1")], []).placements == ()
    result = schedule([app("a", svc("web", 1))], [], [])
    assert result.unplaced[0].reason == "no alive host (needs 100m CPU and 64Mi memory)"


def test_a_host_short_of_capacity_sheds_its_lowest_priority_first() -> None:
    low = replace(svc("batch", memory=200 * MI), priority=-5)
    high = replace(svc("pos", memory=200 * MI), priority=10)
    normal = svc("web", memory=200 * MI)
    apps = [app("a", low, normal, high)]
    first = schedule(apps, [host("h1"), host("h2", memory=100 * MI)], [])
    assert set(where(first).values()) == {"h1"}
    # h1 now advertises one byte less than what runs on it (a host under pressure).
    hosts = [host("h1", memory=600 * MI - 1), host("h2")]
    second = schedule(apps, hosts, first.placements)
    assert second.moved == ("a.batch.0",)
    assert where(second) == {"a.batch.0": "h2", "a.web.0": "h1", "a.pos.0": "h1"}
    third = schedule(apps, [host("h1", memory=400 * MI - 1), host("h2")], second.placements)
    assert third.moved == ("a.web.0",) and where(third)["a.pos.0"] == "h1"
