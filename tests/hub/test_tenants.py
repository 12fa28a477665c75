"""Tenants at the hub: life cycle, quotas and their delta, mass assignment."""

from __future__ import annotations

from typing import Any

from central_hub import Hub
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, spec_text
from tests.hub.test_tenant_matrix import snapshot


async def token(admin: Operator, role: str, tenant: str) -> str:
    made: dict[str, Any] = await admin.ok(
        "POST", "/v1/tokens", {"role": role, "tenant": tenant}, 201
    )
    return str(made["token"])


async def test_default_exists_and_tenants_live_and_die(
    admin: Operator, make_site: MakeSite
) -> None:
    assert [t["id"] for t in (await admin.ok("GET", "/v1/tenants"))["tenants"]] == ["default"]
    await make_site("s1")
    made = await admin.ok("POST", "/v1/tenants", {"id": "blue", "description": "Blue Ltd"}, 201)
    assert made["description"] == "Blue Ltd" and made["quota"] is None
    assert (await admin.call("POST", "/v1/tenants", {"id": "blue"}))[0] == 409
    status, answer = await admin.call("POST", "/v1/apps", {"spec": spec_text(), "tenant": "red"})
    assert status == 404 and answer["error"]["code"] == "unknown_tenant"
    blue = await token(admin, "operator", "blue")
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "tenant": "blue"}, 202)
    status, answer = await admin.call("DELETE", "/v1/tenants/blue")
    assert status == 409 and answer["error"]["code"] == "tenant_in_use"
    await admin.ok("DELETE", "/v1/apps/web?confirm=1")
    deleted = await admin.ok("DELETE", "/v1/tenants/blue")
    assert len(deleted["revoked_tokens"]) == 1
    assert (await admin.call("GET", "/v1/apps", token=blue))[0] == 401  # revoked with it
    assert (await admin.call("GET", "/v1/tenants/blue"))[0] == 404
    assert (await admin.call("DELETE", "/v1/tenants/default"))[0] == 409


async def test_a_quota_is_stored_and_sent_to_every_site(admin: Operator) -> None:
    # A site that applied nothing keeps the delta log from being compacted under the test
    # (with no site, the hub's first tick may compact it between the PUT and the GET).
    await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    quota = {"cpu_millis": 1500, "memory_bytes": 1 << 30, "instances": None}
    answer = await admin.ok("PUT", "/v1/tenants/blue/quota", quota)
    assert answer["quota"] == quota
    delta = (await admin.ok("GET", "/v1/deltas"))["deltas"][-1]
    assert delta["version"] == answer["delta"] and delta["target"] == {"all": True}
    assert delta["ops"] == [{"op": "tenant.quota", "tenant": "blue", **quota}]
    viewer = await token(admin, "viewer", "blue")
    status, shown = await admin.call("GET", "/v1/tenants/blue/quota", token=viewer)
    assert status == 200 and shown == {"tenant": "blue", "quota": quota}
    status, answer = await admin.call("PUT", "/v1/tenants/blue/quota", {"cpu_millis": -1})
    assert status == 400 and answer["error"]["code"] == "bad_quota"
    cleared = await admin.ok("PUT", "/v1/tenants/blue/quota", {})
    assert cleared["quota"] is None


async def test_app_ops_carry_the_tenant(admin: Operator, make_site: MakeSite) -> None:
    await make_site("s1")
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "tenant": "blue"}, 202)
    await admin.ok("DELETE", "/v1/apps/web?confirm=1")
    ops = [d["ops"][0] for d in (await admin.ok("GET", "/v1/deltas"))["deltas"]]
    assert [(op["op"], op["tenant"]) for op in ops] == [("app.put", "blue"), ("app.delete", "blue")]


async def test_mass_assignment_is_refused_and_changes_nothing(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    await make_site("s1")
    for tenant in ("blue", "red"):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    blue_admin = await token(admin, "admin", "blue")
    blue_operator = await token(admin, "operator", "blue")
    spec = spec_text()
    # Another tenant, a role above the caller's: 403 (the caller may not); an unknown
    # field: 400 (the request is malformed). The same code, and nothing changes.
    cases: list[tuple[str, str, dict[str, Any], str, list[str]]] = [
        (blue_operator, "/v1/apps", {"spec": spec, "tenant": "red"}, "tenant", ["tenant"]),
        (blue_operator, "/v1/apps", {"spec": spec, "owner": "x"}, "owner", ["owner"]),
        (blue_operator, "/v1/apps", {"spec": spec, "id": "dep-9"}, "id", ["id"]),
        (blue_operator, "/v1/apps", {"spec": spec, "version": "2"}, "version", ["version"]),
        (blue_operator, "/v1/apps", {"spec": spec, "created_at": 1}, "created_at", ["created_at"]),
        (blue_admin, "/v1/tokens", {"role": "viewer", "tenant": "red"}, "tenant", ["tenant"]),
        (blue_admin, "/v1/tokens", {"role": "admin", "tenant": "*"}, "tenant", ["tenant"]),
        (blue_admin, "/v1/tokens", {"role": "viewer", "secret_hash": "0"}, "x", ["secret_hash"]),
        (admin.token, "/v1/tenants", {"id": "green", "quota": {}}, "quota", ["quota"]),
        (admin.token, "/v1/tenants", {"id": "green", "created_at": 0}, "x", ["created_at"]),
    ]
    for caller, path, body, _, fields in cases:
        before = snapshot(hub)
        status, answer = await admin.call("POST", path, body, token=caller)
        want = 403 if set(fields) & {"tenant", "role"} else 400
        assert (status, answer["error"]["code"]) == (want, "field_not_allowed"), (path, body)
        assert all(f in answer["error"]["message"] for f in fields), answer
        assert snapshot(hub) == before
    status, answer = await admin.call("PUT", "/v1/tenants/blue/quota", {"cpu": 1})
    assert status == 400 and answer["error"]["code"] == "field_not_allowed"
    # an operator cannot grant itself more: tokens are an admin's, and no role above one's own
    status, _ = await admin.call("POST", "/v1/tokens", {"role": "admin"}, token=blue_operator)
    assert status == 403
    made = await admin.ok("POST", "/v1/apps", {"spec": spec, "tenant": "blue"}, 202)
    assert made["tenant"] == "blue"
    status, own = await admin.call("POST", "/v1/tokens", {"role": "viewer"}, token=blue_admin)
    assert status == 201 and own["tenant"] == "blue"
