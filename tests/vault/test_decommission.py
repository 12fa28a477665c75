"""Decommissioning a site through a real hub: its applications stop, its secrets are wiped
(state, delivered files, keys in memory), it says so, and the hub forgets it."""

from __future__ import annotations

import asyncio
import sys

from meshorch.secrets.service import delivery_root
from tests.secrets.helpers import app_spec
from tests.vault.test_hub_secrets import (  # noqa: F401 (the fixture)
    SECRET,
    SITE,
    World,
    delivered,
    new_value,
    set_secret,
    world,
)
from tests.waiting import until


async def test_decommission_stops_work_wipes_secrets_and_the_hub_forgets_the_site(
    world: World,  # noqa: F811 (the fixture imported above)
) -> None:
    value = new_value()
    await set_secret(world, value)
    spec = app_spec("db", [{"name": SECRET, "env": "DB_PASSWORD"}])
    await world.agent("POST", world.hosts[0], "/v1/apps", spec)
    await delivered(world, value, timeout_s=30)

    command = [
        sys.executable, "-m", "meshorch", "site", "decommission", SITE, "--hub", world.hub.url,
        "--token", world.admin.token, "--wait", "--timeout", "60",
    ]  # fmt: skip
    process = await asyncio.create_subprocess_exec(
        *command, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    out, err = await process.communicate()
    assert process.returncode == 0, err.decode()
    assert f"{SITE}: decommissioned; the hub has forgotten it" in out.decode()

    status, answer = await world.admin.call("GET", f"/v1/sites/{SITE}")
    assert status == 404, answer
    host = world.hosts[1]
    assert (await world.agent("GET", host, "/v1/apps"))["apps"] == []
    assert (await world.agent("GET", host, "/v1/secrets"))["secrets"] == []
    for h in world.hosts:
        state = await world.agent("GET", h, "/v1/secrets/status?consistency=local")
        assert state["locked_down"] and state["sealed"], state

    async def nothing_left() -> bool:
        hosts = (await world.agent("GET", host, "/v1/hosts"))["hosts"]
        files = [
            p for h in world.hosts for p in delivery_root(h.data_dir).rglob("*") if p.is_file()
        ]
        return all(h["instances"] == 0 for h in hosts) and not files and not world.files()

    await until("instances stopped and secret files gone", nothing_left, 30)
