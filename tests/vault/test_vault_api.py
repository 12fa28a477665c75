"""The hub's vault routes against a real in-process hub and a test site speaking the real
link protocol: bad input on every route changes nothing, tenants, escrow and unseal
refusals (audited), distribution to a site once its report brings its key."""

from __future__ import annotations

import base64
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.public import PrivateKey, PublicKey, SealedBox

from central_hub import Hub, HubConfig
from central_hub.vault import ESCROW_KEY_FILE, MASTER_KEY_FILE
from meshorch.fleet.escrow import verify_escrow_key
from tests.hub.helpers import Operator, Site, until

SITE = "s1"


@pytest.fixture
async def env(tmp_path: Path) -> AsyncIterator[tuple[Hub, Operator, Site]]:
    config = HubConfig(
        data_dir=tmp_path / "hub", port=0, insecure_http=True, tick_s=0.02, gossip=False
    )
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session,
    ):
        admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
        site = Site(session, hub.url, SITE, hub.fleet, hub.root_key)
        await admin.ok("POST", "/v1/sites", {"id": SITE, "public_key": site.public_key}, 201)
        yield hub, admin, site


def state(hub: Hub) -> tuple[int, list[str]]:
    return hub.head.version, sorted(k for k in hub.store.keys("meta") if k.startswith("vault/"))


async def test_key_files_are_private(env: tuple[Hub, Operator, Site]) -> None:
    hub, _, _ = env
    for name in (MASTER_KEY_FILE, ESCROW_KEY_FILE):
        assert (hub.data_dir / name).stat().st_mode & 0o777 == 0o600


BAD: list[tuple[str, str, Any, int, str]] = [
    ("POST", "/v1/secrets", [], 400, "bad_request"),
    ("POST", "/v1/secrets", {"name": "x", "value": "v", "extra": 1}, 400, "bad_request"),
    ("POST", "/v1/secrets", {"value": "v"}, 400, "bad_name"),
    ("POST", "/v1/secrets", {"name": "-bad", "value": "v"}, 400, "bad_name"),
    ("POST", "/v1/secrets", {"name": "x"}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value": "v", "value_b64": "dg=="}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value": ""}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value": 5}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value_b64": "not base64!"}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value": "v" * 65537}, 400, "bad_value"),
    ("POST", "/v1/secrets", {"name": "x", "value": "v", "tenant": "Bad"}, 400, "bad_tenant"),
    ("POST", "/v1/secrets", {"name": "x", "value": "v", "placement": 3}, 400, "bad_placement"),
    ("GET", "/v1/secrets/-x", None, 400, "bad_name"),
    ("GET", "/v1/secrets/x?tenant=NO", None, 400, "bad_tenant"),
    ("GET", "/v1/secrets/nope", None, 404, "not_found"),
    ("DELETE", "/v1/secrets/nope", None, 404, "not_found"),
    ("POST", f"/v1/sites/{SITE}/lockdown", {"x": 1}, 400, "bad_request"),
    ("POST", "/v1/sites/nope/lockdown", {}, 404, "not_found"),
    ("POST", "/v1/sites/nope/unlock", {}, 404, "not_found"),
    ("POST", "/v1/sites/nope/secrets/rotate", {}, 404, "not_found"),
    ("POST", "/v1/sites/nope/unseal", {}, 404, "not_found"),
    ("POST", f"/v1/sites/{SITE}/unseal", {}, 409, "no_escrow"),
]


async def test_bad_input_changes_nothing(env: tuple[Hub, Operator, Site]) -> None:
    hub, admin, _ = env
    before = state(hub)
    for method, path, body, status, code in BAD:
        got, answer = await admin.call(method, path, body)
        assert (got, answer["error"]["code"]) == (status, code), (method, path, answer)
    assert state(hub) == before


async def test_bad_link_input_changes_nothing(env: tuple[Hub, Operator, Site]) -> None:
    hub, _, site = env
    before = state(hub)
    other = PrivateKey.generate()
    good = base64.b64encode(SealedBox(other.public_key).encrypt(b"k" * 32)).decode()
    cases: list[tuple[str, object, int, str]] = [
        ("/v1/link/escrow", [], 400, "bad_request"),
        ("/v1/link/escrow", {"sealed": good, "ssk_public": "ab" * 32}, 400, "bad_escrow"),
        ("/v1/link/escrow", {"sealed": "!!", "ssk_public": "ab" * 32}, 400, "bad_escrow"),
        ("/v1/link/unseal", {"public_key": "zz"}, 400, "bad_public_key"),
        ("/v1/link/unseal", {"public_key": "ab" * 32, "x": 1}, 400, "bad_request"),
    ]
    for path, body, status, code in cases:
        got, answer = await site.request("POST", path, orjson.dumps(body))
        assert (got, answer["error"]["code"]) == (status, code), (path, answer)
    assert state(hub) == before


async def escrow(hub: Hub, site: Site, kek: bytes, ssk: str) -> None:
    got, info = await site.request("GET", "/v1/link/escrow-key")
    assert got == 200
    key = verify_escrow_key(info, {hub.root_key})
    sealed = base64.b64encode(SealedBox(PublicKey(key)).encrypt(kek)).decode()
    got, answer = await site.request(
        "POST", "/v1/link/escrow", orjson.dumps({"sealed": sealed, "ssk_public": ssk})
    )
    assert got == 200, answer


async def test_unseal_needs_an_approval_and_no_lockdown(env: tuple[Hub, Operator, Site]) -> None:
    hub, admin, site = env
    kek, ssk = b"K" * 32, "cd" * 32
    await escrow(hub, site, kek, ssk)
    mine = PrivateKey.generate()
    ask = orjson.dumps({"public_key": bytes(mine.public_key).hex()})

    got, answer = await site.request("POST", "/v1/link/unseal", ask)
    assert (got, answer["error"]["code"]) == (403, "unseal_not_approved")

    await admin.ok("POST", f"/v1/sites/{SITE}/unseal", {})
    got, info = await site.request("GET", "/v1/link/escrow-key")
    assert info["unseal_approved"] is True and info["escrowed"] == ssk
    got, answer = await site.request("POST", "/v1/link/unseal", ask)
    assert got == 200
    assert SealedBox(mine).decrypt(base64.b64decode(answer["sealed_key"])) == kek
    got, answer = await site.request("POST", "/v1/link/unseal", ask)  # one per approval
    assert got == 403

    await admin.ok("POST", f"/v1/sites/{SITE}/unseal", {})
    await admin.ok("POST", f"/v1/sites/{SITE}/lockdown", {})  # cancels the approval
    assert (await admin.ok("GET", f"/v1/sites/{SITE}"))["secrets"]["locked_down"] is True
    got, answer = await site.request("POST", "/v1/link/unseal", ask)
    assert (got, answer["error"]["code"]) == (409, "locked_down")
    got, answer = await site.request(
        "POST", "/v1/link/escrow", orjson.dumps({"sealed": "x", "ssk_public": ssk})
    )
    assert got == 400  # checked before anything else
    status, answer = await admin.call("POST", f"/v1/sites/{SITE}/unseal", {})
    assert (status, answer["error"]["code"]) == (409, "locked_down")

    log = await admin.ok("GET", "/v1/audit?limit=500")
    unseals = [e for e in log["entries"] if e["action"] == "site.unseal"]
    assert [e["outcome"] for e in unseals] == ["refused 403", "ok", "refused 403", "refused 409"]
    assert kek.decode() not in orjson.dumps(log).decode()


async def test_distribution_waits_for_the_site_key_and_tenants(
    env: tuple[Hub, Operator, Site],
) -> None:
    hub, admin, site = env
    await admin.ok("POST", "/v1/tenants", {"id": "blue"}, 201)
    await admin.ok("POST", "/v1/tenants", {"id": "red"}, 201)
    blue = await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": "blue"}, 201)
    red = await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": "red"}, 201)
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "blue"}, 201)
    head = hub.head.version
    status, created = await admin.call(
        "POST", "/v1/secrets", {"name": "api", "value": "s3cr3t"}, token=blue["token"]
    )
    assert status == 201 and created["tenant"] == "blue"
    assert created["sites"][SITE]["state"] == "waiting_for_site_key"
    assert hub.head.version == head  # no site key known yet: nothing sent

    # Another tenant's token gets 404; a viewer may read but not write.
    for method in ("GET", "DELETE"):
        status, _ = await admin.call(method, "/v1/secrets/api?tenant=blue", token=red["token"])
        assert status == 404
    status, listing = await admin.call("GET", "/v1/secrets", token=red["token"])
    assert listing["secrets"] == []
    status, _ = await admin.call("GET", "/v1/secrets/api", token=viewer["token"])
    assert status == 200
    status, _ = await admin.call(
        "POST", "/v1/secrets", {"name": "api", "value": "x"}, token=viewer["token"]
    )
    assert status == 403
    status, _ = await admin.call("POST", f"/v1/sites/{SITE}/lockdown", {}, token=blue["token"])
    assert status == 403

    # The site's report brings its key: the driver seals the value to it.
    ssk = PrivateKey.generate()
    await site.sync()
    got, _ = await site.report({}, secrets_public_key=bytes(ssk.public_key).hex())
    assert got == 200
    await until(lambda: hub.head.version > head)
    result = await site.sync()
    (delta,) = [d for d in result.accepted if d.ops]
    (op,) = delta.ops
    assert op["op"] == "secret.put" and op["tenant"] == "blue" and op["version"] == 1
    assert SealedBox(ssk).decrypt(base64.b64decode(op["sealed"][SITE])) == b"s3cr3t"

    status, _ = await admin.call("DELETE", "/v1/secrets/api?tenant=blue", token=blue["token"])
    assert status == 200
    result = await site.sync()
    assert [dict(op) for d in result.accepted for op in d.ops] == [
        {"op": "secret.delete", "tenant": "blue", "name": "api"}
    ]
