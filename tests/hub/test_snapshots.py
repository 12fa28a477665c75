"""Signed snapshots and the compaction of the delta log, against a real hub (in process):
who may fetch a snapshot, what it holds (only the site's own desired state), how a site
verifies it (root rotations, forgeries), and catching up from below the compaction."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from central_hub import Hub
from meshorch.fleet.delta import TrustState
from meshorch.fleet.link_auth import sign_request, url_host
from meshorch.fleet.snapshot import Snapshot, SnapshotRejected, sign_snapshot, verify_snapshot
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, Site, spec_text

SECRET_ENV = "red-password-123"


def red_spec() -> str:
    return spec_text(name="redapp") + f"        env:\n          DB_PASSWORD: {SECRET_ENV}\n"


async def get_snapshot(site: Site, after: int | None = None) -> tuple[bytes, list[bytes]]:
    after = site.trust.version if after is None else after
    status, answer = await site.request("GET", f"/v1/link/snapshot?after={after}")
    assert status == 200, answer
    return orjson.dumps(answer["snapshot"]), [orjson.dumps(r) for r in answer["rotations"]]


async def new_site(hub: Hub, admin: Operator, session: aiohttp.ClientSession, name: str) -> Site:
    site = Site(session, hub.url, name, hub.fleet, hub.root_key)
    body = {"id": name, "labels": {"shop": name}, "public_key": site.public_key}
    await admin.ok("POST", "/v1/sites", body, 201)
    return site


async def two_tenants(hub: Hub, admin: Operator, session: aiohttp.ClientSession) -> list[Site]:
    """blue's app on shop-b, red's (with an env value) on shop-r."""
    sites = [await new_site(hub, admin, session, n) for n in ("shop-b", "shop-r")]
    for tenant in ("blue", "red"):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    blue = {"spec": spec_text(name="blueapp"), "tenant": "blue",
            "placement": {"match": {"shop": "shop-b"}}}  # fmt: skip
    red = {"spec": red_spec(), "tenant": "red", "placement": {"match": {"shop": "shop-r"}}}
    await admin.ok("POST", "/v1/apps", blue, 202)
    await admin.ok("POST", "/v1/apps", red, 202)
    return sites


async def test_a_snapshot_holds_only_the_sites_own_desired_state(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    blue_site, red_site = await two_tenants(hub, admin, session)
    raw, rotations = await get_snapshot(blue_site)
    assert SECRET_ENV.encode() not in raw and b"redapp" not in raw
    snapshot, after = verify_snapshot(raw, rotations, blue_site.trust, "shop-b", time.time())
    names = [op.op["spec"]["name"] for op in snapshot.ops if op.op["op"] == "app.put"]
    assert names == ["blueapp"]
    assert after.version == hub.head.version and after.head == hub.head.hash
    raw, rotations = await get_snapshot(red_site)
    snapshot, _ = verify_snapshot(raw, rotations, red_site.trust, "shop-r", time.time())
    assert [op.op["spec"]["name"] for op in snapshot.ops if op.op["op"] == "app.put"] == ["redapp"]
    # The tail chains onto it: a delta issued now is accepted from the snapshot's state.
    await admin.ok("DELETE", "/v1/apps/blueapp?confirm=1")
    blue_site.trust = after
    result = await blue_site.sync()
    assert result.accepted[-1].version == hub.head.version


async def test_only_the_signed_site_gets_a_snapshot(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    blue_site, _red_site = await two_tenants(hub, admin, session)
    path = "/v1/link/snapshot?after=0"
    async with session.get(hub.url + path) as resp:  # no signature
        assert resp.status == 401
        assert (await resp.json())["error"]["code"] == "bad_site_signature"
    # blue's key claiming to be red: refused; nothing of red's answered.
    headers = sign_request(
        blue_site.key, "shop-r", "GET", path, b"", time.time(), host=url_host(hub.url)
    )
    async with session.get(hub.url + path, headers=headers) as resp:
        assert resp.status == 401
        assert b"redapp" not in await resp.read()
    # An unknown key.
    stranger = SigningKey.generate()
    headers = sign_request(
        stranger, "shop-b", "GET", path, b"", time.time(), host=url_host(hub.url)
    )
    async with session.get(hub.url + path, headers=headers) as resp:
        assert resp.status == 401
    raw, _ = await get_snapshot(blue_site)
    assert orjson.loads(orjson.loads(raw)["body"])["site"] == "shop-b"


async def test_rotations_and_forged_snapshots(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    blue_site, red_site = await two_tenants(hub, admin, session)
    old_trust = blue_site.trust
    await admin.ok("POST", "/v1/fleet/rotate")
    await admin.ok("POST", "/v1/fleet/rotate")
    raw, rotations = await get_snapshot(blue_site)
    assert len(rotations) == 2
    now = time.time()
    snapshot, after = verify_snapshot(raw, rotations, old_trust, "shop-b", now)
    assert after.trusted_keys == {hub.root_key}
    good = Snapshot(
        hub.fleet, "shop-b", snapshot.version, snapshot.head, now, now + 60, snapshot.ops
    )

    def refused(raw: bytes, rotations: list[bytes], trust: TrustState = old_trust) -> str:
        with pytest.raises(SnapshotRejected) as caught:
            verify_snapshot(raw, rotations, trust, "shop-b", now)
        return caught.value.reason

    # Without the rotations the new root key is not trusted.
    assert refused(raw, []) == "unknown_key"
    # Rotations out of order, or a rotation cut short, are refused.
    assert refused(raw, rotations[::-1]) == "unknown_key"
    assert refused(raw, rotations[:1]) == "unknown_key"
    # Signed by a key that is not a root key (a site's key, or any other).
    assert refused(sign_snapshot(good, [blue_site.key]), rotations) == "unknown_key"
    # Another site's snapshot, properly signed.
    red_raw, red_rotations = await get_snapshot(red_site, after=0)
    assert refused(red_raw, red_rotations) == "wrong_site"
    # A tampered body: an app added after signing.
    envelope = orjson.loads(raw)
    body = orjson.loads(envelope["body"])
    body["ops"].append({"at": 1, "op": {"op": "app.delete", "name": "x"}})
    envelope["body"] = orjson.dumps(body, option=orjson.OPT_SORT_KEYS).decode()
    assert refused(orjson.dumps(envelope), rotations) == "bad_signature"
    # Another fleet (signed by the right key, for all that).
    root = SigningKey(bytes.fromhex((hub.data_dir / "fleet-root.key").read_text().strip()))
    other = Snapshot("other", "shop-b", good.version, good.head, now, now + 60, good.ops)
    assert refused(sign_snapshot(other, [root]), rotations) == "wrong_fleet"
    # Older than (or the same as) what the site applied: a replay.
    assert refused(sign_snapshot(good, [root]), [], after) == "replay"
    ahead = TrustState(after.fleet, after.trusted_keys, after.version + 5, after.head)
    assert refused(sign_snapshot(good, [root]), [], ahead) == "rollback"
    # Expired.
    stale = Snapshot(hub.fleet, "shop-b", good.version, good.head, now - 9, now - 1, good.ops)
    assert refused(sign_snapshot(stale, [root]), rotations) == "expired"
    assert refused(b"garbage", rotations) == "malformed"


@pytest.fixture
async def compacting_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    config = hub_config(tmp_path / "hub", delta_keep=3, compact_every_s=0.05)
    async with Hub(config) as running:
        yield running


async def test_compaction_and_catching_up_from_below_it(
    compacting_hub: Hub, session: aiohttp.ClientSession
) -> None:
    hub = compacting_hub
    admin = Operator(session, hub.url, admin_token(hub))
    blue_site, _red_site = await two_tenants(hub, admin, session)
    await admin.ok("POST", "/v1/fleet/rotate")
    for i in range(12):
        await admin.ok("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 1000 + i})
    head = hub.head.version
    # The sites never reported: only the bound compacts.
    deadline = time.monotonic() + 10
    while hub.parts.snapshots.compacted < head - 3:
        assert time.monotonic() < deadline, "not compacted"
        await hub.parts.snapshots.compact()
    status, answer = await blue_site.request("GET", "/v1/link/deltas?after=0&wait=0")
    assert status == 410 and answer["error"]["code"] == "compacted"
    assert "snapshot" in answer["error"]["message"]
    # Catch up: the snapshot (its rotation proof kept across the compaction), then the tail.
    raw, rotations = await get_snapshot(blue_site)
    snapshot, blue_site.trust = verify_snapshot(
        raw, rotations, blue_site.trust, "shop-b", time.time()
    )
    quotas = [op.op for op in snapshot.ops if op.op["op"] == "tenant.quota"]
    assert len(quotas) == 1 and quotas[0]["cpu_millis"] == 1011
    await admin.ok("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 7})
    result = await blue_site.sync()
    assert result.state is not None and result.state.version == hub.head.version
