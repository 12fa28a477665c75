"""Tokens form a tree: a child never outlives nor outranks its parent, and dies with it."""

from __future__ import annotations

import aiohttp

from central_hub import Hub, tokens
from tests.hub.conftest import Clock, admin_token
from tests.hub.helpers import Operator


async def mint(op: Operator, token: str, body: dict[str, object]) -> dict[str, object]:
    status, answer = await op.call("POST", "/v1/tokens", body, token=token)
    assert status == 201, answer
    return dict(answer)


async def test_a_child_of_a_60s_token_never_outlives_it(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    hub = clocked_hub
    admin = Operator(session, hub.url, admin_token(hub))
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    parent = await admin.ok(
        "POST", "/v1/tokens", {"role": "admin", "tenant": "blue", "expires_in_s": 60}, 201
    )
    assert parent["parent"] == admin.token.split("_")[1]
    # No expiry asked: capped to the parent's. A later one: capped. An earlier one: kept.
    unbounded = await mint(admin, parent["token"], {"role": "viewer"})
    later = await mint(admin, parent["token"], {"role": "operator", "expires_in_s": 3600})
    earlier = await mint(admin, parent["token"], {"role": "viewer", "expires_in_s": 30})
    assert unbounded["expires_at"] == parent["expires_at"]
    assert later["expires_at"] == parent["expires_at"]
    assert earlier["expires_at"] < parent["expires_at"]  # type: ignore[operator]
    assert unbounded["parent"] == parent["id"]
    for child in (unbounded, later):
        assert (await admin.call("GET", "/v1/apps", token=str(child["token"])))[0] == 200
    clock.advance(61)
    for child in (parent, unbounded, later, earlier):
        status, answer = await admin.call("GET", "/v1/apps", token=str(child["token"]))
        assert status == 401 and "expired" in answer["error"]["message"], answer
    assert (await admin.call("GET", "/v1/apps"))[0] == 200  # the root never expires


async def test_revoking_a_parent_revokes_its_descendants(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "red"}, 201)
    parent = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    child = await mint(admin, parent["token"], {"role": "admin"})
    grandchild = await mint(admin, str(child["token"]), {"role": "viewer"})
    sibling = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    red = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "red"}, 201)

    # Who may revoke: refused before anything changes.
    path = f"/v1/tokens/{parent['id']}"
    async with session.delete(hub.url + path) as resp:  # no credential
        assert resp.status == 401
    status, answer = await admin.call("DELETE", path, token=red["token"])  # another tenant
    assert status == 404 and answer["error"]["code"] == "not_found"
    status, _ = await admin.call("DELETE", path, token=str(grandchild["token"]))  # a viewer
    assert status == 403
    assert (await admin.call("GET", "/v1/apps", token=parent["token"]))[0] == 200

    answer = await admin.ok("DELETE", path)
    assert answer == {
        "deleted": parent["id"],
        "revoked_descendants": [child["id"], grandchild["id"]],
    }
    for gone in (parent, child, grandchild):
        status, answer = await admin.call("GET", "/v1/apps", token=str(gone["token"]))
        assert status == 401, answer
        # A revoked token revokes nothing and creates nothing.
        status, _ = await admin.call(
            "DELETE", f"/v1/tokens/{sibling['id']}", token=str(gone["token"])
        )
        assert status == 401
        status, _ = await admin.call(
            "POST", "/v1/tokens", {"role": "viewer"}, token=str(gone["token"])
        )
        assert status == 401
    assert (await admin.call("GET", "/v1/apps", token=sibling["token"]))[0] == 200
    listed = {t["id"] for t in (await admin.ok("GET", "/v1/tokens?tenant=blue"))["tokens"]}
    assert listed == {sibling["id"]}
    audit = (await admin.ok("GET", "/v1/audit?tenant=blue&limit=500"))["entries"]
    revoked = [e["object"]["id"] for e in audit if "revoked" in e["detail"]]
    assert revoked == [parent["id"], child["id"], grandchild["id"]]


async def test_authentication_refuses_a_token_whose_ancestor_is_gone(
    hub: Hub, admin: Operator
) -> None:
    """Whatever removed the ancestor (here: the store edited behind the hub's back),
    authentication walks the chain and refuses the orphan."""
    parent = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "*"}, 201)
    child = await mint(admin, parent["token"], {"role": "viewer", "tenant": "default"})
    hub.store.commit([("tokens", parent["id"].encode(), None)], sync=True)
    status, answer = await admin.call("GET", "/v1/apps", token=str(child["token"]))
    assert status == 401 and "descends from" in answer["error"]["message"]


async def test_a_child_never_outranks_its_parent(hub: Hub, admin: Operator) -> None:
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "red"}, 201)
    blue = await admin.ok("POST", "/v1/tokens", {"role": "admin", "tenant": "blue"}, 201)
    operator = await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": "blue"}, 201)
    refused = [
        (blue["token"], {"role": "admin", "tenant": "*"}, 403, "field_not_allowed"),
        (blue["token"], {"role": "viewer", "tenant": "red"}, 403, "field_not_allowed"),
        # An operator creates no token, so none above it nor beside it.
        (operator["token"], {"role": "operator"}, 403, "forbidden"),
        (operator["token"], {"role": "admin"}, 403, "forbidden"),
        ("mht_00_00", {"role": "viewer"}, 401, "unauthorized"),
    ]
    before = len((await admin.ok("GET", "/v1/tokens"))["tokens"])
    for token, body, status, code in refused:
        got, answer = await admin.call("POST", "/v1/tokens", body, token=token)
        assert (got, answer["error"]["code"]) == (status, code), (body, answer)
    assert len((await admin.ok("GET", "/v1/tokens"))["tokens"]) == before
    # Within its reach, a tenant admin mints its equals.
    made = await mint(admin, blue["token"], {"role": "admin"})
    assert (made["role"], made["tenant"], made["parent"]) == ("admin", "blue", blue["id"])


async def test_chains_are_bounded(hub: Hub, admin: Operator) -> None:
    token = admin.token
    for _ in range(tokens.MAX_DEPTH):
        token = str((await mint(admin, token, {"role": "admin", "tenant": "*"}))["token"])
    assert (await admin.call("GET", "/v1/apps", token=token))[0] == 200
    status, answer = await admin.call("POST", "/v1/tokens", {"role": "viewer"}, token=token)
    assert (status, answer["error"]["code"]) == (400, "token_chain_too_deep")
