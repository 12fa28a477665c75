"""A restarted hub has lost the nonces of the requests its earlier run accepted: a site
request that changes something, signed before the restart, is refused (a request captured
then could only be such a one); the site's next, freshly signed request is accepted."""

from __future__ import annotations

import time
from pathlib import Path

import aiohttp
import orjson

from central_hub import Hub
from meshorch.fleet.link_auth import sign_request, url_host
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, Site
from tests.hub.test_tls import APPLIED

PATH = "/v1/link/report"


def report(at: float) -> bytes:
    return orjson.dumps({"v": 1, "site": "shop-1", "time": at, **APPLIED})


async def post(site: Site, body: bytes, headers: dict[str, str]) -> tuple[int, dict[str, object]]:
    async with site.session.post(site.url + PATH, data=body, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


async def test_a_request_captured_before_a_restart_is_not_replayed(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    async with aiohttp.ClientSession() as session:
        async with Hub(hub_config(data_dir)) as hub:
            port, fleet, root_key = int(hub.url.rsplit(":", 1)[1]), hub.fleet, hub.root_key
            site = Site(session, hub.url, "shop-1", fleet, root_key)
            admin = Operator(session, hub.url, admin_token(hub))
            body = {"id": "shop-1", "public_key": site.public_key}
            await admin.ok("POST", "/v1/sites", body, 201)
            old = report(time.time())
            captured = sign_request(
                site.key, "shop-1", "POST", PATH, old, time.time(), host=url_host(hub.url)
            )
            status, answer = await post(site, old, captured)
            assert status == 200, answer
        # The same hub, address and data dir: what it accepted before is not in memory.
        async with Hub(hub_config(data_dir, port=port)) as hub:
            admin = Operator(session, hub.url, admin_token(hub))
            before = await admin.ok("GET", "/v1/sites/shop-1")
            status, answer = await post(site, old, captured)
            assert status == 401, answer
            assert answer["error"]["code"] == "signed_before_start", answer  # type: ignore[index]
            assert await admin.ok("GET", "/v1/sites/shop-1") == before
            # Signed now, the same report is taken; a read signed earlier still is.
            fresh = sign_request(
                site.key, "shop-1", "POST", PATH, old, time.time(), host=url_host(hub.url)
            )
            status, answer = await post(site, old, fresh)
            assert status == 200, answer
            status, _ = await site.request("GET", "/v1/link/deltas?after=0&wait=0")
            assert status == 200
