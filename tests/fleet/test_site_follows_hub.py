"""A site of three real agents follows a (stub) hub over the fleet link: it enrolls,
applies the deltas targeted at it, advances over the others, catches up after the hub
comes back (through a gap), continues from the trust state in Raft after a leader
failover, and reports its applications' health."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.demo.localsite import LocalHost, LocalSite, free_port, get_status, wait_ready
from meshorch.fleet.delta import Target, key_id
from tests.fleet.hubstub import StubHub
from tests.waiting import until

ROOT = SigningKey(b"r" * 32)
SITE = "shop-1"


def spec(version: str, name: str = "web") -> dict[str, Any]:
    return {
        "api_version": "meshorch/v1",
        "name": name,
        "version": version,
        "services": [
            {
                "name": "main",
                "replicas": 2,
                "containers": [
                    {
                        "name": "main",
                        "image": "process",
                        "command": ["sleep", "1000"],
                        "resources": {"memory_limit": "32Mi", "cpu_request": 0.1},
                    }
                ],
            }
        ],
    }


@pytest.fixture
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    local = LocalSite(hosts=3, site=SITE, root=tmp_path_factory.mktemp("site"))
    local.start()
    try:
        yield local
    finally:
        local.stop()
        print(local.logs())


async def leader_of(session: aiohttp.ClientSession, hosts: list[LocalHost]) -> LocalHost:
    for host in hosts:
        status = await get_status(session, host)
        if status is not None and status["is_leader"]:
            return host
    raise AssertionError("no leader")


async def test_site_follows_the_hub(site: LocalSite) -> None:
    hub = StubHub("acme", ROOT, port=free_port())
    hub.tokens.add("enroll-1")
    await hub.start()
    try:
        async with site.session(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await follow(site, hub, session)
    finally:
        await hub.stop()


async def follow(site: LocalSite, hub: StubHub, session: aiohttp.ClientSession) -> None:
    await wait_ready(session, site.members)
    url = site.members[0].url

    async def get(path: str, host_url: str = url) -> tuple[int, dict[str, Any]]:
        async with session.get(f"{host_url}{path}") as response:
            return response.status, dict(await response.json())

    async def trust_version(host_url: str = url) -> int:
        _, body = await get("/v1/fleet?consistency=local", host_url)
        return int(body["trust"]["version"]) if body["trust"] else -1

    async def trust_version_is(version: int, host_url: str = url) -> bool:
        return await trust_version(host_url) == version

    link = {"hub": hub.url, "fleet": "acme", "root_key": key_id(ROOT), "enroll_token": "enroll-1"}
    async with session.put(f"{url}/v1/fleet/link", data=orjson.dumps(link)) as response:
        assert response.status == 200, await response.text()
    await until("the site enrolls", lambda: SITE in hub.site_keys)
    _, fleet = await get("/v1/fleet")
    assert hub.site_keys[SITE] == fleet["site_key"]

    # A delta for this site: the application runs, and the hub hears it is healthy.
    hub.publish([{"op": "app.put", "spec": spec("1")}], target=Target(sites=frozenset({SITE})))

    def healthy(version: str) -> bool:
        return any(
            r["applied_version"] == hub.head
            and r["apps"].get("web", {}).get("state") == "healthy"
            and r["apps"]["web"]["version"] == version
            for r in hub.reports[-3:]
        )

    await until("web 1 healthy in a report", lambda: healthy("1"), 30)
    last = hub.reports[-1]
    assert last["site"] == SITE and last["v"] == 1 and last["applied_head"] == hub.head_hash
    running = [i for h in last["hosts"] for i in h["instances"] if i["ready"]]
    assert len(running) == 2 and {h["host_id"] for h in last["hosts"]} == {"h1", "h2", "h3"}
    status, app = await get("/v1/apps/web")
    assert status == 200 and app["ready"] == 2

    # A delta for another site: its ops are not applied, the version advances.
    hub.publish(
        [{"op": "app.put", "spec": spec("1", "elsewhere")}],
        target=Target(sites=frozenset({"shop-2"})),
    )
    await until("version 2", lambda: trust_version_is(2))
    status, _ = await get("/v1/apps/elsewhere")
    assert status == 404

    # The hub goes away; deltas pile up; it comes back and first serves a gap.
    await hub.stop()
    await asyncio.sleep(1.0)
    hub.publish([{"op": "app.put", "spec": spec("2")}], target=Target(sites=frozenset({SITE})))
    hub.publish([])
    hub.skip_once = {3}
    await asyncio.sleep(2.0)
    assert await trust_version() == 2
    await hub.start()
    await until("caught up after the hub came back", lambda: trust_version_is(4), 15)
    assert not hub.skip_once, "the site never saw the gap"
    await until("web 2 healthy", lambda: healthy("2"), 30)

    # Leader failover: the next leader goes on from the trust state in Raft.
    leader = await leader_of(session, site.members)
    site.kill(leader)
    rest = [h for h in site.members if h is not leader]
    await wait_ready(session, rest, members=3, not_leader=leader.host_id)
    new_leader = await leader_of(session, rest)
    reports_before = len(hub.reports)
    deleted = {"op": "app.delete", "name": "web", "confirmed": 1}  # its last app: confirmed
    hub.publish([deleted], target=Target(sites=frozenset({SITE})))
    await until("version 5 on the new leader", lambda: trust_version_is(5, new_leader.url), 20)
    await until(
        "a report from the new leader",
        lambda: any(r["applied_version"] == 5 for r in hub.reports[reports_before:]),
    )
    status, _ = await get("/v1/apps/web", new_leader.url)
    assert status == 404
    versions = [r["applied_version"] for r in hub.reports]
    assert versions == sorted(versions), "the applied version went backwards"
    _, fleet = await get("/v1/fleet", new_leader.url)
    assert fleet["trust"]["head"] == hub.head_hash and fleet["connected"] is True
    assert fleet["site_key"] == hub.site_keys[SITE]  # the same identity on every leader
    assert not [r for r in fleet["rejections"] if r["reason"] != "bad_op"]
