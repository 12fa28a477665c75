"""A site's preview of what it will do when it next applies its pending deltas: the pure
fold (``central_hub.pending``), and ``GET /v1/sites/{id}/pending`` on a real hub whose
deltas a site (speaking the real link protocol) has applied in part and reported."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from central_hub import Hub
from central_hub.pending import preview
from meshorch.fleet.delta import ALL_SITES, GENESIS_HASH, Delta, Target
from tests.hub.conftest import Clock, admin_token, hub_config
from tests.hub.helpers import Operator, Site, healthy, spec_text

SHOP = Target(sites=frozenset({"shop-1"}))
OTHER = Target(sites=frozenset({"shop-2"}))


def delta(version: int, ops: list[dict[str, Any]], target: Target = SHOP) -> Delta:
    return Delta("acme", version, GENESIS_HASH, 0.0, 1.0, target, tuple(ops))


def app_put(name: str, version: str, tenant: str = "blue") -> dict[str, Any]:
    return {"op": "app.put", "tenant": tenant, "spec": {"name": name, "version": version}}


REPORT = {
    "applied_version": 10,
    "apps": {"web": {"version": "1.0"}, "old": {"version": "3"}, "same": {"version": "1"}},
    "secrets_state": {"locked_down": False, "secrets": [
        {"tenant": "blue", "name": "db", "version": 1, "state": "ready"}]},
    "hosts": [{"host_id": "h1", "agent_version": "0.9"}, {"host_id": "h2", "agent_version": "1.0"}],
}  # fmt: skip


def test_the_fold_says_what_changes_and_which_deltas_cause_it() -> None:
    pending = [
        delta(11, [app_put("web", "1.5")]),
        delta(12, [app_put("till", "1")], OTHER),  # another site's: not this one's
        delta(13, [app_put("web", "2.0"), {"op": "app.delete", "tenant": "blue", "name": "old"}]),
        delta(14, [app_put("cart", "1"), app_put("same", "1")], ALL_SITES),
        delta(15, [{"op": "secret.put", "tenant": "blue", "name": "db", "version": 2,
                    "sealed": {"shop-1": "x"}},
                   {"op": "secret.put", "tenant": "blue", "name": "api", "version": 1,
                    "sealed": {"shop-1": "x"}}, {"op": "secrets.rotate"}]),
        delta(16, [{"op": "site.lockdown"}]),
        delta(17, [{"op": "agent.upgrade", "version": "1.1", "digest": "ab" * 32, "size": 1}]),
        delta(18, [{"op": "tenant.quota", "tenant": "blue", "cpu_millis": 500}], ALL_SITES),
        delta(19, [{"op": "root.rotate", "new_key": "cd" * 32}], ALL_SITES),
        delta(20, [{"op": "site.decommission"}, {"op": "future.thing"}]),
    ]  # fmt: skip
    got = preview("shop-1", REPORT, 4.0, 30.0, pending)
    assert got["deltas_pending"] == 10 and got["deltas_for_site"] == 9
    assert not got["stale"] and got["report_age_s"] == 4.0
    assert got["apps"] == [
        {"app": "cart", "tenant": "blue", "change": "added", "from": None, "to": "1",
         "versions": [14]},
        {"app": "old", "tenant": "blue", "change": "removed", "from": "3", "to": None,
         "versions": [13]},
        {"app": "same", "tenant": "blue", "change": "unchanged", "from": "1", "to": "1",
         "versions": [14]},
        {"app": "web", "tenant": "blue", "change": "upgraded", "from": "1.0", "to": "2.0",
         "versions": [11, 13]},
    ]  # fmt: skip
    assert got["secrets"] == [
        {"secret": "blue/api", "change": "added", "from": None, "to": 1, "versions": [15]},
        {"secret": "blue/db", "change": "rotated", "from": 1, "to": 2, "versions": [15]},
    ]
    assert got["key_rotations"] == [15]
    assert got["lockdown"] == {"change": "lock down", "from": False, "to": True, "versions": [16]}
    assert got["agent_upgrade"] == {"from": ["0.9", "1.0"], "to": "1.1", "versions": [17]}
    assert got["quotas"] == [{"tenant": "blue", "to": {"cpu_millis": 500}, "versions": [18]}]
    assert got["root_rotations"] == [19] and got["decommission"] == [20]
    assert got["other_ops"] == [{"op": "future.thing", "version": 20}]


def test_no_report_or_an_old_one_is_stale() -> None:
    got = preview("shop-1", None, None, 30.0, [delta(1, [app_put("web", "1")])])
    assert got["stale"] and got["applied_version"] is None
    assert got["apps"][0]["change"] == "added"
    assert preview("shop-1", REPORT, 31.0, 30.0, [])["stale"]
    nothing = preview("shop-1", REPORT, 1.0, 30.0, [])
    assert nothing["apps"] == [] and nothing["lockdown"] is None


def test_lock_then_unlock_and_add_then_remove() -> None:
    pending = [
        delta(11, [{"op": "site.lockdown"}, app_put("tmp", "1")]),
        delta(12, [{"op": "site.unlock"}, {"op": "app.delete", "tenant": "blue", "name": "tmp"}]),
    ]
    got = preview("shop-1", REPORT, 1.0, 30.0, pending)
    assert got["lockdown"]["change"] == "locked down, then unlocked"
    assert got["apps"][0]["change"] == "added and removed"


# -- the route, on a real hub ----------------------------------------------------------------


@pytest.fixture
async def clocked(tmp_path: Path, clock: Clock) -> AsyncIterator[Hub]:
    async with Hub(hub_config(tmp_path / "hub", clock=clock, heartbeat_s=3600.0)) as running:
        yield running


async def test_a_sites_pending_changes_from_its_report_and_the_log(
    clocked: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    hub = clocked
    admin = Operator(session, hub.url, admin_token(hub))
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    body = {"id": "shop-1", "labels": {"shop": "one"}, "public_key": site.public_key}
    await admin.ok("POST", "/v1/sites", body, 201)
    await admin.ok("POST", "/v1/sites", {"id": "shop-2", "labels": {"shop": "two"}}, 201)

    async def deploy(name: str, version: str, shop: str = "one") -> None:
        app = {"spec": spec_text(name, version), "placement": {"match": {"shop": shop}}}
        await admin.ok("POST", "/v1/apps", app, 202)

    await deploy("web", "1.0")
    await deploy("old", "3")
    await site.sync()
    status, _ = await site.report({"web": healthy("1.0"), "old": healthy("3")})
    assert status == 200
    applied = site.trust.version
    # Meanwhile (the shop is offline): what it has not applied yet.
    await deploy("web", "2.0")
    await deploy("till", "1", shop="two")
    await admin.ok("DELETE", "/v1/apps/old?confirm=1")
    await admin.ok("POST", "/v1/sites/shop-1/lockdown", {})
    await admin.ok("POST", "/v1/fleet/rotate")
    head = hub.head.version

    got = await admin.ok("GET", "/v1/sites/shop-1/pending")
    assert got["applied_version"] == applied and got["head"] == head
    assert got["complete"] and got["scanned_through"] == head and not got["snapshot_first"]
    assert got["deltas_pending"] == head - applied == 5 and got["deltas_for_site"] == 4
    changes = {a["app"]: (a["change"], a["from"], a["to"]) for a in got["apps"]}
    assert changes == {"web": ("upgraded", "1.0", "2.0"), "old": ("removed", "3", None)}
    web = next(a for a in got["apps"] if a["app"] == "web")
    assert web["versions"] == [applied + 1] and web["tenant"] == "default"
    assert got["lockdown"]["change"] == "lock down" and got["lockdown"]["versions"] == [head - 1]
    assert got["root_rotations"] == [head]
    assert not got["stale"] and got["report_age_s"] < 5
    # The command line says it for people.
    env = {**os.environ, "MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": admin_token(hub)}
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", "site", "diff", "shop-1", env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode == 0, err
    lines = out.decode().splitlines()
    assert (
        lines[0].startswith(
            f"site shop-1: applied {applied}, head {head}: 5 delta(s) pending, 4 for this site; "
            "last report "
        )
        and "STALE" not in lines[0]
    )
    assert lines[1:] == [
        f"  app old (default): removed (was 3)  [delta {applied + 3}]",
        f"  app web (default): upgraded 1.0 -> 2.0  [delta {applied + 1}]",
        f"  lock-down: lock down  [delta {head - 1}]",
        f"  fleet root key rotated  [delta {head}]",
    ]
    clock.advance(120)  # no report since: the preview says how old it is
    got = await admin.ok("GET", "/v1/sites/shop-1/pending")
    assert got["stale"] and got["report_age_s"] >= 120
    # Once the site applied everything, nothing is pending.
    site.clock = clock
    await site.sync()
    await site.report({"web": healthy("2.0")})
    got = await admin.ok("GET", "/v1/sites/shop-1/pending")
    assert got["deltas_pending"] == 0 and got["apps"] == [] and got["lockdown"] is None


async def test_who_may_see_a_sites_pending_changes(
    clocked: Hub, session: aiohttp.ClientSession
) -> None:
    hub = clocked
    admin = Operator(session, hub.url, admin_token(hub))
    await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    blue = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    async with session.get(hub.url + "/v1/sites/shop-1/pending") as response:
        assert response.status == 401
    status, answer = await admin.call("GET", "/v1/sites/shop-1/pending", token=blue["token"])
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    status, answer = await admin.call("GET", "/v1/sites/shop-1/pending", token=viewer["token"])
    assert status == 200 and answer["stale"] and answer["applied_version"] is None
    status, answer = await admin.call("GET", "/v1/sites/nope/pending")
    assert (status, answer["error"]["code"]) == (404, "not_found")
    status, answer = await admin.call("GET", "/v1/sites/Bad_Id/pending")
    assert (status, answer["error"]["code"]) == (400, "bad_site_id")


# -- holding a site ----------------------------------------------------------------------------


async def test_a_held_site_gets_no_delta_until_released(
    clocked: Hub, session: aiohttp.ClientSession
) -> None:
    hub = clocked
    admin = Operator(session, hub.url, admin_token(hub))
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    body = {"id": "shop-1", "labels": {"shop": "one"}, "public_key": site.public_key}
    await admin.ok("POST", "/v1/sites", body, 201)
    app = {"spec": spec_text("web", "1.0"), "placement": {"match": {"shop": "one"}}}
    await admin.ok("POST", "/v1/apps", app, 202)
    await site.sync()
    applied = site.trust.version
    # A poll open when the hold comes is not answered with the deltas issued after it.
    waiting = asyncio.ensure_future(site.request("GET", f"/v1/link/deltas?after={applied}&wait=5"))
    await asyncio.sleep(0.2)
    held = await admin.ok("POST", "/v1/sites/shop-1/hold")
    assert held["site"] == "shop-1" and held["held"]["by"] == admin.token.split("_")[1]
    assert (await admin.ok("POST", "/v1/sites/shop-1/hold"))["held"] == held["held"]  # idempotent
    await admin.ok("POST", "/v1/apps", {**app, "spec": spec_text("web", "2.0")}, 202)
    await admin.ok("POST", "/v1/sites/shop-1/lockdown", {})
    assert hub.head.version == applied + 2  # the deltas accumulate
    async with asyncio.timeout(3):
        status, answer = await waiting
    assert status == 200 and answer == {"head": applied, "deltas": [], "held": True}

    # Its poll waits, then answers nothing (it does not spin), and says why.
    started = asyncio.get_running_loop().time()
    status, answer = await site.request("GET", f"/v1/link/deltas?after={applied}&wait=1")
    assert status == 200 and answer == {"head": applied, "deltas": [], "held": True}
    assert asyncio.get_running_loop().time() - started >= 0.9
    # Its report is answered with its own version: it does not take the poll for lost.
    status, answer = await site.report({"web": healthy("1.0")})
    assert answer == {"head": applied, "site_head": applied, "held": True}
    pending = await admin.ok("GET", "/v1/sites/shop-1/pending")
    assert pending["held"] == held["held"] and pending["deltas_for_site"] == 2

    # Released: a poll held open is answered at once, the next one gets the deltas.
    poll = asyncio.ensure_future(site.request("GET", f"/v1/link/deltas?after={applied}&wait=20"))
    await asyncio.sleep(0.2)
    released = await admin.ok("POST", "/v1/sites/shop-1/release")
    assert released == {"site": "shop-1", "held": None}
    async with asyncio.timeout(3):
        status, answer = await poll
    result = await site.sync()
    assert [d.version for d in result.accepted] == [applied + 1, applied + 2]
    status, answer = await site.report({"web": healthy("2.0")})
    assert "held" not in answer and answer["head"] == applied + 2
    assert (await admin.ok("GET", "/v1/sites/shop-1/pending"))["held"] is None
    audit = (await admin.ok("GET", "/v1/audit?limit=500"))["entries"]
    details = [e["detail"] for e in audit if e["object"] == {"type": "site", "id": "shop-1"}]
    assert [d for d in details if d in ("held", "released")] == ["held", "released"]


async def test_who_may_hold_a_site(clocked: Hub, session: aiohttp.ClientSession) -> None:
    hub = clocked
    admin = Operator(session, hub.url, admin_token(hub))
    await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    blue = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    for path in ("/v1/sites/shop-1/hold", "/v1/sites/shop-1/release"):
        async with session.post(hub.url + path) as response:
            assert response.status == 401
        for token in (blue["token"], viewer["token"]):
            status, answer = await admin.call("POST", path, token=token)
            assert (status, answer["error"]["code"]) == (403, "forbidden"), path
    assert (await admin.ok("GET", "/v1/sites/shop-1/pending"))["held"] is None  # none took
    status, answer = await admin.call("POST", "/v1/sites/nope/hold")
    assert (status, answer["error"]["code"]) == (404, "not_found")
    # The command line.
    env = {**os.environ, "MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": admin_token(hub)}
    for action, said in (("hold", "is held since"), ("release", "is not held")):
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshorch", "site", action, "shop-1", env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await proc.communicate()
        assert proc.returncode == 0 and said in out.decode(), err
