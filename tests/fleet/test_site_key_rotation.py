"""The site key towards the hub is rotated when a host is revoked: a real site of five
agents on loopback, linked to a real hub process.

The tests run in order on one site: each revokes one more host (or asks for a rotation).
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.demo.localsite import LocalHost, LocalHub, LocalSite, get_status, wait_ready
from meshorch.fleet.apply import SITE_KEY_KEY, SiteKey
from meshorch.fleet.link_auth import sign_request, url_host
from meshorch.state.tables import SITE_TABLES, SYSTEM_TABLE
from raft import StateView
from tests.waiting import until

SITE = "shop"


@dataclass
class Fleet:
    site: LocalSite
    hub: LocalHub
    down: set[str] = field(default_factory=set)  # hosts revoked or stopped

    @property
    def up(self) -> list[LocalHost]:
        return [h for h in self.site.members if h.host_id not in self.down]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    root = tmp_path_factory.mktemp("keyrot")
    hub = LocalHub(root / "hub", fleet="acme")
    site = LocalSite(hosts=5, site=SITE, root=root / "site")
    hub.start()
    site.start()
    try:
        yield Fleet(site, hub)
    finally:
        site.stop()
        hub.stop()
        print(site.logs())
        print(hub.logs())


@dataclass
class Linked:
    fleet: Fleet
    agents: aiohttp.ClientSession  # the site's admin token
    hub: aiohttp.ClientSession  # the hub's admin token

    async def fleet_status(self) -> dict[str, Any]:
        for host in self.fleet.up:
            try:
                async with self.agents.get(f"{host.url}/v1/fleet") as response:
                    if response.status == 200:
                        return dict(await response.json())
            except aiohttp.ClientError:
                continue
        raise AssertionError("no agent answers")

    async def key_at_hub(self) -> str | None:
        async with self.hub.get(f"{self.fleet.hub.url}/v1/sites/{SITE}") as response:
            assert response.status == 200, await response.text()
            return (await response.json())["public_key"]  # type: ignore[no-any-return]

    async def site_at_hub(self) -> dict[str, Any]:
        async with self.hub.get(f"{self.fleet.hub.url}/v1/sites/{SITE}") as response:
            return dict(await response.json())

    async def revoke(self, victim: LocalHost) -> None:
        via = next(h for h in self.fleet.up if h is not victim)
        async with self.agents.delete(f"{via.url}/v1/members/{victim.host_id}") as response:
            assert response.status == 200, await response.text()
        self.fleet.down.add(victim.host_id)
        self.fleet.site.stop_host(victim)

    async def reports_flow(self) -> bool:
        """The hub takes a report from the site after now."""
        since = time.time()

        async def fresh() -> bool:
            received = (await self.site_at_hub())["report_received_at"]
            return received is not None and received > since

        return bool(await until("a report after the rotation", fresh, 20))


@pytest.fixture
async def linked(fleet: Fleet) -> AsyncIterator[Linked]:
    async with aiohttp.ClientSession() as plain:
        await fleet.hub.wait_ready(plain)
    hub_token = {"Authorization": f"Bearer {fleet.hub.admin_token}"}
    async with (
        fleet.site.session(timeout=aiohttp.ClientTimeout(total=30)) as agents,
        aiohttp.ClientSession(headers=hub_token, timeout=aiohttp.ClientTimeout(total=30)) as hub,
    ):
        await wait_ready(agents, fleet.up, timeout_s=60, members=len(fleet.up))
        state = Linked(fleet, agents, hub)
        async with hub.get(f"{fleet.hub.url}/v1/sites/{SITE}") as response:
            registered = response.status == 200
        if not registered:
            async with hub.post(f"{fleet.hub.url}/v1/sites", json={"id": SITE}) as response:
                assert response.status == 201, await response.text()
                token = (await response.json())["enroll_token"]
            async with hub.get(f"{fleet.hub.url}/v1/fleet") as response:
                root_key = (await response.json())["root_key"]
            link = {"hub": fleet.hub.url, "fleet": "acme", "root_key": root_key,
                    "enroll_token": token}  # fmt: skip
            host = fleet.up[0]
            async with agents.put(f"{host.url}/v1/fleet/link", json=link) as response:
                assert response.status == 200, await response.text()

        async def enrolled() -> bool:
            return (await state.key_at_hub()) == (await state.fleet_status())["site_key"]

        await until("the site's key is the one the hub holds", enrolled, 30)
        yield state


def stolen_key(host: LocalHost) -> SigningKey:
    """The site key as the (stopped) host holds it: in its copy of the replicated state."""
    view = StateView(host.data_dir / "raft" / "view", SITE_TABLES)
    try:
        record = view.get(SYSTEM_TABLE, SITE_KEY_KEY)
    finally:
        view.close()
    assert record is not None
    return SigningKey(SiteKey.decode(record.value).seed)


async def as_thief(linked: Linked, key: SigningKey, method: str, path: str) -> int:
    body = b"" if method == "GET" else orjson.dumps({"v": 1, "site": SITE})
    headers = sign_request(
        key, SITE, method, path, body, time.time(), host=url_host(linked.fleet.hub.url)
    )
    url = linked.fleet.hub.url + path
    async with linked.hub.request(method, url, data=body or None, headers=headers) as response:
        return response.status


async def test_revoking_a_host_rotates_the_site_key_at_the_hub(linked: Linked) -> None:
    async def site_key() -> str | None:  # made by the leader once the site is linked
        key: str | None = (await linked.fleet_status())["site_key"]
        return key

    before = await until("the site has its fleet key", site_key, 20)
    victim = linked.fleet.site.host("h5")
    assert await as_thief(linked, SigningKey.generate(), "GET", "/v1/link/streams") == 401

    async def victim_holds_the_key() -> bool:  # its own view has applied the key's record
        async with linked.agents.get(f"{victim.url}/v1/fleet") as response:
            return response.status == 200 and (await response.json())["site_key"] == before

    await until("the victim holds the site key", victim_holds_the_key, 20)
    await linked.revoke(victim)
    thief = stolen_key(victim)  # read once the host is stopped
    assert bytes(thief.verify_key).hex() == before

    async def rotated() -> bool:
        status = await linked.fleet_status()
        return (
            status["site_key"] != before
            and status["site_key_rotation"]["pending"] is None
            and await linked.key_at_hub() == status["site_key"]
        )

    await until("the site and the hub moved to a new key", rotated, 30)
    status = await linked.fleet_status()
    assert status["site_key_rotation"]["reason"] == "revocation"
    # What the stolen host can sign is refused; the site's own reports go on.
    for method, path in (("GET", "/v1/link/deltas?after=0&wait=0"), ("GET", "/v1/link/streams"),
                         ("POST", "/v1/link/report"), ("GET", "/v1/link/gossip")):  # fmt: skip
        assert await as_thief(linked, thief, method, path) == 401, path
    assert await linked.reports_flow()
    detail = await linked.site_at_hub()
    assert detail["key_rotations"] == 1 and detail["health"] != "unreachable"


async def test_a_rotation_waits_for_the_uplink_and_survives_a_leader_change(
    linked: Linked,
) -> None:
    fleet = linked.fleet
    before = (await linked.fleet_status())["site_key"]
    fleet.hub.stop()
    await linked.revoke(fleet.site.host("h4"))

    async def pending() -> str | None:
        rotation = (await linked.fleet_status())["site_key_rotation"]
        return None if rotation["pending"] is None else str(rotation["pending"]["public_key"])

    new_key = await until("a pending key", pending, 20)
    # The leader that made it goes away; the next one carries on with the same key.
    statuses = {h.host_id: await get_status(linked.agents, h) for h in fleet.up}
    leader = next(h for h in fleet.up if (statuses[h.host_id] or {}).get("is_leader"))
    fleet.site.stop_host(leader)
    fleet.down.add(leader.host_id)
    await wait_ready(linked.agents, fleet.up, timeout_s=30, members=len(fleet.up) + 1)
    await asyncio.sleep(2.0)  # the uplink is still down: nothing can change the key
    status = await linked.fleet_status()
    assert status["site_key"] == before
    assert status["site_key_rotation"]["pending"]["public_key"] == new_key
    fleet.hub.start()

    async def done() -> bool:
        status = await linked.fleet_status()
        return status["site_key"] == new_key and await linked.key_at_hub() == new_key

    await fleet.hub.wait_ready(linked.hub)
    await until("the rotation completes once the hub is back", done, 40)
    assert await linked.reports_flow()
    fleet.site.start_host(leader)
    fleet.down.discard(leader.host_id)


async def test_an_operator_rotates_the_key_and_a_viewer_may_not(linked: Linked) -> None:
    host = linked.fleet.up[0]
    before = (await linked.fleet_status())["site_key"]
    async with linked.agents.post(
        f"{host.url}/v1/access-tokens", json={"role": "viewer"}
    ) as response:
        assert response.status in (200, 201), await response.text()
        viewer = (await response.json())["token"]
    async with aiohttp.ClientSession() as plain:
        headers = {"Authorization": f"Bearer {viewer}"}
        async with plain.post(f"{host.url}/v1/fleet/key", headers=headers) as response:
            assert response.status == 403
    assert (await linked.fleet_status())["site_key_rotation"]["pending"] is None
    env = {**os.environ, "MESHORCH_AGENT_TOKEN": linked.fleet.site.token}
    command = [sys.executable, "-m", "meshorch", "fleet", "rotate-key", "--agent", host.api,
               "--wait", "40"]  # fmt: skip
    done = await asyncio.to_thread(
        subprocess.run, command, env=env, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    after = (await linked.fleet_status())["site_key"]
    assert after != before and await linked.key_at_hub() == after
    assert (await linked.fleet_status())["site_key_rotation"]["reason"] == "operator"
    assert await linked.reports_flow()
