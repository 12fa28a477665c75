"""A host over its disk/memory threshold sheds its lowest-priority instance first (a real
one-agent site whose threshold is set below what the host uses)."""

from __future__ import annotations

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from tests.waiting import until

APP = """
api_version: meshorch/v1
name: shop
version: "1"
services:
  - name: pos
    priority: 10
    containers:
      - {name: main, image: process, command: ["sleep", "1000"],
         resources: {memory_limit: 32Mi, cpu_request: 0.1}}
  - name: batch
    priority: -5
    containers:
      - {name: main, image: process, command: ["sleep", "1000"],
         resources: {memory_limit: 32Mi, cpu_request: 0.1}}
"""


async def test_the_lowest_priority_instance_leaves_first(
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    site = LocalSite(hosts=1, site="pressure", root=tmp_path_factory.mktemp("site"))
    site.extra_args = ["--evict-at-pct", "0.001"]  # always "over": the disk holds more
    site.start()
    try:
        async with site.session(timeout=aiohttp.ClientTimeout(total=10)) as session:
            await wait_ready(session, site.members)
            url = site.members[0].url
            async with session.post(f"{url}/v1/apps", data=APP.encode()) as response:
                assert response.status == 200

            async def placed() -> dict[str, str]:
                async with session.get(f"{url}/v1/apps/shop?consistency=local") as r:
                    view = await r.json()
                return {i["service"]: i["state"] for i in view["instances"]}

            async def batch_shed() -> dict[str, str] | None:
                states = await placed()
                return states if states.get("batch") in ("unplaced", None) else None

            states = await until("batch shed", batch_shed, 30)
            assert states.get("pos") not in (None, "unplaced"), states  # still placed here
            print("states when batch was shed:", states)

            # The eviction is an event of the app's events stream too (what reaches the hub).
            async def shed_event() -> dict[str, object] | None:
                events_url = f"{url}/v1/streams/default/shop/events/events"
                async with session.get(events_url, params={"from": 1}) as r:
                    events = (await r.json()).get("events", []) if r.status == 200 else []
                return next((e for e in events if "shop.batch.0" in e["payload"]), None)

            event = await until("the eviction in default/shop/events", shed_event, 15)
            assert event["level"] == 4, event
            assert str(event["payload"]).startswith("instance_"), event
    finally:
        site.stop()
        print(site.logs()[-3000:])
