"""The fleet view through the API, and changes to sites."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import aiohttp

from central_hub import Hub
from tests.hub.conftest import Clock, MakeSite, admin_token
from tests.hub.helpers import Operator, Site, healthy, spec_text, wait_for


async def test_site_list_shows_health_from_reports(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    admin = Operator(session, clocked_hub.url, admin_token(clocked_hub))
    sites = {}
    for name, region in (("ok", "eu"), ("sick", "eu"), ("silent", "us")):
        site = Site(session, clocked_hub.url, name, clocked_hub.fleet, clocked_hub.root_key)
        site.clock = clock
        body = {"id": name, "labels": {"region": region}, "public_key": site.public_key}
        await admin.ok("POST", "/v1/sites", body, 201)
        sites[name] = site
    await sites["ok"].report({"web": healthy("1")})
    hosts = [{"host_id": "h1", "alive": False, "instances": []}]
    await sites["sick"].report({}, hosts=hosts)
    listing = (await admin.ok("GET", "/v1/sites"))["sites"]
    by_id = {s["id"]: s for s in listing}
    assert set(by_id["ok"]) >= {"id", "labels", "applied_version", "head", "last_seen", "health"}
    assert by_id["ok"]["labels"] == {"region": "eu"} and by_id["ok"]["applied_version"] == 0
    assert [by_id[n]["health"] for n in ("ok", "sick", "silent")] == [
        "healthy",
        "degraded",
        "unknown",
    ]
    assert by_id["silent"]["last_seen"] is None
    clock.advance(31)  # site_stale_s is 30
    listing = (await admin.ok("GET", "/v1/sites"))["sites"]
    assert {s["id"]: s["health"] for s in listing} == {
        "ok": "unreachable",
        "sick": "unreachable",
        "silent": "unknown",
    }
    detail = await admin.ok("GET", "/v1/sites/sick")
    assert detail["hosts"] == [{"host_id": "h1", "alive": False, "instances": []}]
    assert detail["rejections"] == []


def instance(app: str, iid: str, ready: bool = True) -> dict[str, object]:
    return {"app": app, "instance_id": iid, "service": "web", "version": "1",
            "state": "running" if ready else "starting", "ready": ready, "restarts": 0}  # fmt: skip


async def test_site_list_counts_hosts_apps_and_instances(
    admin: Operator, make_site: MakeSite
) -> None:
    for tenant in ("blue", "red"):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text("web"), "tenant": "blue"}, 202)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text("db"), "tenant": "red"}, 202)
    shop = await make_site("shop")
    await make_site("silent")
    hosts = [
        {"host_id": "h1", "alive": True,
         "instances": [instance("web", "web-1"), instance("db", "db-1")]},
        {"host_id": "h2", "alive": True, "instances": [instance("web", "web-2", ready=False)]},
        {"host_id": "h3", "alive": False, "instances": []},
    ]  # fmt: skip
    sick = {**healthy("1.0"), "state": "progressing"}
    status, answer = await shop.report({"web": sick, "db": healthy("1.0")}, hosts=hosts)
    assert status == 200, answer
    by_id = {s["id"]: s for s in (await admin.ok("GET", "/v1/sites"))["sites"]}
    assert by_id["shop"]["counts"] == {
        "source": "report",
        "hosts": {"total": 3, "up": 2},
        "apps": {"total": 2, "healthy": 1},
        "instances": {"total": 3, "ready": 2},
    }
    assert by_id["silent"]["counts"] is None  # never heard from
    listed = await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "meshorch", "sites", "--hub", admin.url, "--token", admin.token],
        capture_output=True, text=True,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    rows = {line.split()[0]: line.split()[1:5] for line in listed.stdout.splitlines()[1:]}
    assert rows["shop"][2:] == ["2/3", "2/3"] and rows["silent"][2:] == ["-", "-"], rows
    detail = await admin.ok("GET", "/v1/sites/shop")
    assert detail["counts"] == by_id["shop"]["counts"]

    # A tenant token counts its own applications and instances only (hosts are the site's).
    blue = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    status, answer = await admin.call("GET", "/v1/sites", token=blue["token"])
    assert status == 200, answer
    counts = {s["id"]: s["counts"] for s in answer["sites"]}["shop"]
    assert counts["hosts"] == {"total": 3, "up": 2}
    assert counts["apps"] == {"total": 1, "healthy": 0}
    assert counts["instances"] == {"total": 2, "ready": 1}
    status, detail = await admin.call("GET", "/v1/sites/shop", token=blue["token"])
    assert status == 200 and detail["counts"] == counts


async def test_labels_decide_the_next_deployment(admin: Operator, make_site: MakeSite) -> None:
    await make_site("a", region="eu")
    await make_site("b", region="us")
    answer = await admin.ok("PUT", "/v1/sites/b/labels", {"region": "eu"})
    assert answer == {"id": "b", "labels": {"region": "eu"}}
    dep = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"match": {"region": "eu"}}}, 202
    )
    assert dep["waves"] == [["a", "b"]]


async def test_sites_changed_after_a_deployment_decide_the_next_one(
    admin: Operator, make_site: MakeSite
) -> None:
    """The labels placement reads are kept up to date: relabelled, new, deleted sites."""
    await make_site("a", region="eu")
    await make_site("b", region="us")
    eu = {"match": {"region": "eu"}}
    first = await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": eu}, 202)
    assert first["waves"] == [["a"]]
    await admin.ok("PUT", "/v1/sites/b/labels", {"region": "eu"})
    await make_site("c", region="eu")
    await make_site("d", region="us")
    await admin.ok("DELETE", "/v1/sites/a")
    body = {"spec": spec_text(version="2.0"), "placement": eu}
    second = await admin.ok("POST", "/v1/apps", body, 202)
    assert second["waves"] == [["b", "c"]]


async def test_deleting_a_site_lets_its_wave_finish(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    a = await make_site("a")
    await make_site("b")
    await make_site("c")
    dep = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 2}}, 202
    )
    await a.sync()
    await a.report({"web": healthy("1.0")})
    await admin.ok("DELETE", "/v1/sites/b")  # "b" never answers; its wave goes on without it
    dep = await wait_for(admin, dep["id"], lambda d: d["wave"] == 1)
    assert dep["waves"] == [["a"], ["c"]] and "b" not in dep["progress"]
    assert (await admin.call("GET", "/v1/sites/b"))[0] == 404
    assert (await admin.ok("GET", "/v1/apps/web"))["sites"].keys() == {"a", "c"}


async def test_long_ids_are_not_found_not_errors(admin: Operator) -> None:
    for path in ("/v1/deployments/" + "d" * 600, "/v1/sites/" + "s" * 600, "/v1/apps/" + "a" * 600):
        status, answer = await admin.call("GET", path)
        assert status == 404 and answer["error"]["code"] == "not_found", path
    status, _ = await admin.call("DELETE", "/v1/tokens/" + "t" * 600)
    assert status == 404
