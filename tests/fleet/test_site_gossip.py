"""Gossip between real sites and a real hub on loopback (no root).

An in-process hub (gossip preset ``local``, UDP port 0) and three one-host sites of real
agent processes linked to it by the agent flags. The hub's fleet view shows every site's
gossip summary; a site whose HTTP link the hub refuses (503, "unreachable" for the site)
learns of a new delta by gossip, gets it from its neighbours (the hub does not answer its
requests, so the neighbour path is the one taken) and applies it, and the hub still sees
it through gossip; members with valid certificates publishing bad summaries or app
messages are counted and ignored.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

import central_hub.api as hub_api
from central_hub import ApiError, Hub, HubConfig
from central_hub.parts import HubParts
from gossip import DatagramOpener, DatagramSealer, GossipConfig, GossipService
from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.fleet.client import LinkClient
from meshorch.fleet.gossip import (
    HUB_ID,
    MAX_APP_BYTES,
    request_message,
    seal_summary,
)
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.hub.helpers import Operator

SITES = ("s1", "s2", "s3")
STALE_S = 4.0

SPEC = {
    "api_version": "meshorch/v1",
    "name": "web",
    "version": "1",
    "services": [
        {
            "name": "main",
            "replicas": 1,
            "containers": [
                {
                    "name": "main",
                    "image": "process",
                    "command": ["sleep", "1000"],
                    "resources": {"memory_limit": "32Mi", "cpu_request": 0.05},
                }
            ],
        }
    ],
}


@dataclass
class Fleet:
    hub: Hub
    admin: Operator
    session: aiohttp.ClientSession
    sites: dict[str, LocalSite]

    async def site_fleet(self, site: str) -> dict[str, Any]:
        url = self.sites[site].members[0].url
        async with self.session.get(f"{url}/v1/fleet?consistency=local") as response:
            return dict(await response.json())

    async def trust_version(self, site: str) -> int:
        trust = (await self.site_fleet(site))["trust"]
        return -1 if trust is None else int(trust["version"])

    def logs(self) -> str:
        return "\n".join(site.logs() for site in self.sites.values())


async def until(what: str, check: Callable[[], Any], fleet: Fleet, timeout_s: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout_s
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if inspect.isawaitable(last):
                last = await last
        except (aiohttp.ClientError, TimeoutError, KeyError, TypeError, OSError) as exc:
            last = exc  # not yet: a system still settling
        if last and not isinstance(last, Exception):
            return last
        await asyncio.sleep(0.1)
    raise AssertionError(f"not within {timeout_s}s: {what} (last: {last!r})\n{fleet.logs()}")


@pytest.fixture
async def hub_only(tmp_path: Path) -> AsyncIterator[Fleet]:
    config = HubConfig(
        data_dir=tmp_path / "hub",
        port=0,
        insecure_http=True,
        tick_s=0.05,
        site_stale_s=STALE_S,
        gossip_preset="local",
    )
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=HEADERS) as session,
    ):
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        yield Fleet(hub, admin, session, {})


@pytest.fixture
async def fleet(hub_only: Fleet, tmp_path: Path) -> AsyncIterator[Fleet]:
    hub, admin = hub_only.hub, hub_only.admin
    try:
        for site in SITES:
            created = await admin.ok("POST", "/v1/sites", {"id": site}, 201)
            local = linked_site(tmp_path / site, hub, site, created["enroll_token"], hosts=1)
            hub_only.sites[site] = local
            local.start()
        for local in hub_only.sites.values():
            await wait_ready(hub_only.session, local.members)
        yield hub_only
    finally:
        for local in hub_only.sites.values():
            local.stop()


async def hub_site(fleet: Fleet, site: str) -> dict[str, Any]:
    return dict(await fleet.admin.ok("GET", f"/v1/sites/{site}"))


async def test_sites_gossip_summaries_and_a_cut_off_site_catches_up_from_neighbours(
    fleet: Fleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = fleet.hub
    assert hub.gossip is not None

    # Every site's summary reaches the hub's fleet view.
    async def all_gossiping() -> bool:
        for site in SITES:
            detail = await hub_site(fleet, site)
            if detail["gossip"] is None:
                return False
        return True

    await until("every site's summary in the hub's fleet view", all_gossiping, fleet)
    detail = await hub_site(fleet, "s1")
    gossip = detail["gossip"]
    assert set(gossip) >= {"v", "t", "av", "ah", "apps", "na", "n", "up", "alerts", "received_at"}
    assert gossip["n"] == gossip["up"] == 1 and gossip["alerts"] == []
    assert detail["gossip_member"] == "alive"

    # The sites find each other's public addresses through the hub and gossip directly.
    async def direct(site: str, other: str) -> bool:
        status = (await fleet.site_fleet(site))["gossip"]
        member = (status or {}).get("members", {}).get(other)
        return bool(member and member["address"])

    await until("s1 and s2 hear each other directly", lambda: direct("s1", "s2"), fleet)
    await until("s2 and s1 hear each other directly", lambda: direct("s2", "s1"), fleet)

    # s1's link (deltas and reports) is refused with 503, so s1 sees the hub as
    # unreachable; its gossip certificate is still served. The hub does not answer s1's
    # gossip requests either: only its neighbours can give it deltas. s1 is restarted, so
    # no long-poll of its own is open at the hub from before.
    blocked = {"s1"}
    verify = hub_api._verify_site

    def refusing(hub_: HubParts, request: Any, body: bytes, *, changes: bool) -> str:
        site = verify(hub_, request, body, changes=changes)
        if site in blocked and request.path != "/v1/link/gossip":
            raise ApiError(503, "unavailable", "refused by the test")
        return site

    monkeypatch.setattr(hub_api, "_verify_site", refusing)
    answer = hub.gossip._answer
    monkeypatch.setattr(
        hub.gossip,
        "_answer",
        lambda sender, after: None if sender in blocked else answer(sender, after),
    )
    s1 = fleet.sites["s1"]
    s1.stop_host(s1.members[0])
    s1.start_host(s1.members[0])
    await wait_ready(fleet.session, s1.members)
    await until("s1 gossips again", lambda: direct("s1", "s2"), fleet)
    await until("s1 finds the hub unreachable", lambda: _not_connected(fleet, "s1"), fleet)
    before = await fleet.trust_version("s1")
    await fleet.admin.ok("POST", "/v1/apps", {"spec": SPEC, "placement": {}}, 202)
    head = hub.head.version
    assert head > before
    started = time.monotonic()
    await until(
        "s2 applies the new delta over its link",
        lambda: _version_is(fleet, "s2", head),
        fleet,
    )
    await until(
        "s1 applies the new delta from a neighbour",
        lambda: _version_is(fleet, "s1", head),
        fleet,
    )
    elapsed = time.monotonic() - started
    status = (await fleet.site_fleet("s1"))["gossip"]
    assert status["stats"]["deltas_applied"] >= 1, status
    assert status["stats"]["requests_sent"] >= 1, status
    print(f"s1 applied version {head} by gossip {elapsed:.1f}s after it was appended")

    # The hub hears of it through gossip only, and does not call s1 unreachable.
    async def hub_sees_s1_at_head() -> bool:
        detail = await hub_site(fleet, "s1")
        return bool(detail["seen_via"] == "gossip" and detail["applied_version"] == head)

    await until("the hub sees s1 at the head through gossip", hub_sees_s1_at_head, fleet)
    detail = await hub_site(fleet, "s1")
    assert detail["health"] != "unreachable", detail
    assert detail["gossip"]["av"] == head

    # The link comes back: s1 reports again.
    blocked.clear()

    async def linked_again() -> bool:
        return (await hub_site(fleet, "s1"))["seen_via"] == "link"

    await until("s1 reports over its link again", linked_again, fleet)


async def _not_connected(fleet: Fleet, site: str) -> bool:
    return not (await fleet.site_fleet(site))["connected"]


async def _version_is(fleet: Fleet, site: str, version: int) -> bool:
    return await fleet.trust_version(site) == version


async def test_bad_summaries_and_app_messages_are_counted_and_ignored(hub_only: Fleet) -> None:
    """A member with a valid certificate (a registered site 'rogue') publishes garbage,
    a summary signed by another key, one with bad fields, and sends bad app messages: the
    hub counts each and keeps nothing of them; then a good summary is kept."""
    fleet = hub_only
    hub = fleet.hub
    assert hub.gossip is not None
    key = SigningKey.generate()
    public = bytes(key.verify_key).hex()
    await fleet.admin.ok("POST", "/v1/sites", {"id": "rogue", "public_key": public}, 201)
    async with LinkClient(hub.url, "rogue", key) as client:
        info = await client.gossip_info()
    assert info.hub_id == HUB_ID and info.preset == "local"
    sealer = DatagramSealer("rogue", key, info.cert)
    opener = DatagramOpener(lambda: {hub.root_key}, recipient="rogue")
    stats = hub.gossip.stats
    async with GossipService(
        GossipConfig.local(), sealer, opener, natted=True, max_app_bytes=MAX_APP_BYTES
    ) as rogue:
        rogue.set_addresses({HUB_ID: info.hub_addr})
        rogue.join([HUB_ID])
        await until("the rogue joins", lambda: rogue.node.member(HUB_ID) is not None, fleet)

        def published(value: bytes) -> Callable[[], bool]:
            bad = stats.bad_summaries
            rogue.publish(value)
            return lambda: stats.bad_summaries > bad

        def version() -> int:  # the gossip version the rogue's next summary gets
            me = rogue.node.member("rogue")
            assert me is not None
            return me.summary_version + 1

        good = {
            "v": 1, "t": time.time(), "av": 0, "ah": "", "apps": "0" * 16, "na": 0, "n": 1,
            "up": 1, "alerts": [],
        }  # fmt: skip
        await until("garbage counted", published(b"\x00not a summary" * 8), fleet)
        other = SigningKey.generate()
        await until(
            "foreign signature counted",
            published(seal_summary(other, "rogue", good, version())),
            fleet,
        )
        await until(
            "bad fields counted",
            published(seal_summary(key, "rogue", {**good, "av": -1, "t": time.time()}, version())),
            fleet,
        )
        await until(
            "summary from the future counted",
            published(seal_summary(key, "rogue", {**good, "t": time.time() + 3600}, version())),
            fleet,
        )
        assert hub.gossip.summary_of("rogue") is None

        bad_messages = stats.bad_messages
        for message in (b"", b"Zzz", b"Q{not json", b"Q" + orjson.dumps({"after": -3})):
            rogue.send_app(HUB_ID, message)
        await until(
            "bad app messages counted", lambda: stats.bad_messages >= bad_messages + 4, fleet
        )

        # Still a working member: a good summary is kept, and a request is answered.
        await until(
            "a summary signed for another version counted",
            published(seal_summary(key, "rogue", {**good, "t": time.time()}, version() + 5)),
            fleet,
        )
        rogue.publish(seal_summary(key, "rogue", {**good, "t": time.time()}, version()))
        await until("the good summary is kept", lambda: hub.gossip.summary_of("rogue"), fleet)
        received: list[bytes] = []
        rogue.on_app_message = lambda sender, body: received.append(body)
        await fleet.admin.ok("POST", "/v1/apps", {"spec": SPEC, "placement": {}}, 202)
        rogue.send_app(HUB_ID, request_message(0))
        await until("the hub answers with deltas", lambda: received, fleet)
        assert all(body[:1] == b"D" for body in received)
    detail = await hub_site(fleet, "rogue")
    assert detail["gossip"]["n"] == 1 and detail["seen_via"] == "gossip"
