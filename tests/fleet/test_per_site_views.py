"""Per-site desired state (format 2 deltas), with a real hub process and real agents.

Two sites of real agents (shop-a of tenant blue, shop-b of tenant red, whose application
carries an env value) follow one hub; a third site, ``shop-c``, is the test speaking the
real signed link protocol, so the raw bytes the hub sends a site can be searched. The fleet
starts on format 1 (its sites have not reported yet: their agents are unknown) and moves to
format 2 once every site reported protocol 5; the sites follow the one chain across it.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.apps.settings import WorkloadSettings
from meshorch.demo.localsite import LocalHub, LocalSite
from meshorch.fleet.delta import (
    ALL_SITES,
    DELTA_V1,
    DELTA_V2,
    GENESIS_HASH,
    Target,
    next_delta,
    sign,
    verify_batch,
)
from meshorch.fleet.link_auth import sign_request, url_host
from meshorch.site.agent import Agent
from tests.agent_token import HEADERS
from tests.agents_util import lone_agent_config
from tests.fleet.hubs import running_hub
from tests.fleet.test_relay import SPEC as RELAYED
from tests.fleet.test_site_follows_hub import spec
from tests.fleet.test_snapshot_catch_up import Fleet, app_version, caught_up, fleet_status
from tests.hub.helpers import Site, probe_hosts
from tests.waiting import until

SECRET_ENV = "red-env-value-7731"
POLL_S = 4


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("views")


@pytest.fixture
def hub(root: Path) -> Iterator[LocalHub]:
    with running_hub(root) as running:
        yield running


async def raw_fetch(probe: Site, after: int, wait: int = 0) -> tuple[bytes, float]:
    """The raw body of ``GET /v1/link/deltas`` as the hub sends it, and how long it took."""
    path_qs = f"/v1/link/deltas?after={after}&wait={wait}"
    headers = sign_request(
        probe.key, probe.id, "GET", path_qs, b"", time.time(), host=url_host(probe.url)
    )
    started = time.monotonic()
    async with probe.session.get(probe.url + path_qs, headers=headers) as response:
        body = await response.read()
        assert response.status == 200, body
    return body, time.monotonic() - started


def envelopes_of(body: bytes) -> list[bytes]:
    return [orjson.dumps(e) for e in orjson.loads(body)["deltas"]]


async def formats(fleet: Fleet) -> tuple[list[int], dict[str, Any]]:
    answer = await fleet.call("GET", "/v1/deltas?limit=500")
    return [d["format"] for d in answer["deltas"]], answer["delta_format"]


async def test_a_site_receives_only_what_concerns_it(hub: LocalHub, root: Path) -> None:
    shop_a = LocalSite(hosts=1, site="shop-a", root=root / "shop-a")
    shop_b = LocalSite(hosts=1, site="shop-b", root=root / "shop-b")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        root_key = await hub.wait_ready(session)
        fleet = Fleet(hub, session)
        for tenant in ("blue", "red"):
            await fleet.call("POST", "/v1/tenants", {"id": tenant})
        probe = Site(session, hub.url, "shop-c", "acme", root_key)
        await fleet.call(
            "POST", "/v1/sites", {"id": "shop-c", "labels": {"shop": "c"},
                                  "public_key": probe.public_key}
        )  # fmt: skip
        try:
            shop_a.start()
            shop_b.start()
            await fleet.link(shop_a, {"shop": "a"})
            await fleet.link(shop_b, {"shop": "b"})
            # Sites registered, agents not heard from yet: format 1 (their agents may be old).
            await fleet.call("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 4000})
            assert (await formats(fleet))[0][-1] == 1
            status, _ = await probe.report({}, hosts=probe_hosts(5))
            assert status == 200
            for site in (shop_a, shop_b):
                await caught_up(site, await fleet.head(), 60)

            async def issuing_v2() -> bool:
                return (await formats(fleet))[1]["issuing"] == 2

            await until("every site reported protocol 5", issuing_v2, 30)

            # Red's application with an env value at shop-b; then blue's at shop-a.
            red_spec = spec("1.0", "redapp")
            red_spec["services"][0]["containers"][0]["env"] = {"DB_PASSWORD": SECRET_ENV}
            red = {"spec": red_spec, "tenant": "red", "placement": {"match": {"shop": "b"}}}
            await fleet.call("POST", "/v1/apps", red)
            await until("redapp at shop-b", lambda: app_version(shop_b, "redapp"), 30)
            blue = {"spec": spec("1.0"), "tenant": "blue", "placement": {"match": {"shop": "a"}}}
            await fleet.call("POST", "/v1/apps", blue)
            await until("web at shop-a", lambda: app_version(shop_a, "web"), 30)
            head = await fleet.head()
            await caught_up(shop_a, head, 30)  # the chain, red's delta as a header included
            found, _ = await formats(fleet)
            assert found[0] == 1 and found[-1] == 2 and found == sorted(found), found
            log = (await fleet.call("GET", "/v1/deltas?limit=500"))["deltas"]
            assert SECRET_ENV in orjson.dumps(log).decode()  # the hub's log has it ...

            # ... the raw bytes the hub sends the probe do not, and they verify as a chain.
            body, _ = await raw_fetch(probe, 0)
            assert SECRET_ENV.encode() not in body and b"redapp" not in body
            assert b'"name":"web"' not in body and b'\\"web\\"' not in body
            result = verify_batch(envelopes_of(body), probe.trust, time.time(), probe.id)
            assert result.rejected is None and result.state is not None
            assert result.state.version == head
            probe.trust = result.state

            # Relayed copies: what shop-a keeps to answer other sites has none of it either.
            status_a = await fleet_status(shop_a)
            assert status_a["trust"]["version"] == head
            assert await app_version(shop_a, "redapp") is None
            assert not [r for r in status_a["rejections"] if r["reason"] != "bad_op"]
            for path in (root / "shop-a").rglob("*"):
                if path.is_file():
                    assert SECRET_ENV.encode() not in path.read_bytes(), path

            # A long-poll of the probe is not woken by a delta only for shop-b ...
            poll = asyncio.create_task(raw_fetch(probe, head, POLL_S))
            await asyncio.sleep(0.5)
            await fleet.call("DELETE", "/v1/apps/redapp?confirm=1")
            await until("redapp gone at shop-b", lambda: _gone(shop_b, "redapp"), 30)
            body, took = await poll
            print(f"VIEWS poll with a delta for another site only: answered in {took:.2f} s")
            assert took >= POLL_S - 0.5
            got = envelopes_of(body)
            assert len(got) == 1 and b"redapp" not in got[0]  # its header, at the timeout
            result = verify_batch(got, probe.trust, time.time(), probe.id)
            assert result.state is not None and result.state.version == head + 1
            probe.trust = result.state

            # ... and is woken at once by a delta for every site.
            poll = asyncio.create_task(raw_fetch(probe, head + 1, POLL_S))
            await asyncio.sleep(0.5)
            await fleet.call("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 5000})
            body, took = await poll
            print(f"VIEWS poll with a delta for all sites: answered in {took:.2f} s")
            assert took < POLL_S - 1
            assert len(envelopes_of(body)) == 1

            # A site whose agent does not know format 2 keeps the old behaviour: every
            # delta wakes it (and the fleet goes back to format 1 for it).
            await probe.report({}, hosts=probe_hosts(4))

            async def issuing_v1() -> bool:
                return (await formats(fleet))[1]["issuing"] == 1

            await until("the hub sees an old agent", issuing_v1, 10)
            after = await fleet.head()
            poll = asyncio.create_task(raw_fetch(probe, after, POLL_S))
            await asyncio.sleep(0.5)
            await fleet.call("POST", "/v1/apps", {**blue, "spec": spec("2.0")})
            body, took = await poll
            assert took < POLL_S - 1
            assert orjson.loads(orjson.loads(body)["deltas"][0]["body"])["v"] == 1
            await until("web 2.0 at shop-a", lambda: _version_is(shop_a, "web", "2.0"), 30)
        finally:
            shop_a.stop()
            shop_b.stop()
            print(shop_a.logs())
            print(shop_b.logs())


async def _gone(site: LocalSite, app: str) -> bool:
    return await app_version(site, app) is None


async def _version_is(site: LocalSite, app: str, version: str) -> bool:
    return await app_version(site, app) == version


ROOT = SigningKey(b"r" * 32)


@pytest.fixture
async def agent(tmp_path: Path) -> AsyncIterator[Agent]:
    # The hub URL leads nowhere: the deltas come by relay only (POST /v1/fleet/deltas).
    config = lone_agent_config(tmp_path, "relay-site", "acme", ROOT)
    async with Agent(config, None, WorkloadSettings(runtime="process")) as running:
        yield running


async def test_relayed_format_2_deltas(agent: Agent) -> None:
    """A v1 chain followed by v2, relayed to a real agent: a delta for another site is
    applied as a header (its operations dropped, never kept nor relayed); operations that
    do not match the signed hash, or missing from a delta for this site, change nothing."""
    base = f"http://{agent.config.api_address}"
    chain = Chain()
    other = Target(sites=frozenset({"shop-b"}))
    mine = Target(sites=frozenset({"relay-site"}))
    red = {"op": "app.put", "tenant": "red",
           "spec": {**RELAYED, "name": "redapp", "env_hint": SECRET_ENV}}  # fmt: skip
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=20), headers=HEADERS
    ) as session:

        async def post(raw: bytes) -> tuple[int, dict[str, Any]]:
            async with session.post(f"{base}/v1/fleet/deltas", data=raw) as response:
                return response.status, dict(await response.json())

        async def trust() -> dict[str, Any]:
            async with session.get(f"{base}/v1/fleet") as response:
                body = dict(await response.json())
                return dict(body["trust"] or {})

        await until("the link configured from the flags", trust, 20)
        status, body = await post(chain.add([], ALL_SITES, DELTA_V1))
        assert status == 200 and body["applied"] == [1], body
        # shop-b's delta, relayed in full by a relay that had it: applied as a header.
        status, body = await post(chain.add([red], other, DELTA_V2))
        assert status == 200 and body["applied"] == [2], body
        async with session.get(f"{base}/v1/apps/redapp") as response:
            assert response.status == 404

        put = {"op": "app.put", "spec": RELAYED}
        good = chain.add([put], mine, DELTA_V2)
        envelope = orjson.loads(good)
        tampered = orjson.dumps({**envelope, "ops": envelope["ops"].replace('"1"', '"9"')})
        header = orjson.dumps({k: v for k, v in envelope.items() if k != "ops"})
        before = await trust()
        for raw, status_code, reason in ((tampered, 400, "ops_mismatch"),
                                         (header, 409, "ops_missing"),
                                         (b"\x00garbage", 400, "malformed")):  # fmt: skip
            status, body = await post(raw)
            assert (status, body["error"]["code"]) == (status_code, reason), body
            assert await trust() == before
        async with session.get(f"{base}/v1/apps/relayed") as response:
            assert response.status == 404
        status, body = await post(good)
        assert status == 200 and body["applied"] == [3], body
        async with session.get(f"{base}/v1/apps/relayed") as response:
            assert response.status == 200 and (await response.json())["version"] == "1"
        assert (await trust())["head"] == chain.head

        # What this site would relay to others over gossip.
        link = agent.site_link
        to_third = link.recent_envelopes(0, "shop-c")
        assert len(to_third) == 3
        assert all(SECRET_ENV.encode() not in raw and b"redapp" not in raw for raw in to_third)
        assert b"relayed" not in to_third[2]  # relay-site's operations are not shop-c's
        # shop-b's operations were never kept here: nothing past version 1 for shop-b.
        assert len(link.recent_envelopes(0, "shop-b")) == 1


class Chain:
    def __init__(self) -> None:
        self.head = GENESIS_HASH
        self.version = 0

    def add(self, ops: list[dict[str, Any]], target: Target, form: int) -> bytes:
        delta = next_delta("acme", self.version, self.head, ops, target, time.time(), 600, form)
        raw, signed = sign(delta, [ROOT])
        self.head, self.version = signed.digest, signed.version
        return raw
