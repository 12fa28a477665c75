"""Revoking a host changes the cluster password on every remaining host, with no restart:
against a real 4-host site on loopback, the revoked host's password is refused on the Raft
port afterwards, the site keeps writing, and a host restarted with the old password file
takes the new password from its own copy of the state."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHost, LocalSite, get_status, wait_ready
from tests.raft.test_password import greeting_answered
from tests.security.conftest import running_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    yield from running_site(tmp_path_factory, hosts=4, name="hosts")


async def rotation_of(session: aiohttp.ClientSession, host: LocalHost) -> dict[str, Any]:
    status = await get_status(session, host)
    assert status is not None, f"{host.host_id} does not answer"
    rotation: dict[str, Any] = status["cluster_password"]
    return rotation


async def put_then_read(
    session: aiohttp.ClientSession, writer: LocalHost, reader: LocalHost, key: str
) -> None:
    async with session.put(f"{writer.url}/v1/kv/{key}", data=b"v") as response:
        assert response.status == 200, await response.text()
    async with session.get(f"{reader.url}/v1/kv/{key}") as response:
        assert response.status == 200, await response.text()


async def test_revoking_a_host_rotates_the_cluster_password(
    site: LocalSite, admin: aiohttp.ClientSession
) -> None:
    h1, h2, h3, h4 = site.members
    old_password = site.password_file.read_text().strip()
    assert await asyncio.to_thread(greeting_answered, h2.raft, old_password)
    assert (await rotation_of(admin, h1))["generation"] == 0

    async with admin.delete(f"{h1.url}/v1/members/h4") as response:
        assert response.status == 200, await response.text()
    site.stop_host(h4)
    remaining = [h1, h2, h3]
    deadline = time.monotonic() + 60
    while True:
        rotations = [await rotation_of(admin, h) for h in remaining]
        if all(
            r["generation"] == 1 and r["step"] == "done" and not r["waiting_for"] for r in rotations
        ):
            break
        assert time.monotonic() < deadline, rotations
        await asyncio.sleep(0.2)

    # What the revoked host knew opens no Raft connection any more, on any host.
    for host in remaining:
        refused = not await asyncio.to_thread(greeting_answered, host.raft, old_password)
        assert refused, (host.host_id, rotations)
    await put_then_read(admin, h2, h3, "after-rotation")

    # Restarted with the old --cluster-password-file, a host still finds its way back.
    site.stop_host(h3)
    site.start_host(h3)
    site.members.remove(h4)
    await wait_ready(admin, remaining, timeout_s=60)
    await put_then_read(admin, h1, h3, "after-restart")
    async with admin.get(f"{h3.url}/v1/kv/after-restart?consistency=local") as response:
        assert response.status == 200
