"""`meshorch tenants create|delete|quota`, `meshorch tokens revoke` and `--output json` on
the listings, against a real hub; the deprecated `--api` flag; `meshorch hub` KEK commands'
help."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import orjson
import pytest

from central_hub import Hub
from meshorch.cli.main import build_parser
from tests.hub.helpers import Operator
from tests.hub.test_tenant_cli import cli


async def json_of(hub: Hub, token: str, *args: str) -> Any:
    code, out, err = await cli(hub, token, *args, "--output", "json")
    assert code == 0, err
    return orjson.loads(out)


async def test_tenants_and_tokens_from_the_command_line(hub: Hub, admin: Operator) -> None:
    code, out, err = await cli(hub, admin.token, "tenants", "create", "red", "--description", "Red")
    assert code == 0 and "created tenant red" in out, err
    code, out, err = await cli(
        hub, admin.token, "tenants", "quota", "red", "--cpu-millis", "500", "--memory", "1Gi"
    )
    assert code == 0 and "cpu_millis=500" in out and f"memory_bytes={1 << 30}" in out, err
    code, out, _ = await cli(hub, admin.token, "tenants", "quota", "red")
    assert code == 0 and "cpu_millis=500" in out and "instances=-" in out
    assert (await admin.ok("GET", "/v1/tenants/red/quota"))["quota"]["cpu_millis"] == 500
    shown = await json_of(hub, admin.token, "tenants", "show", "red")
    assert shown["description"] == "Red" and shown["quota"]["cpu_millis"] == 500
    listed = await json_of(hub, admin.token, "tenants")
    assert {t["id"] for t in listed} >= {"default", "red"}
    assert [t["id"] for t in await json_of(hub, admin.token, "tenants", "list", "--limit", "1")]
    code, out, _ = await cli(hub, admin.token, "tenants", "quota", "red", "--unlimited")
    assert code == 0 and "unlimited" in out

    code, out, _ = await cli(hub, admin.token, "tokens", "create", "--role", "admin",
                             "--tenant", "red")  # fmt: skip
    red = out.strip()
    code, out, _ = await cli(hub, red, "tokens", "create", "--role", "viewer")
    child = out.strip()
    tokens = await json_of(hub, admin.token, "tokens", "list")
    red_id = next(t["id"] for t in tokens if t["tenant"] == "red" and t["role"] == "admin")
    assert len(await json_of(hub, admin.token, "tokens")) == len(tokens)
    code, out, err = await cli(hub, admin.token, "tokens", "revoke", red_id)
    assert code == 0 and f"revoked token {red_id}, and 1 token(s)" in out, err
    for gone in (red, child):
        assert (await admin.call("GET", "/v1/tenants", token=gone))[0] == 401
    code, _, err = await cli(hub, admin.token, "tokens", "revoke", red_id)
    assert code != 0 and "404" in err

    code, out, err = await cli(hub, admin.token, "tenants", "delete", "red")
    assert code == 0 and "deleted tenant red" in out, err
    assert "red" not in {t["id"] for t in await json_of(hub, admin.token, "tenants")}
    assert await json_of(hub, admin.token, "sites") == []
    assert await json_of(hub, admin.token, "apps") == []
    audit = await json_of(hub, admin.token, "audit", "--limit", "500")
    assert audit and all("action" in entry for entry in audit)


def test_api_is_a_deprecated_alias_of_agent(capsys: pytest.CaptureFixture[str]) -> None:
    parser = build_parser()
    cases = [
        (["app", "list"], "agent"), (["image", "list"], "api"), (["host", "drain", "h1"], "api"),
        (["token", "create", "--site", "s"], "api"), (["access-token", "list"], "agent"),
    ]  # fmt: skip
    for words, dest in cases:
        args = parser.parse_args([*words, "--agent", "10.0.0.1:7800"])
        assert getattr(args, dest) == "10.0.0.1:7800"
        assert "deprecated" not in capsys.readouterr().err
        args = parser.parse_args([*words, "--api", "10.0.0.2:7800"])
        assert getattr(args, dest) == "10.0.0.2:7800"
        assert "--api is deprecated: use --agent" in capsys.readouterr().err


def test_the_hub_kek_commands_have_their_help() -> None:
    for word in ("rotate-kek", "new-kek"):
        done = subprocess.run(
            [sys.executable, "-m", "meshorch", "hub", word, "--help"],
            capture_output=True, text=True, timeout=60, check=False,
        )  # fmt: skip
        assert done.returncode == 0 and f"meshorch hub {word}" in done.stdout, done.stderr
