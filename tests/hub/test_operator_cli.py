"""`meshorch deploy/sites/apps` against a real hub subprocess, with sites that speak the
real link protocol (signed requests, verified deltas) and report what the test decides."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from nacl.signing import SigningKey

from meshorch.demo.localsite import LocalHub
from meshorch.fleet.client import LinkClient, LinkError
from meshorch.fleet.delta import TrustState, verify_batch

APP = """\
api_version: meshorch/v1
name: shop
version: "{version}"
services:
  - name: web
    containers:
      - name: main
        image: process
        command: ["sleep", "1000"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
placement:
  match: {{region: eu}}
"""


class LightSite:
    """A site without agents: follows the link, verifies, reports a chosen app state."""

    def __init__(self, hub_url: str, site_id: str, root_key: str, app_state: str) -> None:
        self.key = SigningKey.generate()
        self.site_id = site_id
        self.trust = TrustState("cli", frozenset({root_key}))
        self.app_state = app_state  # healthy | failed | silent
        self.apps: dict[str, str] = {}  # name -> version run
        self.client = LinkClient(hub_url, site_id, self.key)

    async def run(self) -> None:
        async with self.client:
            while True:
                try:
                    _, raws = await self.client.fetch(self.trust.version, wait_s=1.0)
                except LinkError:
                    await asyncio.sleep(0.1)
                    continue
                result = verify_batch(raws, self.trust, time.time())
                for delta in result.accepted:
                    if not delta.target.includes(self.site_id):
                        continue
                    for op in delta.ops:
                        if op["op"] == "app.put":
                            self.apps[op["spec"]["name"]] = op["spec"]["version"]
                if result.state is not None:
                    self.trust = result.state
                if self.app_state != "silent":
                    with contextlib.suppress(LinkError):
                        await self.client.report(self.report())

    def report(self) -> dict[str, Any]:
        healthy = self.app_state == "healthy"
        message = "" if healthy else "probe failed"
        apps = {
            name: {"version": version, "desired": 1, "ready": int(healthy),
                   "state": self.app_state, "message": message}
            for name, version in self.apps.items()
        }  # fmt: skip
        return {
            "v": 1, "site": self.site_id, "time": time.time(),
            "applied_version": self.trust.version, "applied_head": self.trust.head,
            "rejections": [], "hosts": [], "apps": apps,
        }  # fmt: skip


async def cli(hub: LocalHub, *args: str, token: str | None = None) -> tuple[int, str, str]:
    env = {**os.environ, "MESHORCH_HUB": hub.url, "MESHORCH_TOKEN": token or hub.admin_token}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


@contextlib.asynccontextmanager
async def fleet(tmp_path: Path, states: dict[str, tuple[str, str]]) -> AsyncIterator[LocalHub]:
    """A hub and one light site per entry: id -> (region, app state)."""
    hub = LocalHub(tmp_path / "hub", fleet="cli", extra_args=["--wave-timeout", "3"])
    hub.start()
    tasks = []
    try:
        async with aiohttp.ClientSession() as session:
            root_key = await hub.wait_ready(session)
            auth = {"Authorization": f"Bearer {hub.admin_token}"}
            for site_id, (region, state) in states.items():
                site = LightSite(hub.url, site_id, root_key, state)
                body = {"id": site_id, "labels": {"region": region},
                        "public_key": site.key.verify_key.encode().hex()}  # fmt: skip
                async with session.post(f"{hub.url}/v1/sites", json=body, headers=auth) as r:
                    assert r.status == 201, await r.text()
                tasks.append(asyncio.create_task(site.run()))
        yield hub
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        hub.stop()


async def test_deploy_waits_for_the_matching_sites_and_views_show_them(tmp_path: Path) -> None:
    spec = tmp_path / "app.yaml"
    spec.write_text(APP.format(version="1.0"))
    sites = {"eu-1": ("eu", "healthy"), "eu-2": ("eu", "healthy"), "us-1": ("us", "healthy")}
    async with fleet(tmp_path, sites) as hub:
        code, out, err = await cli(hub, "deploy", "-f", str(spec), "--wait", "--timeout", "30")
        assert code == 0, out + err
        assert "to 2 site(s)" in out
        assert "eu-1" in out and "eu-2" in out and "us-1" not in out
        assert "succeeded" in out

        code, out, _ = await cli(hub, "apps")
        assert code == 0 and "shop" in out and "succeeded" in out
        code, out, _ = await cli(hub, "apps", "shop")
        assert code == 0 and "eu-1" in out and "1.0 healthy" in out
        code, out, _ = await cli(hub, "sites")
        assert code == 0
        rows = {line.split()[0]: line for line in out.splitlines()[1:]}
        assert set(rows) == {"eu-1", "eu-2", "us-1"}
        assert "region=eu" in rows["eu-1"] and "region=us" in rows["us-1"]


async def test_deploy_exits_non_zero_when_a_site_fails(tmp_path: Path) -> None:
    spec = tmp_path / "app.yaml"
    spec.write_text(APP.format(version="2.0"))
    async with fleet(tmp_path, {"eu-1": ("eu", "failed")}) as hub:
        code, out, err = await cli(hub, "deploy", "-f", str(spec), "--wait", "--timeout", "30")
        assert code == 1, out + err
        assert "failed" in err and "eu-1" in err


async def test_deploy_times_out_when_a_site_never_reports(tmp_path: Path) -> None:
    spec = tmp_path / "app.yaml"
    spec.write_text(APP.format(version="3.0"))
    async with fleet(tmp_path, {"eu-1": ("eu", "silent")}) as hub:
        code, out, err = await cli(hub, "deploy", "-f", str(spec), "--wait", "--timeout", "1")
        assert code == 4, out + err
        assert "still running" in err
        # Registered, never reported: waiting for its agents, which the views say.
        code, out, _ = await cli(hub, "sites")
        assert code == 0 and out.splitlines()[1].split()[:2] == ["eu-1", "awaiting"], out
        code, out, _ = await cli(hub, "sites", "eu-1")
        assert code == 0 and out.startswith("site eu-1: awaiting first report,"), out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("deploy", "-f", "/nonexistent.yaml"), "No such file"),
        (("sites", "--token", "mht_nope_nope"), "the hub refused (401)"),
        (("apps", "missing"), "the hub refused (404)"),
    ],
)
async def test_operator_errors_are_clear(
    tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    async with fleet(tmp_path, {}) as hub:
        code, out, err = await cli(hub, *args)
        assert code == 2, out + err
        assert message in err
        assert "Traceback" not in err


async def test_bad_spec_lists_problems(tmp_path: Path) -> None:
    spec = tmp_path / "app.yaml"
    spec.write_text("name: x\nversion: 1\nplacement: {match: {region: eu}}\n")
    async with fleet(tmp_path, {}) as hub:
        code, out, err = await cli(hub, "deploy", "-f", str(spec))
        assert code == 2, out + err
        assert "the hub refused (400)" in err and "\n  - " in err
        assert err.count("services: required") == 1  # each problem once
