"""Secrets through a real hub to a site of real agents (process runtime, loopback).

An in-process hub and one three-host site linked to it by the agent flags. A secret set at
the hub reaches a container's file with its exact value (the hub POST -> file latency is
measured), new versions replace it, rotation keeps it readable, and no value rests in any
file of the hub's or the site's data dirs. Lock-down through the hub stops delivery at
once and survives a full restart of the site; unlock, then an operator's approval at the
hub, lets the site unseal itself from the hub's escrow and delivery resumes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import statistics
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest

from central_hub import Hub, HubConfig
from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from meshorch.secrets.service import delivery_root
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.hub.helpers import Operator
from tests.secrets.helpers import app_spec, scan_for
from tests.waiting import until

SITE = "shop-1"
SECRET = "db-password"
SAMPLES = 5


@dataclass
class World:
    hub: Hub
    admin: Operator
    session: aiohttp.ClientSession
    site: LocalSite
    hub_dir: Path

    @property
    def hosts(self) -> list[LocalHost]:
        return self.site.members

    async def agent(self, method: str, host: LocalHost, path: str, body: object = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(method, f"{host.url}{path}", data=data) as response:
            answer = await response.json(content_type=None)
            assert response.status == 200, (path, response.status, answer)
            return answer

    async def statuses(self) -> list[dict[str, Any]]:
        return [
            await self.agent("GET", h, "/v1/secrets/status?consistency=local") for h in self.hosts
        ]

    def files(self) -> list[bytes]:
        """The contents of every delivered copy of the secret on the site's hosts."""
        found = []
        for host in self.hosts:
            for path in delivery_root(host.data_dir).rglob(SECRET):
                with contextlib.suppress(OSError):
                    found.append(path.read_bytes())
        return found

    async def hub_site(self) -> dict[str, Any]:
        return dict(await self.admin.ok("GET", f"/v1/sites/{SITE}"))


@pytest.fixture
async def world(tmp_path: Path) -> AsyncIterator[World]:
    config = HubConfig(
        data_dir=tmp_path / "hub", port=0, insecure_http=True, tick_s=0.05, gossip=False
    )
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=HEADERS) as session,
    ):
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        created = await admin.ok("POST", "/v1/sites", {"id": SITE}, 201)
        site = linked_site(tmp_path / "site", hub, SITE, created["enroll_token"])
        site.start()
        try:
            await wait_ready(session, site.members, timeout_s=30)
            yield World(hub, admin, session, site, tmp_path / "hub")
        finally:
            site.stop()


async def set_secret(world: World, value: bytes) -> dict[str, Any]:
    status = 200 if world.hub.vault._records() else 201
    body = {"name": SECRET, "value": value.decode()}
    return dict(await world.admin.ok("POST", "/v1/secrets", body, status=status))


async def delivered(world: World, value: bytes, timeout_s: float = 20.0) -> float:
    """Seconds until a container's file holds ``value`` exactly."""
    start = time.monotonic()
    await until(f"{value[:6]!r} delivered", lambda: value in world.files(), timeout_s)
    return time.monotonic() - start


def new_value() -> bytes:
    return b"pw-" + os.urandom(12).hex().encode()


async def test_secrets_flow_through_the_hub_with_lockdown_and_unseal(world: World) -> None:
    admin = world.admin

    # The site's report brings its secrets key; its leader escrows the unseal key.
    async def escrowed() -> bool:
        view = (await world.hub_site())["secrets"]
        return bool(view["public_key"] and view["escrowed"] == view["public_key"])

    await until("the site's key and escrow at the hub", escrowed, 30)

    await world.agent("POST", world.hosts[0], "/v1/apps",
                      app_spec("db", [{"name": SECRET, "env": "DB_PASSWORD"}]))  # fmt: skip

    values: list[bytes] = []
    latencies = []
    for _ in range(SAMPLES):
        value = new_value()
        values.append(value)
        start = time.monotonic()
        answer = await set_secret(world, value)
        assert "value" not in answer and "ciphertext" not in answer
        await delivered(world, value)
        latencies.append(time.monotonic() - start)
    median = statistics.median(latencies)
    print(f"\nsecret delivery hub POST -> container file: median {median * 1000:.0f} ms "
          f"over {SAMPLES} ({', '.join(f'{s * 1000:.0f}' for s in latencies)} ms)")  # fmt: skip
    Path(os.environ.get("VAULT_LATENCY_FILE", "/dev/null")).write_text(f"{median}\n")

    listing = await admin.ok("GET", "/v1/secrets")
    (item,) = listing["secrets"]
    assert item["version"] == SAMPLES and item["targets"] == [SITE]

    async def site_state_ready() -> bool:
        one = await admin.ok("GET", f"/v1/secrets/{SECRET}")
        return bool(one["sites"][SITE]["state"] == "ready" and
                    one["sites"][SITE]["site_version"] == SAMPLES)  # fmt: skip

    await until("the site reports the version ready", site_state_ready)

    # Rotation through the hub keeps the secret readable (a new version still delivered).
    before = (await world.statuses())[0]["current_data_key"]
    await admin.ok("POST", f"/v1/sites/{SITE}/secrets/rotate", {})

    async def rotated() -> bool:
        status = (await world.statuses())[0]
        return bool(status["current_data_key"] > before and status["data_keys"] == [
            status["current_data_key"]])  # fmt: skip

    await until("the data keys rotated", rotated)
    value = new_value()
    values.append(value)
    await set_secret(world, value)
    await delivered(world, value)

    # Lock-down through the hub: every host drops its keys; a new version is not delivered.
    await admin.ok("POST", f"/v1/sites/{SITE}/lockdown", {})

    async def all_locked() -> bool:
        return all(s["locked_down"] and s["sealed"] for s in await world.statuses())

    await until("every host locked down", all_locked)
    assert (await world.hub_site())["secrets"]["locked_down"] is True
    status, refused = await admin.call("POST", f"/v1/sites/{SITE}/unseal", {})
    assert status == 409 and refused["error"]["code"] == "locked_down"
    held = new_value()
    values.append(held)
    await set_secret(world, held)
    await asyncio.sleep(1.5)
    assert held not in world.files()

    # It survives a full restart of the site.
    for host in world.hosts:
        world.site.stop_host(host)
    for host in world.hosts:
        world.site.start_host(host)
    await wait_ready(world.session, world.hosts, timeout_s=30)
    await until("still locked down after the restart", all_locked)
    await asyncio.sleep(1.0)
    assert held not in world.files()

    # Unlock: the site is sealed; without an approval it stays so (and the hub refuses).
    await admin.ok("POST", f"/v1/sites/{SITE}/unlock", {})

    async def unlocked_sealed() -> bool:
        return all(not s["locked_down"] and s["sealed"] for s in await world.statuses())

    await until("unlocked, sealed", unlocked_sealed)
    await asyncio.sleep(1.5)
    assert all(s["sealed"] for s in await world.statuses())

    # The operator approves: the leader unseals from the hub, the others from it.
    approval = await admin.ok("POST", f"/v1/sites/{SITE}/unseal", {})
    assert approval["expires_at"] - approval["approved_at"] == 600

    async def all_unsealed() -> bool:
        return all(not s["sealed"] for s in await world.statuses())

    await until("every host unsealed", all_unsealed, 20)
    await delivered(world, held)
    assert (await world.hub_site())["secrets"]["unseal_approved_until"] is None  # used

    # No value rests in any file of the hub's or the site's data dirs (LMDB, Raft journal
    # and dumps, logs), raw, base64 or hex.
    roots = [world.hub_dir] + [h.data_dir for h in world.hosts]
    assert world.site.root is not None
    roots.append(world.site.root)
    assert scan_for(roots, values) == []

    # Every change and access is in the hub's audit log.
    log = await admin.ok("GET", "/v1/audit?limit=500")
    actions = {e["action"] for e in log["entries"]}
    assert {"secrets.write", "site.lockdown", "site.unlock", "site.unseal.approve",
            "site.escrow", "site.unseal", "secrets.rotate"} <= actions  # fmt: skip
    assert not any(v.decode() in orjson.dumps(log).decode() for v in values)
