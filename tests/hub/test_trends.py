"""Site trends: the pure ring (``central_hub.trends``) and ``GET /v1/sites/{id}/trends``
on a real hub fed by signed site reports, with its refusals."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from central_hub import Hub
from central_hub.fleetview import parse_report
from central_hub.trends import TrendBook, sample_of
from meshorch.apps import resources
from meshorch.apps.scheduler import HostInfo
from meshorch.fleet.apply import SiteFacts, build_report
from meshorch.fleet.delta import TrustState
from tests.hub.conftest import Clock, MakeSite
from tests.hub.helpers import Operator, Site


def host(host_id: str, *, alive: bool = True, load1: float = 1.0, cores: int = 4,
         memory: float = 50.0, disk: float = 30.0, restarts: tuple[int, ...] = (),
         resources: bool = True) -> dict[str, Any]:  # fmt: skip
    found: dict[str, Any] = {
        "host_id": host_id,
        "alive": alive,
        "instances": [
            {"app": "web", "instance_id": f"{host_id}-{n}", "service": "web", "version": "1",
             "state": "running", "ready": True, "restarts": count}
            for n, count in enumerate(restarts)
        ],
    }  # fmt: skip
    if resources:
        found["resources"] = {"load1": load1, "cpu_count": cores, "memory_used_pct": memory,
                              "disk_used_pct": disk, "at": 1.0}  # fmt: skip
    return found


def test_a_sample_is_the_busiest_live_host_and_the_sum_of_restarts() -> None:
    report = {
        "hosts": [
            host("h1", load1=2.0, cores=4, memory=40.0, disk=70.0, restarts=(1, 2)),
            host("h2", load1=3.0, cores=2, memory=80.0, disk=20.0, restarts=(4,)),
            # A dead host's last numbers are old: not the site's use now. Its instances'
            # restarts still count (they happened).
            host("h3", alive=False, load1=99.0, memory=99.0, disk=99.0, restarts=(5,)),
        ]
    }
    s = sample_of(report, 10.0)
    assert (s.at, s.cpu_pct, s.memory_pct, s.disk_pct, s.restarts) == (10.0, 150.0, 80.0, 70.0, 12)
    # An agent that reports no resources, or no cpu_count (older agents): null, not zero.
    bare = sample_of({"hosts": [host("h1", resources=False)]}, 1.0)
    assert (bare.cpu_pct, bare.memory_pct, bare.disk_pct, bare.restarts) == (None, None, None, 0)
    old = host("h1")
    del old["resources"]["cpu_count"]
    assert sample_of({"hosts": [old]}, 1.0).cpu_pct is None
    assert sample_of({"hosts": []}, 1.0).memory_pct is None


def test_one_sample_per_period_in_a_fixed_ring() -> None:
    book = TrendBook(every_s=30.0, size=4)
    report = {"hosts": [host("h1", memory=10.0)]}
    assert book.record("s1", report, 100.0)
    for t in (101.0, 110.0, 129.9):  # reports every few seconds: one sample per period
        assert not book.record("s1", report, t)
    for n in range(1, 7):
        report = {"hosts": [host("h1", memory=10.0 + n)]}
        assert book.record("s1", report, 100.0 + 30.0 * n)
    samples = book.samples("s1")
    assert [s.at for s in samples] == [190.0, 220.0, 250.0, 280.0]  # the last 4, oldest first
    assert [s.memory_pct for s in samples] == [13.0, 14.0, 15.0, 16.0]
    assert [s.at for s in book.samples("s1", since=250.0)] == [250.0, 280.0]
    # A clock that went back does not silence the site for the gap.
    assert book.record("s1", report, 50.0)
    assert book.samples("s2") == []
    book.forget("s1")
    assert book.samples("s1") == [] and len(book) == 0
    with pytest.raises(ValueError):
        TrendBook(every_s=0)


def test_memory_per_site_is_fixed_whatever_the_report() -> None:
    book = TrendBook()
    small = {"hosts": [host("h1")]}
    big = {"hosts": [host(f"h{n}", restarts=tuple(range(50))) for n in range(200)]}
    book.record("a", small, 0.0)
    book.record("b", big, 0.0)
    ring_a, ring_b = book._rings["a"], book._rings["b"]
    size = sum(sys.getsizeof(x) for x in (ring_a._times, ring_a._values))
    assert size == sum(sys.getsizeof(x) for x in (ring_b._times, ring_b._values))
    for n in range(1, 1000):
        book.record("a", big, 30.0 * n)
    assert sum(sys.getsizeof(x) for x in (ring_a._times, ring_a._values)) == size
    assert size < 3500  # per site, the default hour of samples (docstring: ~3.3 KB)
    assert len(book.samples("a")) == book.size


async def test_trends_route_serves_the_ring_to_fleet_tokens_only(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    hub = clocked_hub
    admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    site.clock = clock
    body = {"id": "shop-1", "labels": {}, "public_key": site.public_key}
    await admin.ok("POST", "/v1/sites", body, 201)
    for memory, restarts in ((40.0, 0), (55.5, 1), (61.0, 3)):
        status, answer = await site.report(
            {}, hosts=[host("h1", load1=1.0, cores=2, memory=memory, restarts=(restarts,))]
        )
        assert status == 200, answer
        status, _ = await site.report({}, hosts=[host("h1", memory=99.0)])  # same period
        assert status == 200
        clock.advance(30.0)
    answer = await admin.ok("GET", "/v1/sites/shop-1/trends")
    assert answer["site"] == "shop-1" and answer["every_s"] == 30.0
    assert answer["window_s"] == 3600.0
    samples = answer["samples"]
    assert [s["memory_pct"] for s in samples] == [40.0, 55.5, 61.0]
    assert [s["restarts"] for s in samples] == [0, 1, 3]
    assert {s["cpu_pct"] for s in samples} == {50.0}
    assert samples[1]["at"] - samples[0]["at"] == pytest.approx(30.0, abs=1.0)

    # Refusals, before any work: no token, a bad one, a tenant's token (even its admin:
    # hosts are the fleet's); a site that is not registered, a malformed id.
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    blue = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    async with session.get(hub.url + "/v1/sites/shop-1/trends") as resp:
        assert resp.status == 401
    status, answer = await admin.call("GET", "/v1/sites/shop-1/trends", token="mht_x_y")
    assert status == 401
    status, answer = await admin.call("GET", "/v1/sites/shop-1/trends", token=blue["token"])
    assert status == 403 and answer["error"]["code"] == "forbidden"
    status, answer = await admin.call("GET", "/v1/sites/nowhere/trends", token=blue["token"])
    assert status == 403  # the same refusal: nothing said about whether the site exists
    status, answer = await admin.call("GET", "/v1/sites/shop-1/trends", token=viewer["token"])
    assert status == 200 and len(answer["samples"]) == 3  # a fleet viewer reads
    status, answer = await admin.call("GET", "/v1/sites/nowhere/trends")
    assert status == 404
    status, answer = await admin.call("GET", "/v1/sites/NOT_AN_ID/trends")
    assert status == 400

    # A deleted site's ring is dropped.
    await admin.ok("DELETE", "/v1/sites/shop-1")
    assert hub.parts.trends.samples("shop-1") == []


async def test_a_site_never_heard_from_has_no_samples(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    await make_site("quiet")
    answer = await admin.ok("GET", "/v1/sites/quiet/trends")
    assert answer["samples"] == []


def test_what_an_agent_reports_gives_a_full_sample(tmp_path: Path) -> None:
    """The agent's real resource sample and report builder, through the hub's report parser:
    cpu_count survives, so the sample has CPU, memory and disk."""
    use = resources.sample(tmp_path, 1000.0).to_json()
    facts = SiteFacts(
        specs=[], placements=[], reports={}, rollouts={},
        hosts=[HostInfo("h1", {}, 1000, 2**30, alive=True, agent_version="1", protocol=2)],
        resources={"h1": use},
    )  # fmt: skip
    report = build_report("s1", 1000.0, TrustState("f", frozenset({"ab" * 32})), [], facts)
    parsed = parse_report(orjson.loads(orjson.dumps(report)), "s1")
    assert parsed["hosts"][0]["resources"]["cpu_count"] == use["cpu_count"]
    s = sample_of(parsed, 1000.0)
    assert s.cpu_pct == pytest.approx(100 * use["load1"] / use["cpu_count"], abs=0.05)
    assert s.memory_pct == use["memory_used_pct"] and s.disk_pct == use["disk_used_pct"]
    # A report from an agent before cpu_count was reported still parses.
    del report["hosts"][0]["resources"]["cpu_count"]
    assert sample_of(parse_report(report, "s1"), 1.0).cpu_pct is None
