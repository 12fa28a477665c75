"""Tenant quotas in the pure scheduler, the quota records and their validation."""

from __future__ import annotations

import random
from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from meshorch.apps.quotas import (
    Quota,
    Usage,
    decode_quota,
    op_writes,
    over_quota,
    parse_quota,
    quota_key,
    quota_writes,
    spec_usage,
)
from meshorch.apps.scheduler import HostInfo, Placement, ScheduleResult, schedule
from meshorch.apps.spec import AppSpec
from meshorch.errors import RemoteInputError
from meshorch.state.tables import APPS_TABLE
from raft import Delete, Put
from tests.apps.strategies import app_lists, host_lists
from tests.apps.test_scheduler import MI, app, host, svc, where

ACME = {"a": "acme", "b": "acme"}  # apps a and b are acme's; c is the default tenant's


def run(
    apps: list[AppSpec],
    hosts: list[HostInfo],
    quotas: dict[str, Quota],
    current: list[Placement] | None = None,
    tenants: dict[str, str] | None = None,
) -> ScheduleResult:
    return schedule(apps, hosts, current or [], tenants=ACME if tenants is None else tenants,
                    quotas=quotas)  # fmt: skip


def reasons(result: ScheduleResult) -> dict[str, str]:
    return dict(result.unplaced)


HOSTS = [host("h1"), host("h2"), host("h3")]


# -- the rule ------------------------------------------------------------------------------


def test_cpu_quota_refuses_the_instance_that_would_exceed_it() -> None:
    result = run([app("a", svc("web", 3, cpu=100))], HOSTS, {"acme": Quota(cpu_millis=250)})
    assert sorted(where(result)) == ["a.web.0", "a.web.1"]
    assert reasons(result) == {"a.web.2": "tenant acme over its quota: cpu 300m of 250m"}
    assert result.over_quota == ("a.web.2",)


def test_memory_quota() -> None:
    result = run(
        [app("a", svc("web", 2, memory=48 * MI))], HOSTS, {"acme": Quota(memory_bytes=64 * MI)}
    )
    assert list(where(result)) == ["a.web.0"]
    assert reasons(result) == {"a.web.1": "tenant acme over its quota: memory 96Mi of 64Mi"}


def test_instance_quota_and_every_resource_over_is_named() -> None:
    result = run([app("a", svc("web", 5))], [host(f"h{i}") for i in range(5)],
                 {"acme": Quota(instances=4)})  # fmt: skip
    assert reasons(result) == {"a.web.4": "tenant acme over its quota: instances 5 of 4"}
    both = run([app("a", svc("web", 1, cpu=500, memory=64 * MI))], HOSTS,
               {"acme": Quota(cpu_millis=100, memory_bytes=32 * MI, instances=0)})  # fmt: skip
    assert reasons(both) == {
        "a.web.0": "tenant acme over its quota: cpu 500m of 100m, memory 64Mi of 32Mi, "
        "instances 1 of 0"
    }


def test_quota_is_per_tenant_and_spans_apps() -> None:
    apps = [app("a", svc("web", 2)), app("b", svc("web", 2)), app("c", svc("web", 3))]
    result = run(apps, HOSTS, {"acme": Quota(instances=3), "other": Quota(instances=0)})
    # acme: a.web.0, a.web.1, b.web.0 in app/service/index order; c (default) is unlimited.
    assert sorted(where(result)) == [
        "a.web.0",
        "a.web.1",
        "b.web.0",
        "c.web.0",
        "c.web.1",
        "c.web.2",
    ]
    assert list(reasons(result)) == ["b.web.1"]


def test_a_smaller_instance_still_fits_after_a_larger_one_is_refused() -> None:
    apps = [app("a", svc("big", 2, memory=60 * MI)), app("b", svc("small", 1, memory=30 * MI))]
    result = run(apps, HOSTS, {"acme": Quota(memory_bytes=100 * MI)})
    assert sorted(where(result)) == ["a.big.0", "b.small.0"]
    assert result.over_quota == ("a.big.1",)


def test_kept_placements_count_first() -> None:
    # b runs 2 instances; a (sorted first) is new: it gets what is left, not b's share.
    b = app("b", svc("web", 2))
    first = run([b], HOSTS, {})
    result = run([app("a", svc("web", 2)), b], HOSTS, {"acme": Quota(instances=3)},
                 list(first.placements))  # fmt: skip
    assert set(first.placements) <= set(result.placements)
    assert sorted(where(result)) == ["a.web.0", "b.web.0", "b.web.1"]
    assert result.over_quota == ("a.web.1",)


def test_a_lowered_quota_unplaces_kept_instances_in_order() -> None:
    first = run([app("a", svc("web", 3))], HOSTS, {})
    result = run([app("a", svc("web", 3))], HOSTS, {"acme": Quota(instances=1)},
                 list(first.placements))  # fmt: skip
    assert list(where(result)) == ["a.web.0"]
    assert result.over_quota == ("a.web.1", "a.web.2") and result.moved == ()
    assert reasons(result)["a.web.2"] == "tenant acme over its quota: instances 2 of 1"


def test_kept_placements_count_their_recorded_requests() -> None:
    # Placed when the app asked 10m; the spec now asks more: kept ones keep their figures.
    small = run([app("a", svc("web", 2, cpu=10))], HOSTS, {})
    result = run([app("a", svc("web", 3, cpu=200))], HOSTS, {"acme": Quota(cpu_millis=220)},
                 list(small.placements))  # fmt: skip
    assert sorted(where(result)) == ["a.web.0", "a.web.1", "a.web.2"]


def test_per_host_instances_count_and_are_placed_first() -> None:
    apps = [app("a", svc("agent", None), svc("web", 2))]
    result = run(apps, HOSTS, {"acme": Quota(instances=4)})
    assert sorted(where(result)) == ["a.agent.h1", "a.agent.h2", "a.agent.h3", "a.web.0"]
    assert result.over_quota == ("a.web.1",)
    tight = run(apps, HOSTS, {"acme": Quota(instances=2)})
    assert sorted(where(tight)) == ["a.agent.h1", "a.agent.h2"]
    assert tight.over_quota == ("a.agent.h3", "a.web.0", "a.web.1")


def test_a_displaced_instance_over_quota_says_both() -> None:
    first = run([app("a", svc("web", 2))], HOSTS, {})
    lost = next(p for p in first.placements if p.instance_id == "a.web.1")
    hosts = [h if h.host_id != lost.host_id else replace(h, alive=False) for h in HOSTS]
    # While it was down, acme's quota was lowered to one instance.
    result = run([app("a", svc("web", 2))], hosts, {"acme": Quota(instances=1)},
                 list(first.placements))  # fmt: skip
    assert reasons(result)["a.web.1"] == (
        f"was on {lost.host_id}, which is down; tenant acme over its quota: instances 2 of 1"
    )


def test_no_quota_and_no_tenants_changes_nothing() -> None:
    apps = [app("a", svc("web", 3)), app("c", svc("db", 2, memory=512 * MI))]
    assert schedule(apps, HOSTS, []) == run(apps, HOSTS, {}, tenants={})
    # A quota on a tenant without apps changes nothing either.
    assert schedule(apps, HOSTS, []) == run(apps, HOSTS, {"nobody": Quota(0, 0, 0)}, tenants={})


def test_deterministic_whatever_the_input_order() -> None:
    apps = [app("a", svc("web", 3), svc("agent", None)), app("b", svc("db", 2, memory=100 * MI)),
            app("c", svc("web", 2))]  # fmt: skip
    quotas = {"acme": Quota(cpu_millis=450, memory_bytes=300 * MI, instances=6)}
    hosts = [host(f"h{i}") for i in range(4)]
    expected = run(apps, hosts, quotas)
    shuffled = random.Random(7)
    for _ in range(20):
        apps_, hosts_ = apps[:], hosts[:]
        shuffled.shuffle(apps_)
        shuffled.shuffle(hosts_)
        assert run(apps_, hosts_, quotas) == expected
    again = run(apps, hosts, quotas, list(expected.placements))
    assert again.placements == expected.placements and again.unplaced == expected.unplaced


# -- property: a tenant's placements never exceed its quota ------------------------------


quotas_st = st.builds(
    Quota,
    st.none() | st.integers(0, 20).map(lambda n: n * 100),
    st.none() | st.integers(0, 24).map(lambda n: n * 64 * MI),
    st.none() | st.integers(0, 8),
)


def _check_quotas(
    apps: list[AppSpec], tenants: dict[str, str], quotas: dict[str, Quota], result: ScheduleResult
) -> None:
    used: dict[str, Usage] = {}
    for p in result.placements:
        tenant = tenants.get(p.app, "default")
        used[tenant] = used.get(tenant, Usage()).plus(p.cpu_millis, p.memory_bytes)
    for tenant, usage in used.items():
        assert over_quota(tenant, quotas.get(tenant), usage) is None, (tenant, usage)
    assert set(result.over_quota) <= {u.instance_id for u in result.unplaced}
    for iid in result.over_quota:
        assert "over its quota" in dict(result.unplaced)[iid]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    app_lists(),
    host_lists(),
    st.dictionaries(st.sampled_from("abc"), st.sampled_from(["acme", "globex"])),
    st.dictionaries(st.sampled_from(["acme", "globex", "default"]), quotas_st),
    st.dictionaries(st.sampled_from(["acme", "globex", "default"]), quotas_st),
    st.randoms(use_true_random=False),
)
def test_the_sum_never_exceeds_the_quota(
    apps: list[AppSpec],
    hosts: list[HostInfo],
    tenants: dict[str, str],
    quotas: dict[str, Quota],
    lowered: dict[str, Quota],
    rnd: random.Random,
) -> None:
    result = schedule(apps, hosts, [], tenants=tenants, quotas=quotas)
    _check_quotas(apps, tenants, quotas, result)
    again = schedule(apps, hosts, result.placements, tenants=tenants, quotas=quotas)
    assert again.placements == result.placements and again.moved == ()
    # Quotas change and hosts die: still never over, and kept placements stay put
    # unless the quota or the host refuses them.
    hosts2 = [replace(h, alive=h.alive and rnd.random() > 0.3) for h in hosts]
    later = schedule(apps, hosts2, result.placements, tenants=tenants, quotas=lowered)
    _check_quotas(apps, tenants, lowered, later)
    kept_or_gone = {p.instance_id for p in later.placements} | {
        u.instance_id for u in later.unplaced
    }
    assert {p.instance_id for p in result.placements} <= kept_or_gone | _unwanted(apps, hosts2)


def _unwanted(apps: list[AppSpec], hosts: list[HostInfo]) -> set[str]:
    """Per-host instances of hosts that no longer qualify (dropped, not unplaced)."""
    return {
        f"{a.name}.{s.name}.{h.host_id}"
        for a in apps
        for s in a.services
        if s.replicas is None
        for h in hosts
        if not (h.alive and s.allows_host(h.labels))
    }


# -- records and validation ----------------------------------------------------------------


def test_parse_quota_accepts_integers_and_nulls() -> None:
    assert parse_quota({"cpu_millis": 500, "memory_bytes": None}) == Quota(500, None, None)
    assert parse_quota({}) == Quota() and Quota().unlimited
    assert parse_quota({"instances": 0}).instances == 0


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ({"cpu_millis": -1}, "cpu_millis: -1 is not between 0"),
        ({"cpu_millis": 1.5}, "cpu_millis: an integer or null"),
        ({"memory_bytes": "64Mi"}, "memory_bytes: an integer or null"),
        ({"instances": True}, "instances: an integer or null"),
        ({"instances": 10**7}, "instances: 10000000 is not between 0 and 1000000"),
        ({"memory": 1}, "unknown fields: memory"),
    ],
)
def test_parse_quota_refuses_bad_input(body: dict[str, object], problem: str) -> None:
    with pytest.raises(RemoteInputError) as caught:
        parse_quota(body)
    assert caught.value.code == "bad_quota" and problem in str(caught.value)


def test_records_round_trip_and_unlimited_deletes() -> None:
    quota = Quota(1000, 256 * MI, None)
    (put,) = quota_writes("acme", quota)
    assert isinstance(put, Put) and put.key == quota_key("acme") == b"quota/acme"
    assert decode_quota(put.value) == ("acme", quota)
    assert quota_writes("acme", Quota()) == [Delete(APPS_TABLE, b"quota/acme")]


def test_the_op_checks_the_tenant_and_every_field() -> None:
    op = {"op": "tenant.quota", "tenant": "acme", "cpu_millis": None, "memory_bytes": 1,
          "instances": None}  # fmt: skip
    (put,) = op_writes(op)
    assert isinstance(put, Put) and decode_quota(put.value) == ("acme", Quota(None, 1, None))
    for tenant in (None, "", "Acme", "-x", "a" * 64, 7):
        with pytest.raises(RemoteInputError, match="not a tenant"):
            op_writes({**op, "tenant": tenant})
    with pytest.raises(RemoteInputError, match="unknown fields: cpu"):
        op_writes({**op, "cpu": 1})


def test_spec_usage_counts_replicas_and_qualifying_hosts() -> None:
    spec = app("a", svc("web", 2, cpu=100, memory=10 * MI), svc("agent", None, cpu=5, memory=MI))
    assert spec_usage(spec, [{}, {}, {}]) == Usage(215, 23 * MI, 5)
