"""Merkle targets with a real hub process and real agents: a deployment to more sites than
a list is worth (``central_hub.deltaformat.MERKLE_ABOVE``) names them by a root, and each
real site decides from its own proof whether it runs the application.

Two sites of real agents (shop-a in the wave, shop-b not) and 64 more sites spoken for by
the test with the real signed link protocol (each reporting site protocol 7)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from central_hub.deltaformat import MERKLE_ABOVE
from meshorch.demo.localsite import LocalHub, LocalSite
from meshorch.state.protocol import FEATURES
from tests.fleet.hubs import running_hub
from tests.fleet.test_site_follows_hub import spec
from tests.fleet.test_snapshot_catch_up import Fleet, app_version, caught_up, fleet_status
from tests.hub.helpers import Site, probe_hosts
from tests.waiting import until


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("merkle")


@pytest.fixture
def hub(root: Path) -> Iterator[LocalHub]:
    with running_hub(root) as running:
        yield running


async def test_real_sites_apply_a_delta_named_by_a_merkle_root(hub: LocalHub, root: Path) -> None:
    shop_a = LocalSite(hosts=1, site="shop-a", root=root / "shop-a")
    shop_b = LocalSite(hosts=1, site="shop-b", root=root / "shop-b")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
        root_key = await hub.wait_ready(session)
        fleet = Fleet(hub, session)
        probes = []
        for i in range(MERKLE_ABOVE):
            probe = Site(session, hub.url, f"probe-{i:02d}", "acme", root_key)
            body = {"id": probe.id, "labels": {"tier": "edge"}, "public_key": probe.public_key}
            await fleet.call("POST", "/v1/sites", body)
            status, answer = await probe.report({}, hosts=probe_hosts(FEATURES["merkle_targets"]))
            assert status == 200, answer
            probes.append(probe)
        try:
            shop_a.start()
            shop_b.start()
            await fleet.link(shop_a, {"tier": "edge"})
            await fleet.link(shop_b, {"tier": "core"})

            async def merkle_ready() -> bool:
                status = (await fleet.call("GET", "/v1/deltas"))["delta_format"]
                return bool(status["issuing"] == 2 and status["held_back_count"] == 0)

            await until("the real sites reported", merkle_ready, 60)
            wave = {"match": {"tier": "edge"}, "max_parallel": 1000}
            await fleet.call("POST", "/v1/apps", {"spec": spec("1.0"), "placement": wave})
            last = (await fleet.call("GET", "/v1/deltas"))["deltas"][-1]
            assert set(last["target"]) == {"merkle", "count", "sites"}
            assert (
                last["target"]["count"] == MERKLE_ABOVE + 1 and "shop-a" in last["target"]["sites"]
            )
            head = last["version"]

            await until("web at shop-a", lambda: app_version(shop_a, "web"), 60)
            for site in (shop_a, shop_b):
                await caught_up(site, head, 60)
                status = await fleet_status(site)
                assert status["trust"]["version"] == head
                assert not [r for r in status["rejections"] if r["reason"] != "bad_op"], status
            assert await app_version(shop_a, "web") == "1.0"
            assert await app_version(shop_b, "web") is None  # its proof: not in the wave

            # A probe in the wave verifies its view: the operations, its proof, no list.
            result = await probes[0].sync()
            assert result.accepted[-1].target.proven == probes[0].id
            assert result.accepted[-1].has_ops
        finally:
            shop_a.stop()
            shop_b.stop()
