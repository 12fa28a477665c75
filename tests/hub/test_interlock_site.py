"""The site's half of the deletion interlock, with a real hub and a real agent: a signed
delta that would remove every application the site runs, without the operator's
confirmation (a hub that skipped the check: here the hub's own signing path, called past
its interlock), is applied without its deletions, and the site says why; the same change
confirmed at the hub goes through."""

from __future__ import annotations

from pathlib import Path

import pytest

from central_hub import Hub
from central_hub.ledger import Txn
from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.fleet.delta import Target
from meshorch.fleet.interlock import REFUSAL
from tests.fleet.test_site_follows_hub import spec
from tests.fleet.test_snapshot_catch_up import app_version, caught_up, fleet_status
from tests.hub.helpers import Operator
from tests.waiting import until

pytestmark = pytest.mark.timeout(240)


async def test_a_site_keeps_its_apps_against_an_unconfirmed_emptying_delta(
    hub: Hub, admin: Operator, tmp_path: Path
) -> None:
    answer = await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    link = {"hub": hub.url, "fleet": hub.fleet, "root_key": hub.root_key,
            "enroll_token": answer["enroll_token"]}  # fmt: skip
    shop = LocalSite(hosts=1, site="shop-1", root=tmp_path / "shop-1")
    shop.start()
    try:
        async with shop.session() as agents:
            await wait_ready(agents, shop.members, timeout_s=60, members=1)
            async with agents.put(f"{shop.members[0].url}/v1/fleet/link", json=link) as resp:
                assert resp.status == 200, await resp.text()
        app = {"spec": spec("1.0"), "placement": {"sites": ["shop-1"]}}
        await admin.ok("POST", "/v1/apps", app, 202)
        await caught_up(shop, hub.head.version, 60)
        assert await app_version(shop, "web") == "1.0"

        def unchecked(txn: Txn) -> int:
            op = {"op": "app.delete", "name": "web", "tenant": "default"}
            return txn.delta([op], Target(sites=frozenset({"shop-1"})))

        version = await hub.ledger.transact(unchecked)
        await caught_up(shop, version, 60)  # the delta is accepted ...
        assert await app_version(shop, "web") == "1.0"  # ... and web still runs
        refusals = [r for r in (await fleet_status(shop))["rejections"]
                    if r["version"] == version]  # fmt: skip
        assert refusals and REFUSAL.format(count=1) in refusals[0]["message"], refusals

        # Confirmed at the hub, the same change goes through.
        status, refused = await admin.call("DELETE", "/v1/apps/web")
        assert status == 409 and refused["error"]["details"]["emptied"] == ["shop-1"]
        await admin.ok("DELETE", "/v1/apps/web?confirm=1")

        async def gone() -> bool:
            return await app_version(shop, "web") is None

        await until("web deleted at shop-1", gone, 60)
    finally:
        shop.stop()
