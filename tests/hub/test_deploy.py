"""Deploy through the API; sites fetch and verify the deltas with the real protocol."""

from __future__ import annotations

import aiohttp

from central_hub import Hub
from meshorch.fleet.delta import parse
from tests.hub.conftest import Clock, MakeSite, admin_token
from tests.hub.helpers import Operator, healthy, spec_text, until, wait_for


def ops_for(site_id: str, envelopes: list[bytes]) -> list[dict[str, object]]:
    found = []
    for raw in envelopes:
        delta, _, _ = parse(raw)
        if delta.target.includes(site_id):
            found.extend(dict(op) for op in delta.ops)
    return found


async def test_deploy_targets_exactly_the_matching_sites(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    eu1 = await make_site("shop-1", region="eu")
    eu2 = await make_site("shop-2", region="eu")
    us = await make_site("shop-3", region="us")
    dep = await admin.ok(
        "POST",
        "/v1/apps",
        {"spec": spec_text(), "placement": {"match": {"region": "eu"}}},
        202,
    )
    assert dep["state"] == "running" and dep["waves"] == [["shop-1", "shop-2"]]
    assert dep["progress"]["shop-1"]["state"] == "updating"
    for site in (eu1, eu2, us):
        result = await site.sync()  # verify_batch against the root key
        assert [d.version for d in result.accepted] == [1]
    again = await eu1.sync()
    _, envelopes = await us.fetch(after=0)
    parsed, _, sigs = parse(envelopes[0])
    assert parsed.target.sites == frozenset({"shop-1", "shop-2"})
    assert [key for key, _ in sigs] == [hub.root_key]
    assert ops_for("shop-3", envelopes) == []
    (op,) = ops_for("shop-1", envelopes)
    assert op["op"] == "app.put" and op["spec"]["name"] == "web"  # type: ignore[index]
    assert again.accepted == []  # nothing new on a second sync


async def test_waves_advance_on_healthy_reports_and_succeed(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    sites = [await make_site(f"s{i}", tier="edge") for i in range(3)]
    dep = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 2}}, 202
    )
    assert dep["waves"] == [["s0", "s1"], ["s2"]]
    heads = []
    for site in sites[:2]:
        await site.sync()
        status, answer = await site.report({"web": healthy("1.0")})
        assert status == 200
        heads.append(answer["head"])
    # The first wave's last healthy report may advance the rollout (delta 2, for s2)
    # before its own answer is made.
    assert heads[0] == 1 and heads[1] in (1, 2), heads
    dep = await wait_for(admin, dep["id"], lambda d: d["wave"] == 1)
    assert dep["progress"]["s2"]["state"] == "updating"
    result = await sites[2].sync()
    delta = result.accepted[-1]
    assert delta.target.sites == frozenset({"s2"}) and delta.ops[0]["op"] == "app.put"
    await sites[2].report({"web": healthy("1.0")})
    dep = await wait_for(admin, dep["id"], lambda d: d["state"] != "running")
    assert dep["state"] == "succeeded"
    assert dep["deltas"] == [1, 2]
    app = await admin.ok("GET", "/v1/apps/web")
    assert app["sites"]["s2"] == {"version": "1.0", "state": "healthy", "message": ""}


async def test_a_failed_site_stops_the_rollout(admin: Operator, make_site: MakeSite) -> None:
    a = await make_site("a")
    await make_site("b")
    dep = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 1}}, 202
    )
    await a.sync()
    failed = {"version": "1.0", "desired": 1, "ready": 0, "state": "failed", "message": "oom"}
    await a.report({"web": failed})
    dep = await wait_for(admin, dep["id"], lambda d: d["state"] != "running")
    assert dep["state"] == "failed"
    assert dep["reason"] == "site a failed: oom"
    assert dep["deltas"] == [1]  # site b never got the app


async def test_redeploy_is_idempotent_and_versions_are_immutable(
    admin: Operator, make_site: MakeSite
) -> None:
    await make_site("a")
    first = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    again = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 200)
    assert again["id"] == first["id"]
    status, answer = await admin.call("POST", "/v1/apps", {"spec": spec_text(port=9090)})
    assert status == 409 and answer["error"]["code"] == "version_exists"
    deltas = await admin.ok("GET", "/v1/deltas")
    assert deltas["head"] == 1


async def test_a_new_version_supersedes_and_unmatched_sites_get_a_delete(
    admin: Operator, make_site: MakeSite
) -> None:
    a = await make_site("a", region="eu")
    await make_site("b", region="us")
    first = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    second = await admin.ok(
        "POST",
        "/v1/apps?confirm=1",  # it stops at b: the deletion interlock's confirmation
        {"spec": spec_text(version="2.0"), "placement": {"match": {"region": "eu"}}},
        202,
    )
    old = await admin.ok("GET", f"/v1/deployments/{first['id']}")
    assert old["state"] == "superseded" and second["id"] in old["reason"]
    deltas = (await admin.ok("GET", "/v1/deltas"))["deltas"]
    assert [d["target"] for d in deltas] == [
        {"sites": ["a", "b"]},
        {"sites": ["a"]},
        {"sites": ["b"]},
    ]
    assert deltas[2]["ops"] == [{"op": "app.delete", "name": "web", "confirmed": 1}]
    result = await a.sync()
    assert [d.version for d in result.accepted] == [1, 2, 3]


async def test_delete_app_sends_app_delete_to_the_sites_that_have_it(
    admin: Operator, make_site: MakeSite
) -> None:
    await make_site("a")
    await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    answer = await admin.ok("DELETE", "/v1/apps/web?confirm=1")
    assert answer == {"deleted": "web", "delta": 2, "sites": ["a"]}
    status, _ = await admin.call("GET", "/v1/apps/web")
    assert status == 404


async def test_wave_timeout_and_heartbeat_follow_the_injected_clock(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    admin = Operator(session, clocked_hub.url, admin_token(clocked_hub))
    await admin.ok("POST", "/v1/sites", {"id": "a", "public_key": "ab" * 32}, 201)
    await admin.ok("POST", "/v1/sites", {"id": "b", "public_key": "cd" * 32}, 201)
    dep = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    assert (await admin.ok("GET", f"/v1/deployments/{dep['id']}"))["state"] == "running"
    clock.advance(61)  # wave_timeout_s is 60
    dep = await wait_for(admin, dep["id"], lambda d: d["state"] != "running")
    assert dep["state"] == "failed" and dep["reason"] == "timeout waiting for sites a, b"
    assert clocked_hub.head.version == 1
    clock.advance(3600)  # heartbeat_s
    await until(lambda: clocked_hub.head.version == 2)
    (heartbeat,) = (await admin.ok("GET", "/v1/deltas?after=1"))["deltas"]
    assert heartbeat["ops"] == [] and heartbeat["target"] == {"all": True}
    assert heartbeat["issued_at"] >= clock() - 5
