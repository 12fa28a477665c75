"""Holding a site, with a real hub process and a real agent: while held, the deltas for it
accumulate at the hub and the site applies none, not even when they are relayed to it
(its agent API); released, it catches up. And when gossip relays are let through."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHub, LocalSite
from meshorch.fleet.site_link import HUB_FIRST_S, relay_refusal
from tests.agent_token import HEADERS
from tests.fleet.hubs import running_hub
from tests.fleet.test_site_follows_hub import spec
from tests.fleet.test_snapshot_catch_up import Fleet, app_version, caught_up, fleet_status
from tests.waiting import until

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("hold")


@pytest.fixture
def hub(root: Path) -> Iterator[LocalHub]:
    with running_hub(root) as running:
        yield running


async def test_a_held_site_applies_nothing_until_released(hub: LocalHub, root: Path) -> None:
    shop = LocalSite(hosts=1, site="shop-1", root=root / "shop-1")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await hub.wait_ready(session)
        fleet = Fleet(hub, session)
        try:
            shop.start()
            await fleet.link(shop, {"shop": "one"})
            app = {"spec": spec("1.0"), "placement": {"match": {"shop": "one"}}}
            await fleet.call("POST", "/v1/apps", app)
            await caught_up(shop, await fleet.head(), 60)
            applied = (await fleet_status(shop))["trust"]["version"]

            await fleet.call("POST", "/v1/sites/shop-1/hold")

            async def told() -> bool:
                return bool((await fleet_status(shop))["held"])

            await until("the site hears it is held", told, 15)
            code, out, err = await _cli("fleet", "status", "--agent", shop.members[0].api)
            assert code == 0 and "held:       yes" in out, err
            await fleet.call("POST", "/v1/apps", {**app, "spec": spec("2.0")})
            head = await fleet.head()
            assert head > applied
            # Relayed to the site (as a peer would): refused, nothing applied.
            export = await fleet.call("GET", f"/v1/deltas/export?after={applied}&site=shop-1")
            envelopes = "[" + ",".join(export["envelopes"]) + "]"
            url = f"{shop.members[0].url}/v1/fleet/deltas"
            async with session.post(url, data=envelopes, headers=HEADERS) as response:
                body: dict[str, Any] = await response.json()
                assert response.status == 400 and body["error"]["code"] == "held", body
            await asyncio.sleep(4)  # a report and a poll or more
            status = await fleet_status(shop)
            assert status["trust"]["version"] == applied and status["held"] is True
            assert await app_version(shop, "web") == "1.0"
            env = {"MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": hub.admin_token}
            code, text, err = await _cli("site", "diff", "shop-1", env=env)
            assert code == 0, err
            assert (
                f"app web (default): upgraded 1.0 -> 2.0  [delta {head}]" in text
                and "HELD since" in text
            ), text

            await fleet.call("POST", "/v1/sites/shop-1/release")
            await caught_up(shop, head, 60)
            await until("web 2.0 at the site", lambda: _is(app_version(shop, "web"), "2.0"), 30)
            assert (await fleet_status(shop))["held"] is False
        finally:
            shop.stop()
            print(shop.logs())


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", *args, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def _is(value: Any, expected: str) -> bool:
    return await value == expected


def test_gossip_relays_wait_for_the_hub_early_in_a_session_and_never_pass_a_hold() -> None:
    held = relay_refusal(True, True, 100.0)
    assert held is not None and held.code == "held"
    early = relay_refusal(False, False, HUB_FIRST_S - 1)
    assert early is not None and early.code == "hub_first"
    assert relay_refusal(False, True, 0.0) is None  # the hub answered: not held
    assert relay_refusal(False, False, HUB_FIRST_S + 1) is None  # the hub is unreachable
