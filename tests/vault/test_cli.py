"""``meshorch secrets ...`` and ``meshorch site ... --hub`` against a real in-process hub."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest

from central_hub import Hub, HubConfig
from meshorch.cli.main import main
from meshorch.fleet.delta import parse


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    config = HubConfig(data_dir=tmp_path / "hub", port=0, insecure_http=True, gossip=False)
    async with Hub(config) as hub:
        yield hub


async def run(*argv: str) -> int:
    return await asyncio.to_thread(main, list(argv))


async def test_cli_through_the_hub(
    hub: Hub, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    token = hub.admin_token_path.read_text().strip()
    monkeypatch.setenv("MESHORCH_HUB", hub.url)
    monkeypatch.setenv("MESHORCH_TOKEN", token)
    await hub.sites.register_site("s1", {}, "ab" * 32)
    value = tmp_path / "value"
    value.write_bytes(b"\x00\xffbinary")
    assert await run("secrets", "set", "tls.key", "--value-file", str(value)) == 0
    assert await run("secrets", "set", "tls.key", "--value", "text") == 0
    assert "default/tls.key version 2 -> s1" in capsys.readouterr().out
    assert await run("secrets", "list") == 0
    assert "default/tls.key  v2  s1: waiting_for_site_key" in capsys.readouterr().out
    assert await run("secrets", "list", "-o", "json") == 0
    listed = orjson.loads(capsys.readouterr().out)
    assert [(s["tenant"], s["name"], s["version"]) for s in listed] == [("default", "tls.key", 2)]
    assert await run("secrets", "show", "tls.key", "--output", "json") == 0
    shown = orjson.loads(capsys.readouterr().out)
    assert shown["sites"]["s1"]["state"] == "waiting_for_site_key" and "value" not in shown

    head = hub.head.version
    assert await run("site", "lockdown", "s1") == 0
    assert await run("site", "unlock", "s1", "--hub", hub.url, "--token", token) == 0
    assert await run("site", "rotate-keys", "s1") == 0
    ops = [parse(e)[0].ops[0]["op"] for _, e in hub.deltas_after(head, 10)]
    assert ops == ["site.lockdown", "site.unlock", "secrets.rotate"]
    assert await run("site", "unseal", "s1") == 2  # nothing escrowed
    assert "no_escrow" in capsys.readouterr().err
    assert await run("site", "lockdown") == 2  # the hub needs the site
    assert await run("site", "lockdown", "s1", "--hub", hub.url, "--agent", "x:1") == 2
    assert await run("secrets", "delete", "tls.key") == 0
