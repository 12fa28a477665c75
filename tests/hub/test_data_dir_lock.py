"""A second hub on a live hub's data dir refuses to start (meshorch.dirlock): no second
delta log, no port, the first's state unchanged; after a SIGKILL, a new hub starts there."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any

import aiohttp

from meshorch.demo.localsite import LocalHub
from meshorch.dirlock import LOCK_FILE
from tests.hub.helpers import Operator, Site, spec_text


async def fleet_info(session: aiohttp.ClientSession, hub: LocalHub) -> Any:
    async with session.get(f"{hub.url}/v1/fleet") as response:
        assert response.status == 200
        return await response.json()


def listing(data_dir: Path) -> set[str]:
    return {str(path.relative_to(data_dir)) for path in data_dir.rglob("*")}


def listens(port: int) -> bool:
    with socket.socket() as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


async def test_a_second_hub_on_the_data_dir_is_refused_until_the_first_dies(
    tmp_path: Path,
) -> None:
    data_dir = tmp_path / "hub"
    first = LocalHub(data_dir, fleet="locked", extra_args=["--no-gossip"])
    second = LocalHub(data_dir, fleet="locked", extra_args=["--no-gossip"])
    third = LocalHub(data_dir, fleet="locked", extra_args=["--no-gossip"])
    first.start()
    try:
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
            root_key = await first.wait_ready(session)
            assert first.process is not None
            admin = Operator(session, first.url, first.admin_token)
            site = Site(session, first.url, "shop-1", "locked", root_key)
            body = {"id": "shop-1", "public_key": site.public_key}
            await admin.ok("POST", "/v1/sites", body, 201)
            await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
            assert [d.version for d in (await site.sync()).accepted] == [1]
            before, files = await fleet_info(session, first), listing(data_dir)
            assert before["head"] == 1

            second.start()
            assert second.process is not None
            assert second.process.wait(timeout=60) != 0
            message = second.logs()
            assert f"data dir {data_dir} is in use" in message
            assert f"meshorch hub, pid {first.process.pid}" in message
            assert "stop that process first, or give this one another --data-dir" in message
            assert "Traceback" not in message
            assert not listens(second.port)
            # the first serves on, its log as it was: no second version 1, nothing new
            assert first.process.poll() is None
            assert await fleet_info(session, first) == before
            assert (await site.sync()).accepted == []
            assert listing(data_dir) == files
            assert (data_dir / LOCK_FILE).read_text() == f"{first.process.pid} meshorch hub\n"

            first.kill()  # SIGKILL: the kernel drops the lock with the process
            third.start()
            assert await third.wait_ready(session) == root_key
            assert await fleet_info(session, third) == before
            assert third.process is not None
            assert (data_dir / LOCK_FILE).read_text() == f"{third.process.pid} meshorch hub\n"
    finally:
        for hub in (first, second, third):
            hub.stop()
