"""`meshorch fleet export` from a real agent following a real hub process: the envelopes
the site applied, written by the CLI, are byte for byte the hub's export of that site's
view (`meshorch deltas export --site`), and verify offline; the record survives the
agent's restart (it is in Raft), and a viewer token of another tenant cannot read it."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHub, LocalSite, wait_ready
from tests.agent_token import HEADERS
from tests.fleet.hubs import running_hub
from tests.fleet.test_site_follows_hub import spec
from tests.fleet.test_snapshot_catch_up import Fleet, caught_up

pytestmark = pytest.mark.timeout(240)


@pytest.fixture
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("export")


@pytest.fixture
def hub(root: Path) -> Iterator[LocalHub]:
    with running_hub(root, "--delta-format", "2") as running:
        yield running


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, bytes, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", *args,
        env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await proc.communicate()
    assert proc.returncode is not None
    return proc.returncode, out, err.decode()


async def test_a_sites_record_is_the_hubs_view_of_it(hub: LocalHub, root: Path) -> None:
    shop = LocalSite(hosts=1, site="shop-1", root=root / "shop-1")
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
        await hub.wait_ready(session)
        fleet = Fleet(hub, session)
        await fleet.call("POST", "/v1/tenants", {"id": "blue"})
        await fleet.call("POST", "/v1/sites", {"id": "shop-2", "labels": {"shop": "two"}})
        try:
            shop.start()
            await fleet.link(shop, {"shop": "one"})
            mine = {"spec": spec("1.0"), "tenant": "blue", "placement": {"match": {"shop": "one"}}}
            await fleet.call("POST", "/v1/apps", mine)
            theirs = {"spec": spec("1.0", "till"), "placement": {"match": {"shop": "two"}}}
            await fleet.call("POST", "/v1/apps", theirs)  # shop-1 gets its header
            await fleet.call("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 3000})
            await fleet.call("POST", "/v1/fleet/rotate")
            head = await fleet.head()
            await caught_up(shop, head, 60)
            agent = shop.members[0].api
            hub_env = {"MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": hub.admin_token}

            code, site_log, err = await cli("fleet", "export", "--agent", agent)
            assert code == 0, err
            assert f"applied up to version {head}" in err
            code, hub_log, err = await cli("deltas", "export", "--site", "shop-1", env=hub_env)
            assert code == 0, err
            assert site_log == hub_log and len(site_log.splitlines()) == head
            code, full_log, err = await cli("deltas", "export", env=hub_env)
            assert code == 0 and full_log != site_log  # till's operations are not shop-1's

            (root / "site.jsonl").write_bytes(site_log)
            root_key = (await fleet.call("GET", "/v1/fleet"))["root_key"]
            code, out, err = await cli(
                "deltas", "verify", str(root / "site.jsonl"), "--site", "shop-1",
                "--root-key", root_key, "--head", str(head),
            )  # fmt: skip
            text = out.decode()
            assert code == 0, text + err
            assert "app.put blue/web version 1.0" in text
            assert "sites shop-2: operations not in this view" in text

            # From a version on; and kept in Raft: the same after the agent restarts.
            code, tail, _ = await cli("fleet", "export", "--agent", agent, "--since", "2")
            assert code == 0 and tail.splitlines() == site_log.splitlines()[2:]
            shop.stop()
            shop.start()
            async with shop.session() as agents:
                await wait_ready(agents, shop.members, timeout_s=60, members=1)
            code, again, err = await cli("fleet", "export", "--agent", agent)
            assert code == 0 and again == site_log, err

            # Who may read it: the agent's fleet.read (no token: refused before any work).
            url = f"{shop.members[0].url}/v1/fleet/applied"
            async with session.get(url) as response:
                assert response.status == 401
            async with session.get(url, headers=HEADERS) as response:
                assert response.status == 200
            async with session.get(url + "?after=-1", headers=HEADERS) as response:
                assert response.status == 400
            code, _, err = await cli(
                "fleet", "export", "--agent", agent, env={"MESHORCH_AGENT_TOKEN": ""}
            )
            assert code == 2 and "unauthenticated" in err, err
        finally:
            shop.stop()
            print(shop.logs())
