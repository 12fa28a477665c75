"""LinkClient against a stub hub on loopback: enroll, signed fetch and report, errors."""

from __future__ import annotations

import asyncio
import collections

import pytest
from aiohttp import web
from nacl.signing import SigningKey

from meshorch.demo.localsite import free_port
from meshorch.fleet.client import (
    BadHubAnswer,
    HubUnreachable,
    LinkClient,
    LinkRefused,
    LinkUnauthorized,
    first_replica,
)
from meshorch.fleet.delta import TrustState, key_id, verify_batch
from tests.fleet.hubstub import StubHub

ROOT = SigningKey(b"r" * 32)
SITE_KEY = SigningKey(b"s" * 32)


async def test_enroll_fetch_verify_report() -> None:
    async with StubHub("acme", ROOT) as hub, LinkClient(hub.url, "shop-1", SITE_KEY) as client:
        with pytest.raises(LinkUnauthorized) as info:
            await client.fetch(0, wait_s=0)
        assert info.value.status == 401 and info.value.code == "bad_site_signature"
        with pytest.raises(LinkRefused) as refused:
            await client.enroll("wrong")
        assert refused.value.status == 403
        hub.tokens.add("tok")
        assert await client.enroll("tok") == "shop-1"
        assert hub.site_keys["shop-1"] == key_id(SITE_KEY)

        hub.publish([])
        hub.publish([{"op": "app.delete", "name": "web"}])
        head, raws = await client.fetch(0, wait_s=0)
        assert head == 2 and len(raws) == 2
        result = verify_batch(raws, TrustState("acme", frozenset({key_id(ROOT)})), 0.0)
        assert result.rejected is None and [d.version for d in result.accepted] == [1, 2]

        # Long-poll: answered as soon as a delta is appended.
        waiting = asyncio.create_task(client.fetch(2, wait_s=10))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        hub.publish([])
        head, raws = await asyncio.wait_for(waiting, 5)
        assert head == 3 and len(raws) == 1

        head, raws = await client.fetch(3, wait_s=0)
        assert (head, raws) == (3, [])
        assert await client.report({"v": 1, "site": "shop-1"}) == 3
        assert hub.reports == [{"v": 1, "site": "shop-1"}]


async def test_unreachable_and_bad_answers() -> None:
    async with LinkClient(f"http://127.0.0.1:{free_port()}", "s", SITE_KEY) as client:
        with pytest.raises(HubUnreachable):
            await client.fetch(0, wait_s=0)

    async def garbage(request: web.Request) -> web.Response:
        return web.Response(text="not json")

    async def broken(request: web.Request) -> web.Response:
        return web.Response(status=502)

    app = web.Application()
    app.router.add_get("/v1/link/deltas", garbage)
    app.router.add_post("/v1/link/report", broken)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with LinkClient(f"http://127.0.0.1:{port}", "s", SITE_KEY) as client:
            with pytest.raises(BadHubAnswer):
                await client.fetch(0, wait_s=0)
            with pytest.raises(HubUnreachable):
                await client.report({})
    finally:
        await runner.cleanup()


async def test_several_hub_urls_fail_over_to_the_next() -> None:
    """A replicated hub's URLs: a replica that cannot be reached moves the link on."""
    async with StubHub("acme", ROOT) as hub:
        hub.tokens.add("tok")
        dead = f"http://127.0.0.1:{free_port()}"
        # The site whose id sends it to the first URL first (``first_replica``).
        site = next(f"shop-{n}" for n in range(100) if first_replica(f"shop-{n}", 2) == 0)
        async with LinkClient(f"{dead}, {hub.url}/", site, SITE_KEY) as client:
            assert client.hub_urls == [dead, hub.url]
            assert client.hub_url == dead
            with pytest.raises(HubUnreachable):
                await client.enroll("tok")  # the dead replica
            assert client.hub_url == hub.url
            assert await client.enroll("tok") == site
            hub.publish([])
            head, raws = await client.fetch(0, wait_s=0)
            assert head == 1 and len(raws) == 1
    with pytest.raises(ValueError):
        LinkClient(" , ", "shop-1", SITE_KEY)


def test_sites_start_at_replicas_spread_by_their_ids() -> None:
    urls = ",".join(f"https://hub-{n}.example:8443" for n in range(3))
    starts = collections.Counter(
        LinkClient(urls, f"site-{n:05d}", SITE_KEY).hub_url for n in range(3000)
    )
    assert len(starts) == 3 and min(starts.values()) > 900, starts
    again = LinkClient(urls, "site-00042", SITE_KEY).hub_url
    assert again == LinkClient(urls, "site-00042", SITE_KEY).hub_url  # stable across restarts
