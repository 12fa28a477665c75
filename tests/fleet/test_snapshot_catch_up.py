"""Catching up by signed snapshot, with a real hub process and real agents: a site that
was away while 510+ deltas were issued with a short lifetime (its first page expired), and
a site enrolled into a fleet older than the delta lifetime with more than 500 deltas.
Both would stall on the expired first page without the snapshot; both catch up in seconds.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHub, LocalSite, wait_ready
from tests.fleet.hubs import running_hub
from tests.fleet.test_site_follows_hub import spec
from tests.waiting import until

DELTAS = 520
TTL_S = 4.0
SECRET_ENV = "red-password-123"


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("snapshot")


@pytest.fixture
def hub(root: Path) -> Iterator[LocalHub]:
    with running_hub(root, "--delta-ttl", str(TTL_S)) as running:
        yield running


def new_site(root: Path, name: str) -> LocalSite:
    return LocalSite(hosts=1, site=name, root=root / name)


class Fleet:
    def __init__(self, hub: LocalHub, session: aiohttp.ClientSession) -> None:
        self.hub = hub
        self.session = session
        self.headers = {"Authorization": f"Bearer {hub.admin_token}"}

    async def call(self, method: str, path: str, body: object = None) -> Any:
        async with self.session.request(
            method, self.hub.url + path, json=body, headers=self.headers
        ) as response:
            assert response.status < 300, await response.text()
            return await response.json()

    async def head(self) -> int:
        return int((await self.call("GET", "/v1/fleet"))["head"])

    async def link(self, site: LocalSite, labels: dict[str, str]) -> None:
        answer = await self.call("POST", "/v1/sites", {"id": site.site, "labels": labels})
        root_key = (await self.call("GET", "/v1/fleet"))["root_key"]
        link = {"hub": self.hub.url, "fleet": "acme", "root_key": root_key,
                "enroll_token": answer["enroll_token"]}  # fmt: skip
        async with site.session() as agents:
            await wait_ready(agents, site.members, timeout_s=60, members=1)
            async with agents.put(f"{site.members[0].url}/v1/fleet/link", json=link) as resp:
                assert resp.status == 200, await resp.text()

    async def issue(self, count: int) -> None:
        """``count`` deltas (tenant quota changes, for every site), 16 at a time."""
        for start in range(0, count, 16):
            await asyncio.gather(
                *(
                    self.call("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 1000 + i})
                    for i in range(start, min(count, start + 16))
                )
            )


async def fleet_status(site: LocalSite) -> dict[str, Any]:
    async with (
        site.session() as agents,
        agents.get(f"{site.members[0].url}/v1/fleet") as response,
    ):
        assert response.status == 200
        return dict(await response.json())


async def app_version(site: LocalSite, name: str) -> str | None:
    async with (
        site.session() as agents,
        agents.get(f"{site.members[0].url}/v1/apps/{name}") as response,
    ):
        return None if response.status == 404 else str((await response.json())["version"])


async def caught_up(site: LocalSite, version: int, timeout_s: float) -> float:
    """Seconds until the site applied ``version`` (from its agent being ready)."""
    async with site.session() as agents:
        await wait_ready(agents, site.members, timeout_s=60, members=1)
    started = time.monotonic()

    async def applied() -> bool:
        trust = (await fleet_status(site))["trust"]
        return trust is not None and trust["version"] >= version

    await until(f"{site.site} applies version {version}", applied, timeout_s)
    return time.monotonic() - started


async def test_far_behind_and_new_sites_catch_up_by_snapshot(hub: LocalHub, root: Path) -> None:
    away, late = new_site(root, "shop-away"), new_site(root, "shop-late")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await hub.wait_ready(session)
        fleet = Fleet(hub, session)
        for tenant in ("blue", "red"):
            await fleet.call("POST", "/v1/tenants", {"id": tenant})
        # Red's application (an env value in it) runs on a site of its own, not these.
        await fleet.call("POST", "/v1/sites", {"id": "shop-red", "labels": {"shop": "red"}})
        red_spec = spec("1.0", "redapp")
        red_spec["services"][0]["containers"][0]["env"] = {"DB_PASSWORD": SECRET_ENV}
        red = {"spec": red_spec, "tenant": "red", "placement": {"match": {"shop": "red"}}}
        await fleet.call("POST", "/v1/apps", red)
        try:
            away.start()
            await fleet.link(away, {"shop": "away"})
            await caught_up(away, await fleet.head(), 60)
            blue = {"spec": spec("1.0"), "tenant": "blue", "placement": {"match": {"shop": "away"}}}
            await fleet.call("POST", "/v1/apps", blue)
            await until("web 1.0 at the site", lambda: app_version(away, "web"), 30)

            away.stop()  # away while the fleet moves on
            await fleet.call("POST", "/v1/apps", {**blue, "spec": spec("2.0")})
            await fleet.issue(DELTAS)
            head = await fleet.head()
            await asyncio.sleep(TTL_S + 1)  # the first page it will be served has expired

            away.start_host(away.members[0])
            took = await caught_up(away, head, 60)
            print(f"CATCH-UP site away for {head} deltas (ttl {TTL_S:g} s): {took:.2f} s")
            assert took < 20
            assert await app_version(away, "web") == "2.0"
            status = await fleet_status(away)
            assert not [r for r in status["rejections"] if r["reason"] != "bad_op"], status
            log = (away.root / "h1.log").read_text()  # type: ignore[operator]
            assert "caught up by snapshot" in log

            # A new site enrolled into this fleet (older than the delta lifetime, 500+ deltas).
            late.start()
            await fleet.link(late, {"shop": "late"})
            head = await fleet.head()
            took = await caught_up(late, head, 60)
            print(f"CATCH-UP new site into a fleet of {head} deltas: {took:.2f} s")
            assert took < 20
            assert await app_version(late, "web") is None
            assert await app_version(late, "redapp") is None
            late_log = (late.root / "h1.log").read_text()  # type: ignore[operator]
            assert "caught up by snapshot" in late_log
            assert SECRET_ENV not in late_log and SECRET_ENV not in log
        finally:
            away.stop()
            late.stop()
            print(away.logs())
            print(late.logs())
