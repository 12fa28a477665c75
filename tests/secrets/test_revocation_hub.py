"""Revoking the host that leads (and holds the keys), on a site of three real agents
linked to a real in-process hub.

Another host takes the lead and rekeys; the hub learns the new site key from the site's
report and seals the next secret to it (the revoked host's site key does not open that
delta), and the hub's escrow is refreshed with the new unseal key: after a full restart
of the remaining hosts, the operator's approval at the hub unseals them."""

from __future__ import annotations

import base64
import contextlib
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.public import PrivateKey

from central_hub import Hub, HubConfig
from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from meshorch.fleet.delta import parse
from meshorch.secrets.keyring import Tampered, open_sealed
from meshorch.secrets.service import delivery_root
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.hub.helpers import Operator
from tests.secrets.helpers import app_spec
from tests.secrets.test_revocation_rekey import opened_by, stored_snapshot
from tests.waiting import until

SITE = "shop-1"
SECRET = "db-password"


@dataclass
class World:
    hub: Hub
    admin: Operator
    session: aiohttp.ClientSession
    site: LocalSite

    async def agent(self, method: str, host: LocalHost, path: str, body: object = None) -> Any:
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(method, f"{host.url}{path}", data=data) as response:
            answer = await response.json(content_type=None)
            assert response.status == 200, (path, response.status, answer)
            return answer

    async def status(self, host: LocalHost) -> dict[str, Any]:
        return dict(await self.agent("GET", host, "/v1/secrets/status?consistency=local"))

    async def hub_secrets(self) -> dict[str, Any]:
        return dict((await self.admin.ok("GET", f"/v1/sites/{SITE}"))["secrets"])

    def files(self, hosts: list[LocalHost]) -> list[bytes]:
        found = []
        for host in hosts:
            for path in delivery_root(host.data_dir).rglob(SECRET):
                with contextlib.suppress(OSError):
                    found.append(path.read_bytes())
        return found

    async def set_secret(self, value: bytes, status: int) -> None:
        await self.admin.ok("POST", "/v1/secrets", {"name": SECRET, "value": value.decode()},
                            status=status)  # fmt: skip

    def sealed_for_site(self, version: int) -> list[bytes]:
        """The blobs the hub sealed for this site in its ``secret.put`` deltas."""
        blobs = []
        for _, raw in self.hub.deltas_after(0, 10_000):
            delta, _, _ = parse(raw)
            for op in delta.ops:
                wanted = op.get("op") == "secret.put" and op.get("version") == version
                if wanted and SITE in op["sealed"]:
                    blobs.append(base64.b64decode(op["sealed"][SITE]))
        return blobs


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
            yield World(hub, admin, session, site)
        finally:
            site.stop()
            print(site.logs())


async def test_revoking_the_leader_rekeys_and_the_hub_follows(world: World) -> None:
    async def escrowed() -> bool:
        view = await world.hub_secrets()
        return bool(view["public_key"] and view["escrowed"] == view["public_key"])

    await until("the site's key and escrow at the hub", escrowed, 30)
    hosts = world.site.members
    await world.agent("POST", hosts[0], "/v1/apps", app_spec("db", [{"name": SECRET}]))
    v1 = b"pw-" + os.urandom(8).hex().encode()
    await world.set_secret(v1, 201)
    await until("v1 delivered", lambda: v1 in world.files(hosts), 30)
    old_public = (await world.status(hosts[0]))["public_key"]

    # The leader holds the keys: revoke it (it hands the lead over first).
    statuses = await wait_ready(world.session, hosts)
    leader_address = next(iter(statuses.values()))["leader"]
    victim = next(h for h in hosts if leader_address in (h.raft, h.host_id))
    remaining = [h for h in hosts if h is not victim]
    mine = PrivateKey.generate()
    answer = await world.agent("POST", victim, "/v1/secrets/escrow",
                               {"public_key": bytes(mine.public_key).hex()})  # fmt: skip
    old_kek = open_sealed(mine, base64.b64decode(answer["sealed_key"]))
    async with world.session.delete(f"{remaining[0].url}/v1/members/{victim.host_id}") as response:
        assert response.status == 200, await response.text()
    world.site.stop_host(victim)
    stolen = stored_snapshot(victim.data_dir)
    assert stolen.keyring is not None
    old_ssk = stolen.keyring.open(old_kek)

    async def rekeyed() -> str | None:
        states = [await world.status(h) for h in remaining]
        keys = {s["public_key"] for s in states}
        done = all(not s["sealed"] and s["keyring_generation"] == 2 for s in states)
        return keys.pop() if done and len(keys) == 1 else None

    new_public = await until("the remaining hosts rekeyed", rekeyed, 30)
    assert new_public != old_public

    # The hub learns the new key from the report, and escrows the new unseal key (the
    # leader uploads it when the key the hub holds is not for its current site key).
    async def hub_follows() -> bool:
        view = await world.hub_secrets()
        return bool(view["public_key"] == new_public and view["escrowed"] == new_public)

    await until("the hub has the new site key and escrow", hub_follows, 60)

    # A secret set now is sealed to the new key: the revoked host's site key opens none
    # of it, and it reaches the container.
    v2 = b"pw-" + os.urandom(8).hex().encode()
    await world.set_secret(v2, 200)
    await until("v2 delivered", lambda: v2 in world.files(remaining), 30)
    blobs = world.sealed_for_site(2)
    assert blobs
    for blob in blobs:
        with pytest.raises(Tampered):
            open_sealed(old_ssk, blob)

    # The escrow holds the new unseal key: a full restart, then the hub unseals the site.
    answer = await world.agent("POST", remaining[0], "/v1/secrets/escrow",
                               {"public_key": bytes(mine.public_key).hex()})  # fmt: skip
    new_kek = open_sealed(mine, base64.b64decode(answer["sealed_key"]))
    for host in remaining:
        world.site.stop_host(host)
    stored = stored_snapshot(remaining[0].data_dir)
    assert stored.keyring is not None
    assert opened_by(old_kek, stored) == [] and opened_by(new_kek, stored)
    assert all(open_sealed(stored.keyring.open(new_kek), b) == v2 for b in blobs)
    for host in remaining:
        world.site.start_host(host)
    await wait_ready(world.session, remaining, timeout_s=30)

    async def all_sealed() -> bool:
        return all([(await world.status(h))["sealed"] for h in remaining])

    await until("sealed after the restart", all_sealed)
    await world.admin.ok("POST", f"/v1/sites/{SITE}/unseal", {})

    async def all_unsealed() -> bool:
        return all([not (await world.status(h))["sealed"] for h in remaining])

    await until("unsealed from the hub's escrow", all_unsealed, 30)
    assert (await world.status(remaining[0]))["public_key"] == new_public
