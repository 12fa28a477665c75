"""Operator tokens: 401 and 403, expiry, revocation, tenants, files on disk."""

from __future__ import annotations

import stat
from pathlib import Path

import aiohttp
import pytest

from central_hub import Hub, tokens
from central_hub.errors import ApiError
from tests.hub.conftest import Clock, MakeSite, admin_token
from tests.hub.helpers import Operator, spec_text


async def test_missing_malformed_and_wrong_tokens_are_401(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    async with session.get(hub.url + "/v1/apps") as resp:
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthorized"
    token_id, _ = tokens.split_token(admin.token)
    for bad in ("nonsense", "mht_", "mht_abc", f"mht_{token_id}_{'0' * 64}", "Basic x"):
        status, answer = await admin.call("GET", "/v1/apps", token=bad)
        assert status == 401 and answer["error"]["code"] == "unauthorized", bad
    async with session.get(hub.url + "/v1/apps", headers={"Authorization": "Basic abc"}) as r:
        assert r.status == 401


async def test_roles_are_enforced(admin: Operator, make_site: MakeSite) -> None:
    await make_site("a")
    viewer = (await admin.ok("POST", "/v1/tokens", {"role": "viewer"}, 201))["token"]
    deployer = (await admin.ok("POST", "/v1/tokens", {"role": "operator"}, 201))["token"]
    status, answer = await admin.call("POST", "/v1/apps", {"spec": spec_text()}, token=viewer)
    assert status == 403 and answer["error"]["code"] == "forbidden"
    status, _ = await admin.call("GET", "/v1/apps", token=viewer)
    assert status == 200
    status, _ = await admin.call("POST", "/v1/tokens", {"role": "admin"}, token=deployer)
    assert status == 403
    status, _ = await admin.call("POST", "/v1/sites", {"id": "b"}, token=deployer)
    assert status == 403
    status, _ = await admin.call("POST", "/v1/apps", {"spec": spec_text()}, token=deployer)
    assert status == 202


async def test_tokens_are_listed_without_secrets_and_can_be_revoked(admin: Operator) -> None:
    created = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "description": "ci"}, 201)
    secret = created["token"].rsplit("_", 1)[1]
    listing = await admin.ok("GET", "/v1/tokens")
    assert secret not in str(listing) and "secret_hash" not in str(listing)
    assert {t["role"] for t in listing["tokens"]} == {"admin", "viewer"}
    assert (await admin.call("GET", "/v1/apps", token=created["token"]))[0] == 200
    await admin.ok("DELETE", f"/v1/tokens/{created['id']}")
    assert (await admin.call("GET", "/v1/apps", token=created["token"]))[0] == 401
    assert (await admin.call("DELETE", f"/v1/tokens/{created['id']}"))[0] == 404


async def test_expired_tokens_are_refused(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    admin = Operator(session, clocked_hub.url, admin_token(clocked_hub))
    created = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "expires_in_s": 60}, 201)
    assert (await admin.call("GET", "/v1/apps", token=created["token"]))[0] == 200
    clock.advance(61)
    status, answer = await admin.call("GET", "/v1/apps", token=created["token"])
    assert status == 401 and "expired" in answer["error"]["message"]
    assert (await admin.call("GET", "/v1/apps"))[0] == 200  # the admin token never expires


async def test_a_tenant_token_sees_only_its_tenant(admin: Operator, make_site: MakeSite) -> None:
    await make_site("a")
    await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    blue = (await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": "blue"}, 201))[
        "token"
    ]
    status, answer = await admin.call("GET", "/v1/apps", token=blue)
    assert status == 200 and answer["apps"] == []
    assert (await admin.call("GET", "/v1/apps/web", token=blue))[0] == 404
    assert (await admin.call("DELETE", "/v1/apps/web", token=blue))[0] == 404
    status, answer = await admin.call(
        "POST", "/v1/apps", {"spec": spec_text(), "tenant": "default"}, token=blue
    )
    assert status == 403 and answer["error"]["code"] == "field_not_allowed"
    status, answer = await admin.call("POST", "/v1/apps", {"spec": spec_text(name="b")}, token=blue)
    assert status == 202 and answer["tenant"] == "blue"


def test_secrets_are_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = tokens.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(tokens.hmac, "compare_digest", spy)
    text, record = tokens.new_token("viewer", "default", 100.0)
    _, secret = tokens.split_token(text)
    assert tokens.check_token(record, secret, 101.0) is record
    with pytest.raises(ApiError):
        tokens.check_token(record, "0" * 64, 101.0)
    with pytest.raises(ApiError):
        tokens.check_token(None, secret, 101.0)  # unknown id: same comparison work
    assert len(calls) == 3
    assert all(len(a) == len(b) == 64 for a, b in calls)


def test_authorize_follows_the_policy_table() -> None:
    _, viewer = tokens.new_token("viewer", "blue", 0.0)
    _, admin = tokens.new_token("admin", "*", 0.0)
    _, blue_admin = tokens.new_token("admin", "blue", 0.0)
    tokens.authorize(viewer, "apps.read", "blue")
    with pytest.raises(ApiError) as info:
        tokens.authorize(viewer, "apps.write")
    assert info.value.status == 403
    with pytest.raises(ApiError) as info:
        tokens.authorize(viewer, "apps.read", "red")
    assert info.value.status == 404  # another tenant's object is as good as absent
    tokens.authorize(admin, "tenants.create")
    tokens.authorize(admin, "apps.delete", "red")
    with pytest.raises(ApiError) as info:
        tokens.authorize(blue_admin, "tenants.create")  # a fleet action
    assert info.value.status == 403


def test_stored_deployer_tokens_are_operators() -> None:
    _, record = tokens.new_token("operator", "blue", 0.0)
    legacy = tokens.TokenRecord.from_json({**record.to_json(), "role": "deployer"})
    assert legacy.role == "operator"
    tokens.authorize(legacy, "apps.write", "blue")


async def test_files_are_private(hub: Hub) -> None:
    data_dir: Path = hub.data_dir
    assert stat.S_IMODE(data_dir.stat().st_mode) == 0o700
    for name in ("fleet-root.key", "admin.token"):
        assert stat.S_IMODE((data_dir / name).stat().st_mode) == 0o600
    assert len(bytes.fromhex((data_dir / "fleet-root.key").read_text().strip())) == 32
    assert admin_token(hub).startswith("mht_")
