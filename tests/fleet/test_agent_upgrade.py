"""Upgrading a real three-agent site's agents through a real hub, host by host.

A test release (this source tree with another version) is uploaded to the hub and rolled
out: each host drains, installs it beside the running one, restarts into the upgrade
launcher and comes back on it, one at a time, while Raft keeps a leader and the app
keeps a ready instance. A release that cannot start is rolled back on its first host by
the launcher, the host reports the failure and the rollout stops there.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from central_hub import Hub, HubConfig
from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.releases.wheels import build_test_release
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.hub.helpers import Operator

SITE = "shop-1"
ROOT = Path(__file__).resolve().parents[2]
APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: web
    replicas: 2
    anti_affinity: true
    containers:
      - name: main
        image: process
        command: ["sh", "-c", "touch ready; exec sleep 1000"]
        resources: {memory_limit: 32Mi, cpu_request: 0.1}
        probes:
          readiness:
            exec: {command: ["sh", "-c", "test -f ready"]}
            period_s: 0.2
            timeout_s: 0.2
            failure_threshold: 1
"""


@dataclass
class World:
    hub: Hub
    admin: Operator
    session: aiohttp.ClientSession
    site: LocalSite
    work: Path

    async def get(self, path: str) -> Any:
        """From the first host that answers (one of them may be restarting)."""
        for host in self.site.members:
            try:
                async with self.session.get(
                    f"{host.url}{path}", timeout=aiohttp.ClientTimeout(total=2)
                ) as r:
                    if r.status == 200:
                        return await r.json()
            except (aiohttp.ClientError, TimeoutError, OSError):
                continue
        return None

    async def upload(self, version: str, *, broken: bool = False) -> None:
        wheel = await asyncio.to_thread(
            build_test_release, ROOT, self.work / version, version, broken=broken
        )
        headers = {"Authorization": f"Bearer {self.admin.token}"}
        async with self.session.post(
            f"{self.hub.url}/v1/releases", data=wheel.read_bytes(), headers=headers
        ) as response:
            assert response.status == 201, await response.text()
        await self.admin.ok("POST", f"/v1/releases/{version}/rollout", {"sites": [SITE]})


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = HubConfig(
        data_dir=tmp_path / "hub", port=0, insecure_http=True, tick_s=0.05, gossip=False
    )
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30), headers=HEADERS) as session,
    ):
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        created = await admin.ok("POST", "/v1/sites", {"id": SITE}, 201)
        site = linked_site(tmp_path / "site", hub, SITE, created["enroll_token"])
        site.start()
        try:
            await wait_ready(session, site.members, timeout_s=30)
            yield World(hub, admin, session, site, tmp_path / "releases")
        finally:
            site.stop()
            print(site.logs()[-8000:])


async def watch(world: World, until_done: Any, timeout_s: float) -> tuple[float, float]:
    """Poll until ``until_done()``; the longest stretches without a Raft leader and
    without a ready instance of the app."""
    no_leader = no_app = 0.0
    leader_lost = app_lost = None
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        now = time.monotonic()
        status = await world.get("/v1/status")
        if status is not None and status.get("leader"):
            leader_lost = None
        else:
            leader_lost = leader_lost or now
            no_leader = max(no_leader, now - leader_lost)
        view = await world.get("/v1/apps/shop?consistency=local")
        if view is not None and any(i["ready"] for i in view.get("instances", [])):
            app_lost = None
        else:
            app_lost = app_lost or now
            no_app = max(no_app, now - app_lost)
        if await until_done():
            return no_leader, no_app
        await asyncio.sleep(0.2)
    raise AssertionError(f"not done within {timeout_s} s: {await world.get('/v1/hosts')}")


async def round_trips(world: World, by_version: dict[str, list[str]]) -> str:
    """A write on a host of each release, read back linearizably on a host of the other."""
    (old, *_), (new, *_) = (by_version[v] for v in sorted(by_version, key=lambda v: "+" in v))
    for writer, reader in ((old, new), (new, old)):
        url = {h.host_id: h.url for h in world.site.members}
        value = f"from-{writer}-{time.monotonic()}".encode()
        async with world.session.put(f"{url[writer]}/v1/kv/mixed/{writer}", data=value) as r:
            assert r.status == 200, await r.text()
        async with world.session.get(f"{url[reader]}/v1/kv/mixed/{writer}") as r:
            assert r.status == 200 and await r.read() == value
    return f"{old} <-> {new}"


async def versions(world: World) -> dict[str, str]:
    hosts = await world.get("/v1/hosts")
    return {} if hosts is None else {h["host_id"]: h["agent_version"] for h in hosts["hosts"]}


async def test_agents_upgrade_host_by_host_and_a_broken_release_rolls_back(world: World) -> None:
    h1 = world.site.members[0]
    async with world.session.post(f"{h1.url}/v1/apps", data=APP.encode()) as response:
        assert response.status == 200

    async def app_ready() -> bool:
        view = await world.get("/v1/apps/shop?consistency=local")
        return view is not None and sum(i["ready"] for i in view["instances"]) == 2

    await watch(world, app_ready, 30)

    started = time.monotonic()
    await world.upload("0.1.0+up1")

    mixed_checked: list[str] = []

    async def upgraded() -> bool:
        hosts = await world.get("/v1/hosts")
        if hosts is None:
            return False
        by_version: dict[str, list[str]] = {}
        for h in hosts["hosts"]:
            if h["alive"] and not h["drained"]:
                by_version.setdefault(h["agent_version"], []).append(h["host_id"])
        if len(by_version) == 2 and not mixed_checked:
            mixed_checked.append(await round_trips(world, by_version))
        return all(h["agent_version"] == "0.1.0+up1" and not h["drained"] for h in hosts["hosts"])

    no_leader, no_app = await watch(world, upgraded, 240)
    took = time.monotonic() - started
    print(f"3-host upgrade in {took:.1f} s; longest without a leader {no_leader:.1f} s, "
          f"without a ready instance {no_app:.1f} s")  # fmt: skip
    assert no_leader < 5.0 and no_app < 5.0
    assert mixed_checked, "never saw the site with two releases at once"

    async def reported(state: str) -> dict[str, Any] | None:
        detail = await world.admin.ok("GET", f"/v1/sites/{SITE}")
        upgrade = detail.get("agent_upgrade")
        return upgrade if upgrade and upgrade["state"] == state else None

    deadline = time.monotonic() + 15
    while not await reported("done"):
        assert time.monotonic() < deadline, await world.admin.ok("GET", f"/v1/sites/{SITE}")
        await asyncio.sleep(0.5)

    await world.upload("0.1.0+up2", broken=True)
    deadline = time.monotonic() + 180
    while (failed := await reported("failed")) is None:
        assert time.monotonic() < deadline, await world.admin.ok("GET", f"/v1/sites/{SITE}")
        await asyncio.sleep(0.5)
    assert "rolled back" in failed["failed"]["reason"]
    assert "broken test release" in failed["failed"]["reason"]
    await asyncio.sleep(3)
    assert set((await versions(world)).values()) == {"0.1.0+up1"}  # the rollout stopped
    hosts = (await world.get("/v1/hosts"))["hosts"]
    assert all(h["alive"] and not h["drained"] for h in hosts), hosts
