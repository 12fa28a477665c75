"""`meshorch deltas export` against a real hub, and `meshorch deltas verify` on what it
wrote (both the real CLI, in subprocesses): a log the hub issued verifies and says what
each delta did; each way of spoiling it is reported with its version and reason; a site's
view is byte for byte what the site received over its link; who may export."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from central_hub import Hub
from tests.hub.conftest import MakeSite, admin_token, hub_config
from tests.hub.helpers import Operator, Site, spec_text

pytestmark = pytest.mark.timeout(120)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    # Format 2: per-site views, so that a site's export differs from the hub's.
    async with Hub(hub_config(tmp_path / "hub", delta_format=2)) as running:
        yield running


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


def hub_env(hub: Hub, token: str | None = None) -> dict[str, str]:
    return {"MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": token or admin_token(hub)}


async def issue_deltas(hub: Hub, admin: Operator, make_site: MakeSite) -> Site:
    """App, quota and lock-down deltas for two sites, a root rotation in the middle."""
    shop = await make_site("shop-1", shop="one")
    await make_site("shop-2", shop="two")
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    body = {"spec": spec_text(name="web", version="1.0"), "tenant": "blue",
            "placement": {"match": {"shop": "one"}}}  # fmt: skip
    await admin.ok("POST", "/v1/apps", body, 202)
    other = {"spec": spec_text(name="till"), "placement": {"match": {"shop": "two"}}}
    await admin.ok("POST", "/v1/apps", other, 202)
    quota = {"cpu_millis": 2000, "memory_bytes": None, "instances": 5}
    await admin.ok("PUT", "/v1/tenants/blue/quota", quota)
    await admin.ok("POST", "/v1/fleet/rotate")
    await admin.ok("DELETE", "/v1/apps/till?confirm=1")
    return shop


async def export(hub: Hub, path: Path, *extra: str) -> str:
    code, _, err = await cli("deltas", "export", "-f", str(path), *extra, env=hub_env(hub))
    assert code == 0, err
    return err


async def verify(path: Path, key: str, *extra: str) -> tuple[int, str]:
    code, out, err = await cli("deltas", "verify", str(path), "--root-key", key, *extra)
    assert code in (0, 1), err  # 2 would be a usage error
    return code, out


async def test_export_then_verify_prints_what_each_delta_did(
    hub: Hub, admin: Operator, make_site: MakeSite, tmp_path: Path
) -> None:
    first_key = hub.root_key
    await issue_deltas(hub, admin, make_site)
    log = tmp_path / "log.jsonl"
    said = await export(hub, log)
    head = hub.head
    assert f"versions 1 to {head.version}" in said and head.hash in said
    lines = log.read_bytes().splitlines()
    assert len(lines) == head.version
    # Byte for byte what the hub stores and serves.
    stored = hub.parts.ledger.deltas_after(0, 500)
    assert [raw for _, raw in stored] == lines
    for key in (first_key, hub.root_key):  # the key at the start, or the key now
        code, out = await verify(log, key, "--head", f"{head.version}:{head.hash}")
        assert code == 0, out
        assert f"OK: versions 1 to {head.version}" in out
        assert "sites shop-1: app.put blue/web version 1.0" in out
        assert "app.put default/till version 1.0" in out
        assert "tenant.quota blue: cpu_millis=2000, instances=5, memory_bytes=None" in out
        assert f"root.rotate to key {hub.root_key}" in out
        assert "app.delete default/till (confirmed: 1 site(s))" in out
    # From a version on (as after a compaction): anchored at its first delta.
    later = tmp_path / "later.jsonl"
    await export(hub, later, "--since", "2")
    code, out = await verify(later, hub.root_key)
    assert code == 0 and "from version 3's prev" in out, out


async def test_every_spoiled_log_is_reported_with_its_version_and_reason(
    hub: Hub, admin: Operator, make_site: MakeSite, tmp_path: Path
) -> None:
    await issue_deltas(hub, admin, make_site)
    log = tmp_path / "log.jsonl"
    await export(hub, log)
    lines = log.read_bytes().splitlines()
    key = hub.root_key

    async def spoiled(name: str, new_lines: list[bytes], *extra: str) -> str:
        path = tmp_path / f"{name}.jsonl"
        path.write_bytes(b"".join(line + b"\n" for line in new_lines))
        code, out = await verify(path, key, *extra)
        assert code == 1, out
        return out.strip().splitlines()[-1]

    envelope = orjson.loads(lines[2])
    envelope["body"] = envelope["body"].replace('"v":2', '"v":2 ')  # one byte more, signed no more
    tampered = [*lines[:2], orjson.dumps(envelope), *lines[3:]]
    assert await spoiled("tampered", tampered) == (
        "FAILED: version 3 line 3: bad_signature: signature by "
        f"{envelope['sigs'][0]['key'][:12]}... does not verify"
    )
    reordered = [*lines[:3], lines[4], lines[3], *lines[5:]]
    assert (await spoiled("reordered", reordered)).startswith(
        "FAILED: version 5 line 4: out_of_order: version 5 comes before version 4 (line 5)"
    )
    wrong = await cli("deltas", "verify", str(log), "--root-key", "ab" * 32)
    assert wrong[0] == 1 and "FAILED: version 1 line 1: wrong_root" in wrong[1], wrong
    head = hub.head.version
    assert await spoiled("truncated", lines[:-2], "--head", str(head)) == (
        f"FAILED: version {head - 2} line {head - 2}: truncated: the log ends at version "
        f"{head - 2}, the head is {head}: version {head - 1} and after are missing"
    )
    assert await spoiled("gap", [*lines[:2], *lines[3:]]) == (
        "FAILED: version 4 line 3: gap: version 3 missing before version 4"
    )
    # Expired as of a time after the last delta's expiry (the hub's TTL: 7 days).
    week = time.time() + 8 * 24 * 3600
    last = await spoiled("expired", lines, "--at", str(week))
    # Delta 1 is the first one a site would refuse then: nothing later is fresh.
    assert last.startswith("FAILED: version 1 line 1: expired: expired 864"), last
    day = time.time() + 24 * 3600
    assert (await verify(log, key, "--at", str(day)))[0] == 0
    iso = time.strftime("%Y-%m-%dT%H:%M:%S+00:00", time.gmtime(week))
    assert (await spoiled("expired-iso", lines, "--at", iso)).startswith("FAILED: version 1 ")
    # A usage error is not a verdict.
    code, _, err = await cli("deltas", "verify", str(log), "--root-key", "xyz")
    assert code == 2 and "--root-key" in err


async def test_a_sites_export_is_what_the_site_received(
    hub: Hub, admin: Operator, make_site: MakeSite, tmp_path: Path
) -> None:
    shop = await issue_deltas(hub, admin, make_site)
    _, received = await shop.fetch()  # what the site gets over its link
    assert len(received) == hub.head.version
    log = tmp_path / "shop-1.jsonl"
    await export(hub, log, "--site", "shop-1")
    assert log.read_bytes().splitlines() == received
    full = tmp_path / "full.jsonl"
    await export(hub, full)
    assert full.read_bytes() != log.read_bytes()  # shop-2's operations are not in its view
    code, out = await verify(log, hub.root_key, "--site", "shop-1")
    assert code == 0, out
    assert "sites shop-2: operations not in this view (for sites shop-2)" in out
    code, out = await verify(log, hub.root_key)  # a site's view needs --site
    assert code == 1 and "ops_missing" in out and "give the site" in out


async def test_who_may_export(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    tenant_admin = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    audit_before = len((await admin.ok("GET", "/v1/audit?limit=500"))["entries"])
    async with session.get(hub.url + "/v1/deltas/export") as resp:
        assert resp.status == 401
    status, answer = await admin.call("GET", "/v1/deltas/export", token=tenant_admin["token"])
    assert (status, answer["error"]["code"]) == (403, "forbidden")
    # The refusal is audited, and nothing else happened.
    entries = (await admin.ok("GET", f"/v1/audit?after={audit_before}"))["entries"]
    assert [e["outcome"] for e in entries] == ["refused 403"]
    code, _, err = await cli("deltas", "export", env=hub_env(hub, tenant_admin["token"]))
    assert code == 2 and "403" in err and "forbidden" in err
    code, _, err = await cli(
        "deltas", "export", env={"MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": ""}
    )
    assert code == 2 and "token" in err
    # A fleet-wide viewer may: the export is a read.
    await admin.ok("POST", "/v1/fleet/rotate")
    code, out, err = await cli("deltas", "export", env=hub_env(hub, viewer["token"]))
    assert code == 0, err
    assert len(out.splitlines()) == 1


async def test_an_export_from_below_the_compaction_is_refused_and_says_from_where(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = hub_config(tmp_path / "hub", delta_keep=2, compact_every_s=3600)
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        # A site that never reported holds the log: only the bound (2 deltas) compacts.
        await admin.ok("POST", "/v1/sites", {"id": "shop-1", "public_key": "ab" * 32}, 201)
        for _ in range(5):
            await admin.ok("POST", "/v1/fleet/rotate")
        compacted = await hub.parts.snapshots.compact()
        assert compacted == 3
        code, _, err = await cli("deltas", "export", env=hub_env(hub))
        assert code == 2 and "410" in err and "after=3" in err, err
        log = tmp_path / "tail.jsonl"
        await export(hub, log, "--since", "3")
        code, out = await verify(log, hub.root_key, "--head", str(hub.head.version))
        assert code == 0 and "OK: versions 4 to 5" in out, out
