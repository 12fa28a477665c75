"""`meshorch tenants`, `meshorch tokens create|list` and `meshorch audit` against a real hub."""

from __future__ import annotations

import asyncio
import sys

from central_hub import Hub
from tests.hub.helpers import Operator


async def cli(hub: Hub, token: str, *args: str) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "meshorch", *args, "--hub", hub.url, "--token", token,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await process.communicate()
    assert process.returncode is not None
    return process.returncode, out.decode(), err.decode()


async def test_tenants_tokens_and_audit_from_the_command_line(hub: Hub, admin: Operator) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue", "description": "Blue Ltd"}, 201)
    await admin.ok("PUT", "/v1/tenants/blue/quota", {"cpu_millis": 500})
    code, out, _ = await cli(hub, admin.token, "tenants")
    assert code == 0 and "blue" in out and "cpu_millis=500" in out and "default" in out
    code, out, _ = await cli(hub, admin.token, "tenants", "show", "blue")
    assert code == 0 and "Blue Ltd" in out
    code, out, err = await cli(
        hub, admin.token, "tokens", "create", "--role", "admin", "--tenant", "blue"
    )
    assert code == 0 and out.startswith("mht_") and "shown once" in err
    blue = out.strip()
    status, _ = await admin.call("GET", "/v1/audit", token=blue)
    assert status == 200
    code, out, _ = await cli(hub, blue, "tokens", "list")
    assert code == 0 and "blue" in out and "*" not in out
    code, out, _ = await cli(hub, blue, "audit", "--limit", "5")
    assert code == 0 and "tokens.create [blue]" in out and "sites" not in out
    code, _, err = await cli(hub, blue, "tokens", "create", "--role", "viewer", "--tenant", "red")
    assert code != 0 and "field_not_allowed" in err
