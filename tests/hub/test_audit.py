"""The audit log: every change with its actor, refusals, tenant-scoped reading, restarts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import aiohttp

from central_hub import Hub
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, spec_text


def actions(entries: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [(e["action"], e["tenant"], e["outcome"]) for e in entries]


async def test_changes_and_refusals_are_audited_and_read_by_tenant(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    config = hub_config(tmp_path / "hub")
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        fleet_id = admin.token.split("_")[1]
        await admin.ok("POST", "/v1/sites", {"id": "s1", "public_key": "ab" * 32}, 201)
        await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
        made = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
        blue = made["token"]
        viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
        status, _ = await admin.call("POST", "/v1/apps", {"spec": spec_text()}, token=blue)
        assert status == 202
        assert (await admin.call("DELETE", "/v1/sites/s1", token=blue))[0] == 403
        assert (await admin.call("GET", "/v1/apps", token="mht_1_2"))[0] == 401
        await hub.accounts.failures.flush()  # failed authentications are sampled (authguard)
        assert (await admin.call("GET", "/v1/audit", token=viewer["token"]))[0] == 403
        entries = (await admin.ok("GET", "/v1/audit"))["entries"]
        assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
        assert actions(entries) == [
            ("sites.create", "*", "ok"),
            ("tenants.create", "blue", "ok"),
            ("tokens.create", "blue", "ok"),
            ("tokens.create", "blue", "ok"),
            ("apps.write", "blue", "ok"),
            ("sites.delete", "blue", "refused 403"),
            ("apps.read", "*", "refused 401"),
            ("audit.read", "blue", "refused 403"),
        ]
        assert entries[0]["actor"] == {"token": fleet_id, "role": "admin", "tenant": "*"}
        assert entries[4]["actor"]["token"] == made["id"]
        assert entries[4]["object"] == {"type": "app", "id": "web"}
        assert entries[6]["actor"] is None and entries[6]["count"] == 1
        assert entries[6]["object"] == {"type": "source", "id": "127.0.0.1"}
        text = str(entries)
        assert blue.rsplit("_", 1)[1] not in text and "secret_hash" not in text
        status, mine = await admin.call("GET", "/v1/audit", token=blue)
        assert status == 200 and {e["tenant"] for e in mine["entries"]} == {"blue"}
        assert len(mine["entries"]) == 6
        page = await admin.ok("GET", "/v1/audit?after=2&limit=2")
        assert [e["seq"] for e in page["entries"]] == [3, 4]
        only = await admin.ok("GET", "/v1/audit?tenant=blue")
        assert len(only["entries"]) == 6
        hub.ledger.audit(None, "secrets.read", "blue", "secret", "db-password", "ok", "by site s1")
        await admin.ok("GET", "/v1/fleet")
    async with Hub(config) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        entries = (await admin.ok("GET", "/v1/audit"))["entries"]
        assert len(entries) == 9 and entries[-1]["object"]["id"] == "db-password"
        await admin.ok("POST", "/v1/tenants", {"id": "red"}, 201)
        entries = (await admin.ok("GET", "/v1/audit?after=9"))["entries"]
        assert [(e["seq"], e["action"]) for e in entries] == [(10, "tenants.create")]
