"""The agent's surfaces as an attacker on the shop LAN meets them: a real agent process on
loopback, its TCP API, its operator socket. Each attack is refused before any work is done,
and the same call with the right credential goes through."""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from typing import Any, cast

import aiohttp
import pytest
from prometheus_client import CollectorRegistry

from meshorch import http_metrics
from meshorch.demo.localsite import LocalSite
from meshorch.site import authz
from meshorch.site.guard import JOIN_BURST
from meshorch.state.peer_auth import PeerSigner, load_or_create_key
from tests.security.conftest import running_site

APP = b"""
api_version: meshorch/v1
name: pwn
version: "1"
services:
  - name: x
    containers:
      - {name: main, image: process, command: ["sleep", "1000"],
         resources: {memory_limit: 16Mi, cpu_request: 0.1}}
"""
REFUSED = {"unauthenticated", "forbidden", "peer_only"}


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    yield from running_site(tmp_path_factory, hosts=1, name="surfaces")


@pytest.fixture
async def stranger() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session:
        yield session


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **options: Any
) -> tuple[int, dict[str, Any]]:
    async with session.request(method, url, **options) as response:
        try:
            body = await response.json(content_type=None)
        except ValueError:
            body = {}
        return response.status, body if isinstance(body, dict) else {}


def code(body: dict[str, Any]) -> str:
    error = body.get("error")
    return str(error.get("code")) if isinstance(error, dict) else ""


async def test_a_stranger_is_refused_every_attack_and_nothing_changes(
    site: LocalSite, admin: aiohttp.ClientSession, stranger: aiohttp.ClientSession
) -> None:
    url = site.members[0].url
    attacks: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/v1/apps", {"data": APP}),
        ("POST", "/v1/secrets/escrow", {"json": {"public_key": "00" * 32}}),
        ("POST", "/v1/secrets/lockdown", {"json": {}}),
        ("POST", "/v1/secrets/unlock", {"json": {}}),
        (
            "PUT",
            "/v1/fleet/link",
            {
                "json": {
                    "hub": "https://evil:1",
                    "fleet": "f",
                    "root_key": "0",
                    "hub_fingerprint": "ab" * 32,
                }
            },
        ),
        ("POST", "/v1/members", {"json": {"host_id": "ghost", "raft": "10.9.9.9:7800"}}),
        ("POST", "/v1/tokens", {"json": {"ttl_s": 60}}),
        ("PUT", "/v1/kv/x", {"data": b"y"}),
        ("POST", "/v1/access-tokens", {"json": {"role": "admin"}}),
        ("GET", "/metrics", {}),
    ]
    for method, path, options in attacks:
        status, body = await call(stranger, method, url + path, **options)
        assert (status, code(body)) == (401, "unauthenticated"), (method, path, body)
    # The same first call with the admin token goes through: the refusal was the credential.
    status, body = await call(admin, "POST", url + "/v1/apps", data=APP)
    assert status == 200, body
    status, body = await call(admin, "DELETE", url + "/v1/apps/pwn")
    assert status == 200, body
    status, body = await call(admin, "GET", url + "/v1/members")
    assert [m["host_id"] for m in body["members"]] == ["h1"]  # no ghost
    status, body = await call(admin, "GET", url + "/v1/fleet")
    assert status == 200 and body["link"] is None  # no hub of the attacker's
    status, body = await call(admin, "GET", url + "/v1/kv/x")
    assert status == 404
    status, body = await call(admin, "GET", url + "/v1/access-tokens")
    assert body["tokens"] == []


async def test_status_tells_a_stranger_readiness_only(
    site: LocalSite, admin: aiohttp.ClientSession, stranger: aiohttp.ClientSession
) -> None:
    url = site.members[0].url + "/v1/status"
    assert await call(stranger, "GET", url) == (200, {"ready": True})
    status, body = await call(admin, "GET", url)
    assert status == 200 and body["site"] == "shop" and body["members"]


async def test_a_wrong_damaged_or_revoked_token_is_no_token(
    site: LocalSite, admin: aiohttp.ClientSession, stranger: aiohttp.ClientSession
) -> None:
    url = site.members[0].url
    status, made = await call(admin, "POST", url + "/v1/access-tokens", json={"role": "viewer"})
    assert status == 201, made
    viewer = {"Authorization": f"Bearer {made['token']}"}
    assert (await call(stranger, "GET", url + "/v1/members", headers=viewer))[0] == 200
    token_id, secret = made["token"].removeprefix("moat1.").split(".")
    forged = f"moat1.{token_id}.{'A' * len(secret)}"
    for bad in (forged, "moat1.garbage", "Basic abc", made["token"][:-2]):
        headers = {"Authorization": bad if bad.startswith("Basic") else f"Bearer {bad}"}
        status, body = await call(stranger, "GET", url + "/v1/members", headers=headers)
        assert (status, code(body)) == (401, "unauthenticated"), bad
    assert (await call(admin, "DELETE", url + f"/v1/access-tokens/{token_id}"))[0] == 200
    status, body = await call(stranger, "GET", url + "/v1/members", headers=viewer)
    assert (status, code(body)) == (401, "unauthenticated")


def allowed_request(method: str, path: str) -> tuple[str, dict[str, Any]]:
    """A concrete request for a route template, harmless when allowed (names that do not
    exist, bodies the handler refuses as bad input)."""
    concrete = (
        path.replace("{tenant}/{app}/{name}", "acme/noapp/events")
        .replace("{key}", "probe")
        .replace("{host_id}", "nohost")
        .replace("{name}", "noapp")
        .replace("{tenant}", "acme")
        .replace("{token_id}", "0000000000000000")
        .replace("{consumer}", "c1")
        .replace("{digest}", "0" * 64)
    )
    if path.startswith("/v1/apps") or path == "/v1/apps":
        concrete += "?tenant=acme"
    options: dict[str, Any] = {}
    if method in ("POST", "PUT"):
        options["data"] = b"\xff not json"
    return concrete, options


async def test_every_operator_route_by_role_and_tenant(
    site: LocalSite, admin: aiohttp.ClientSession, stranger: aiohttp.ClientSession
) -> None:
    """The whole matrix: each caller on each operator route is refused exactly when the
    policy table says so, with 401/403 and before the handler runs (no 'bad_json')."""
    url = site.members[0].url
    callers: dict[str, authz.Caller] = {"anonymous": authz.ANONYMOUS}
    headers: dict[str, dict[str, str]] = {"anonymous": {}}
    for role in authz.ROLES:
        for tenant in (None, "acme", "other"):
            if role == "admin" and tenant is not None:
                continue
            body: dict[str, Any] = {"role": role}
            if tenant:
                body["tenant"] = tenant
            status, made = await call(admin, "POST", url + "/v1/access-tokens", json=body)
            assert status == 201, made
            name = f"{role}/{tenant or '*'}"
            callers[name] = authz.Caller("token", role, tenant)
            headers[name] = {"Authorization": f"Bearer {made['token']}"}
    checked = 0
    for (method, template), rule in authz.RULES.items():
        if rule.surface != "operator" or template.endswith("/tail"):
            continue  # the websocket route is covered by the decision tests
        path, options = allowed_request(method, template)
        for name, caller in callers.items():
            tenant = "acme" if rule.tenant_from else None
            expected = authz.decide(rule, caller, tenant)
            status, body = await call(
                stranger, method, url + path, headers=headers[name], **options
            )
            if expected.allowed:
                assert code(body) not in REFUSED and status not in (401, 403), (name, path, body)
            else:
                assert (status, code(body)) == (expected.status, expected.code), (name, path)
            checked += 1
    assert checked > 200


async def test_the_socket_is_root_only_and_needs_no_token(site: LocalSite) -> None:
    path = site.members[0].data_dir / "agent.sock"
    mode = stat.S_IMODE(os.stat(path).st_mode)
    assert mode == 0o600 and os.stat(path).st_uid == os.getuid()
    connector = aiohttp.UnixConnector(path=str(path))
    async with aiohttp.ClientSession(connector=connector) as local:
        status, body = await call(local, "GET", "http://localhost/v1/members")
        assert status == 200 and body["members"][0]["host_id"] == "h1"
        status, body = await call(local, "POST", "http://localhost/v1/access-tokens",
                                  json={"role": "viewer", "ttl_s": 60})  # fmt: skip
        assert status == 201 and body["token"].startswith("moat1.")


async def test_peer_routes_take_only_a_members_signature(
    site: LocalSite, admin: aiohttp.ClientSession, stranger: aiohttp.ClientSession
) -> None:
    host = site.members[0]
    url = host.url
    path = "/v1/releases/" + "0" * 64
    member = PeerSigner("h1", load_or_create_key(host.data_dir))
    outsider = PeerSigner("h1", load_or_create_key(host.data_dir.parent / "not-a-member"))
    status, body = await call(stranger, "GET", url + path)
    assert (status, code(body)) == (401, "peer_only")
    status, body = await call(admin, "GET", url + path)  # an admin token is no host
    assert (status, code(body)) == (401, "peer_only")
    status, body = await call(stranger, "GET", url + path, headers=outsider.headers("GET", path))
    assert (status, code(body)) == (401, "peer_only")
    replayed_elsewhere = member.headers("GET", "/v1/releases/" + "1" * 64)
    status, body = await call(stranger, "GET", url + path, headers=replayed_elsewhere)
    assert (status, code(body)) == (401, "peer_only")
    status, body = await call(stranger, "GET", url + path, headers=member.headers("GET", path))
    assert (status, code(body)) == (404, "not_found")  # through the gate: no such release


async def test_join_guessing_is_slowed_per_source(
    site: LocalSite, stranger: aiohttp.ClientSession
) -> None:
    url = site.members[0].url + "/v1/join"
    statuses = []
    for _ in range(JOIN_BURST + 3):
        status, _body = await call(stranger, "POST", url, data=b"{}")
        statuses.append(status)
    assert statuses[0] in (400, 409)  # answered: malformed, or no identity on a static site
    assert statuses[-1] == 429 and 429 not in statuses[:5]


def test_every_route_the_agent_serves_has_a_rule() -> None:
    """A route added without a rule would answer 404 to everyone: caught here."""
    from aiohttp import web

    from meshorch.site.access_api import add_access_routes
    from meshorch.site.api import add_kv_and_status_routes
    from meshorch.site.app_api import add_app_routes
    from meshorch.site.fleet_api import add_fleet_routes
    from meshorch.site.host_api import add_host_routes
    from meshorch.site.member_api import add_member_routes
    from meshorch.site.secret_api import add_secret_routes
    from meshorch.site.stream_api import add_stream_routes

    app = web.Application()
    for add in (add_access_routes, add_kv_and_status_routes, add_app_routes, add_fleet_routes,
                add_member_routes, add_secret_routes):  # fmt: skip
        add(app)
    add_stream_routes(app, cast(Any, None))
    add_host_routes(app, cast(Any, None))
    http_metrics.install(app, CollectorRegistry(), "probe")
    keys = {
        authz.route_key(route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.resource is not None and route.method != "HEAD"
    }
    assert keys - set(authz.RULES) == set()
