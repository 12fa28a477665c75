"""Durability: a restarted hub keeps everything; kill -9 never loses an acknowledged deploy."""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest

from central_hub import Hub, HubConfigError
from central_hub.cli import main
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, Site, healthy, spec_text, wait_for


async def test_restart_keeps_tokens_sites_deployments_and_deltas(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "hub"
    async with Hub(hub_config(data_dir, fleet="acme")) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        viewer = (await admin.ok("POST", "/v1/tokens", {"role": "viewer"}, 201))["token"]
        site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
        await admin.ok("POST", "/v1/sites", {"id": "shop-1", "public_key": site.public_key}, 201)
        dep = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
        root_key, head = hub.root_key, hub.head
    async with Hub(hub_config(data_dir)) as hub:
        assert (hub.fleet, hub.root_key, hub.head) == ("acme", root_key, head)
        admin = Operator(session, hub.url, admin_token(hub))
        site.url = hub.url
        assert (await admin.call("GET", "/v1/apps", token=viewer))[0] == 200
        again = await admin.ok("GET", f"/v1/deployments/{dep['id']}")
        assert again["state"] == "running" and again["deltas"] == [1]
        # the rollout resumes: the site's report finishes it
        result = await site.sync()
        assert [d.version for d in result.accepted] == [1]
        await site.report({"web": healthy("1.0")})
        done = await wait_for(admin, dep["id"], lambda d: d["state"] != "running")
        assert done["state"] == "succeeded"
        # the chain continues from the stored head
        await admin.ok("POST", "/v1/apps", {"spec": spec_text(version="2")}, 202)
        result = await site.sync()
        assert [d.version for d in result.accepted] == [2]


async def test_another_fleet_name_is_refused(tmp_path: Path) -> None:
    async with Hub(hub_config(tmp_path / "hub", fleet="acme")):
        pass
    with pytest.raises(HubConfigError, match="holds fleet 'acme'"):
        async with Hub(hub_config(tmp_path / "hub", fleet="other")):
            pass


def test_cli_help_and_fleet_mismatch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "--data-dir" in out and "--fleet" in out
    assert main(["--data-dir", str(tmp_path), "--listen", "nowhere"]) == 2
    assert "not HOST:PORT" in capsys.readouterr().err


@asynccontextmanager
async def hub_process(
    data_dir: Path, *flags: str
) -> AsyncIterator[tuple[asyncio.subprocess.Process, dict[str, str]]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "central_hub", "--data-dir", str(data_dir),
        "--listen", "127.0.0.1:0", "--insecure-http", *flags,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    facts: dict[str, str] = {}
    try:
        async with asyncio.timeout(20):
            assert proc.stdout is not None
            while "admin token" not in facts:
                line = (await proc.stdout.readline()).decode()
                if not line:
                    assert proc.stderr is not None
                    raise AssertionError((await proc.stderr.read()).decode())
                name, _, value = line.strip().partition(": ")
                facts[name] = value
        yield proc, facts
    finally:
        if proc.returncode is None:
            proc.kill()
        await proc.wait()


async def test_kill_9_after_the_answer_loses_nothing(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "hub"
    async with hub_process(data_dir, "--fleet", "acme") as (proc, facts):
        assert facts["fleet"] == "acme" and len(facts["root key"]) == 64
        token = Path(facts["admin token"]).read_text().strip()
        admin = Operator(session, facts["listen"], token)
        await admin.ok("POST", "/v1/sites", {"id": "shop-1", "labels": {"region": "eu"}}, 201)
        dep = await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
        proc.send_signal(signal.SIGKILL)
        assert await proc.wait() == -signal.SIGKILL
    async with hub_process(data_dir) as (proc, facts2):
        assert facts2["root key"] == facts["root key"]
        admin = Operator(session, facts2["listen"], token)
        again = await admin.ok("GET", f"/v1/deployments/{dep['id']}")
        assert again["id"] == dep["id"] and again["deltas"] == [1]
        (delta,) = (await admin.ok("GET", "/v1/deltas"))["deltas"]
        assert delta["target"] == {"sites": ["shop-1"]}
        assert delta["signed_by"] == [facts["root key"]]
        proc.send_signal(signal.SIGTERM)
        started = time.monotonic()
        assert await asyncio.wait_for(proc.wait(), 10) == 0  # a clean stop on SIGTERM
        assert time.monotonic() - started < 10
