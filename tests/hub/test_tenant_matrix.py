"""The tenant matrix: every route of the hub's API, for each kind of caller, against objects
of tenant A. The expected outcome of each cell comes from the policy table
(``central_hub.authz``); the request is made for real, and a refused cell must have changed
nothing (a snapshot of the store before and after)."""

from __future__ import annotations

import functools
import itertools
import os
import tempfile
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from central_hub import Hub, api, authz
from meshorch.releases.wheels import build_test_release
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, healthy, spec_text

TA, TB = "tenant-aa", "tenant-bb"
APP_A = "app-of-aa-main"
BAD_TOKEN = "mht_00112233_" + "ab" * 32


@dataclass(frozen=True)
class Caller:
    name: str
    role: authz.Role | None  # None: no token, or a bad one
    tenant: str = ""


CALLERS = (
    Caller("fleet admin", "admin", "*"),
    Caller("admin A", "admin", TA),
    Caller("operator A", "operator", TA),
    Caller("viewer A", "viewer", TA),
    Caller("admin B", "admin", TB),
    Caller("operator B", "operator", TB),
    Caller("viewer B", "viewer", TB),
    Caller("no token", None),
    Caller("bad token", None),
)


@dataclass
class World:
    hub: Hub
    admin: Operator
    tokens: dict[str, str]  # caller name -> token text
    deployment: str
    counter: itertools.count[int]

    def fresh(self, prefix: str) -> str:
        return f"{prefix}-{next(self.counter)}"


# A case: given the world, set up what the request needs (as the fleet admin) and return
# (path, body, tenant of the object or None, whether the tenant is given in a create body).
Setup = Callable[[World], Awaitable[tuple[str, object, str | None, bool]]]


def fixed(path: str, body: object = None, tenant: str | None = None) -> Setup:
    async def setup(world: World) -> tuple[str, object, str | None, bool]:
        return path, body, tenant, False

    return setup


async def new_token_of_a(world: World) -> tuple[str, object, str | None, bool]:
    made = await world.admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": TA}, 201)
    return f"/v1/tokens/{made['id']}", None, TA, False


async def new_tenant(world: World) -> tuple[str, object, str | None, bool]:
    tenant = world.fresh("tx")
    await world.admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    return f"/v1/tenants/{tenant}", None, tenant, False


async def new_site(world: World) -> tuple[str, object, str | None, bool]:
    site = world.fresh("sx")
    await world.admin.ok("POST", "/v1/sites", {"id": site, "public_key": "ab" * 32}, 201)
    return f"/v1/sites/{site}", None, None, False


async def new_site_to_decommission(world: World) -> tuple[str, object, str | None, bool]:
    path, _, _, _ = await new_site(world)
    return f"{path}/decommission", {}, None, False


async def new_site_key(world: World) -> tuple[str, object, str | None, bool]:
    path, _, _, _ = await new_site(world)
    return f"{path}/key", {"public_key": os.urandom(32).hex()}, None, False


async def new_app_of_a(world: World) -> tuple[str, object, str | None, bool]:
    name = world.fresh("app-of-aa")
    body = {"spec": spec_text(name), "tenant": TA}
    deployment = await world.admin.ok("POST", "/v1/apps", body, 202)
    sites = len(deployment["waves"][0]) if deployment["waves"] else 0
    confirm = f"?confirm={sites}" if sites else ""  # the deletion interlock's
    return f"/v1/apps/{name}{confirm}", None, TA, False


async def create_app_of_a(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/apps", {"spec": spec_text(world.fresh("app-of-aa")), "tenant": TA}, TA, True


async def create_token_of_a(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/tokens", {"role": "viewer", "tenant": TA}, TA, True


async def create_tenant(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/tenants", {"id": world.fresh("tn")}, None, False


async def create_site(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/sites", {"id": world.fresh("sn"), "public_key": "cd" * 32}, None, False


async def deployment_of_a(world: World) -> tuple[str, object, str | None, bool]:
    return f"/v1/deployments/{world.deployment}", None, TA, False


async def create_secret_of_a(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/secrets", {"name": world.fresh("sec-of-aa"), "value": "v", "tenant": TA}, TA, True


async def new_secret_of_a(world: World) -> tuple[str, object, str | None, bool]:
    name = world.fresh("sec-of-aa")
    await world.admin.ok("POST", "/v1/secrets", {"name": name, "value": "v", "tenant": TA}, 201)
    return f"/v1/secrets/{name}?tenant={TA}", None, TA, False


@functools.cache
def release_wheel() -> bytes:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(__file__).resolve().parents[2]
        return build_test_release(root, Path(tmp), "0.1.0+matrix").read_bytes()


async def upload_release(world: World) -> tuple[str, object, str | None, bool]:
    return "/v1/releases", release_wheel(), None, False


QUOTA = {"cpu_millis": 2000, "memory_bytes": None, "instances": 5}
SECRET_A = "sec-of-aa-main"

# (method, path) -> (setup, status of an allowed cell)
CASES: dict[tuple[str, str], tuple[Setup, int]] = {
    ("GET", "/v1/fleet"): (fixed("/v1/fleet"), 200),
    ("POST", "/v1/fleet/rotate"): (fixed("/v1/fleet/rotate"), 200),
    ("GET", "/v1/deltas"): (fixed("/v1/deltas"), 200),
    ("GET", "/v1/deltas/export"): (fixed("/v1/deltas/export?site=site-1"), 200),
    ("GET", "/v1/openapi.json"): (fixed("/v1/openapi.json"), 200),
    ("POST", "/v1/link/enroll"): (
        fixed("/v1/link/enroll", {"site": "site-1", "public_key": "ab" * 32, "token": "x"}),
        403,  # an operator token is no enrollment token
    ),
    ("GET", "/v1/link/deltas"): (fixed("/v1/link/deltas?wait=0"), 401),  # not signed
    ("GET", "/v1/link/snapshot"): (fixed("/v1/link/snapshot?after=0"), 401),  # not signed
    ("POST", "/v1/link/report"): (fixed("/v1/link/report", {}), 401),
    ("GET", "/v1/link/reports"): (fixed("/v1/link/reports"), 401),  # not signed
    ("GET", "/v1/link/gossip"): (fixed("/v1/link/gossip"), 401),
    ("POST", "/v1/link/key"): (fixed("/v1/link/key", {}), 401),
    ("POST", "/v1/tokens"): (create_token_of_a, 201),
    ("GET", "/v1/tokens"): (fixed("/v1/tokens"), 200),
    ("DELETE", "/v1/tokens/{id}"): (new_token_of_a, 200),
    ("POST", "/v1/tenants"): (create_tenant, 201),
    ("GET", "/v1/tenants"): (fixed("/v1/tenants"), 200),
    ("GET", "/v1/tenants/{id}"): (fixed(f"/v1/tenants/{TA}", None, TA), 200),
    ("DELETE", "/v1/tenants/{id}"): (new_tenant, 200),
    ("PUT", "/v1/tenants/{id}/quota"): (fixed(f"/v1/tenants/{TA}/quota", QUOTA, TA), 200),
    ("GET", "/v1/tenants/{id}/quota"): (fixed(f"/v1/tenants/{TA}/quota", None, TA), 200),
    ("GET", "/v1/audit"): (fixed("/v1/audit?limit=500"), 200),
    ("POST", "/v1/sites"): (create_site, 201),
    ("GET", "/v1/sites"): (fixed("/v1/sites"), 200),
    ("GET", "/v1/sites/{id}"): (fixed("/v1/sites/site-1"), 200),
    ("GET", "/v1/sites/{id}/pending"): (fixed("/v1/sites/site-1/pending"), 200),
    ("GET", "/v1/sites/{id}/trends"): (fixed("/v1/sites/site-1/trends"), 200),
    ("POST", "/v1/sites/{id}/hold"): (fixed("/v1/sites/site-1/hold", {}), 200),
    ("POST", "/v1/sites/{id}/release"): (fixed("/v1/sites/site-1/release", {}), 200),
    ("PUT", "/v1/sites/{id}/labels"): (fixed("/v1/sites/site-1/labels", {"zone": "z1"}), 200),
    ("DELETE", "/v1/sites/{id}"): (new_site, 200),
    ("PUT", "/v1/sites/{id}/key"): (new_site_key, 200),
    ("POST", "/v1/sites/{id}/decommission"): (new_site_to_decommission, 200),
    ("GET", "/v1/alerts"): (fixed("/v1/alerts"), 200),
    ("POST", "/v1/releases"): (upload_release, 201),
    ("GET", "/v1/releases"): (fixed("/v1/releases"), 200),
    ("POST", "/v1/releases/{version}/rollout"): (fixed("/v1/releases/9.9.9/rollout", {}), 404),
    ("GET", "/v1/link/releases/{digest}"): (fixed("/v1/link/releases/" + "ab" * 32), 401),
    # Allowed, and no such alert: 404 for the roles that may acknowledge.
    ("POST", "/v1/alerts/{id}/ack"): (fixed("/v1/alerts/no-such-alert/ack", {}), 404),
    ("POST", "/v1/apps"): (create_app_of_a, 202),
    ("GET", "/v1/apps"): (fixed("/v1/apps"), 200),
    ("GET", "/v1/apps/{name}"): (fixed(f"/v1/apps/{APP_A}", None, TA), 200),
    ("DELETE", "/v1/apps/{name}"): (new_app_of_a, 200),
    ("GET", "/v1/deployments/{id}"): (deployment_of_a, 200),
    ("POST", "/v1/secrets"): (create_secret_of_a, 201),
    ("GET", "/v1/secrets"): (fixed("/v1/secrets"), 200),
    ("GET", "/v1/secrets/{name}"): (fixed(f"/v1/secrets/{SECRET_A}?tenant={TA}", None, TA), 200),
    ("DELETE", "/v1/secrets/{name}"): (new_secret_of_a, 200),
    ("POST", "/v1/sites/{id}/lockdown"): (fixed("/v1/sites/site-1/lockdown", {}), 200),
    ("POST", "/v1/sites/{id}/unlock"): (fixed("/v1/sites/site-1/unlock", {}), 200),
    ("POST", "/v1/sites/{id}/secrets/rotate"): (fixed("/v1/sites/site-1/secrets/rotate", {}), 200),
    # Allowed, and refused by the site's state: nothing is escrowed in this world.
    ("POST", "/v1/sites/{id}/unseal"): (fixed("/v1/sites/site-1/unseal", {}), 409),
    ("GET", "/v1/link/escrow-key"): (fixed("/v1/link/escrow-key"), 401),  # not signed
    ("POST", "/v1/link/escrow"): (fixed("/v1/link/escrow", {}), 401),
    ("POST", "/v1/link/unseal"): (fixed("/v1/link/unseal", {}), 401),
    ("GET", "/v1/logs"): (fixed(f"/v1/logs?tenant={TA}", None, TA), 200),
    ("GET", "/v1/logs/streams"): (fixed("/v1/logs/streams"), 200),
    ("GET", "/v1/link/streams"): (fixed("/v1/link/streams"), 401),  # not signed
    ("POST", "/v1/link/streams"): (fixed("/v1/link/streams", {"streams": []}), 401),
}


def expected(route: api.Route, caller: Caller, tenant: str | None, create: bool, ok: int) -> int:
    """The outcome the policy table gives this cell."""
    if route.auth in api.SCHEMES:
        return ok  # the same for every caller: operator tokens do not count there
    if caller.role is None:
        return 401
    if not authz.permits(caller, route.auth):  # type: ignore[arg-type]
        return 403
    if tenant is not None and not authz.reaches(caller, tenant):  # type: ignore[arg-type]
        return 403 if create else 404  # naming another tenant in a body: field_not_allowed
    return ok


def snapshot(hub: Hub) -> dict[str, Any]:
    """Everything a request can change (not the audit log, which records refusals)."""
    dbs = ("meta", "tokens", "sites", "apps", "deployments", "tenants")
    state = {db: sorted(map(orjson.dumps, hub.store.values_json(db))) for db in dbs}
    state["head"] = [orjson.dumps(hub.head.version)]
    return state


async def make_world(hub: Hub, admin: Operator, make_site: MakeSite) -> World:
    site = await make_site("site-1")
    for tenant in (TA, TB):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
    tokens = {}
    for caller in CALLERS:
        if caller.role is None:
            continue
        body = {"role": caller.role, "tenant": caller.tenant}
        tokens[caller.name] = (await admin.ok("POST", "/v1/tokens", body, 201))["token"]
    dep = await admin.ok("POST", "/v1/apps", {"spec": spec_text(APP_A), "tenant": TA}, 202)
    await admin.ok("POST", "/v1/secrets", {"name": SECRET_A, "value": "v", "tenant": TA}, 201)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text("app-of-bb"), "tenant": TB}, 202)
    await site.sync()
    instances = [
        {"app": app, "instance_id": f"{app}-0", "service": "web", "version": "1.0",
         "state": "running", "ready": True, "restarts": 0}
        for app in (APP_A, "app-of-bb")
    ]  # fmt: skip
    status, answer = await site.report(
        {APP_A: healthy("1.0"), "app-of-bb": healthy("1.0")},
        hosts=[{"host_id": "h1", "alive": True, "instances": instances}],
    )
    assert status == 200, answer
    return World(hub, admin, tokens, dep["id"], itertools.count(1))


def route_key(route: api.Route) -> tuple[str, str]:
    return route.method, route.path


def test_the_matrix_covers_every_route() -> None:
    missing = [route_key(r) for r in api.ROUTES if route_key(r) not in CASES]
    assert not missing, f"routes without a tenant-matrix case (add them to CASES): {missing}"


async def test_the_tenant_matrix(hub: Hub, admin: Operator, make_site: MakeSite) -> None:
    world = await make_world(hub, admin, make_site)
    checked = 0
    routes = [r for r in api.ROUTES if route_key(r) in CASES]
    for route in routes:
        setup, ok = CASES[route_key(route)]
        for caller in CALLERS:
            path, body, tenant, create = await setup(world)
            want = expected(route, caller, tenant, create, ok)
            before = snapshot(hub)
            token = BAD_TOKEN if caller.name == "bad token" else world.tokens.get(caller.name)
            status, answer = await call(admin, route.method, path, body, token)
            cell = f"{caller.name}: {route.method} {path} -> {status} {answer}"
            assert status == want, cell
            if status >= 400:
                assert snapshot(hub) == before, f"a refused request changed state: {cell}"
                code = {401: "unauthorized", 403: "forbidden", 404: "not_found"}.get(status)
                foreign = create and tenant is not None and authz.permits(caller, route.auth)  # type: ignore[arg-type]
                if status == 403 and foreign:  # allowed the action, not for that tenant
                    code = "field_not_allowed"
                if code is not None and route.auth not in api.SCHEMES:
                    assert answer["error"]["code"] == code, cell
            elif caller.tenant == TB and route.path == "/v1/audit":
                assert {e["tenant"] for e in answer["entries"]} == {TB}, cell  # B's own
            elif caller.tenant == TB:
                text = orjson.dumps(answer).decode()
                assert TA not in text and "app-of-aa" not in text, f"tenant A leaked: {cell}"
            checked += 1
    assert checked == len(routes) * len(CALLERS) >= 39 * 9


async def call(
    admin: Operator, method: str, path: str, body: object, token: str | None
) -> tuple[int, Any]:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    data = body if isinstance(body, bytes) else None if body is None else orjson.dumps(body)
    async with admin.session.request(method, admin.url + path, data=data, headers=headers) as r:
        return r.status, orjson.loads(await r.read())


async def test_a_tenant_sees_site_health_and_only_its_own_instances(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    world = await make_world(hub, admin, make_site)
    full = await admin.ok("GET", "/v1/sites/site-1")
    assert {i["app"] for i in full["hosts"][0]["instances"]} == {APP_A, "app-of-bb"}
    status, mine = await call(admin, "GET", "/v1/sites/site-1", None, world.tokens["viewer B"])
    assert status == 200 and mine["health"] == full["health"]
    assert [i["app"] for i in mine["hosts"][0]["instances"]] == ["app-of-bb"]
    assert set(mine["apps"]) == {"app-of-bb"}


async def test_listings_show_the_callers_tenant_and_filter_for_fleet_admins(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    world = await make_world(hub, admin, make_site)
    status, apps = await call(admin, "GET", "/v1/apps", None, world.tokens["viewer A"])
    assert status == 200 and [a["name"] for a in apps["apps"]] == [APP_A]
    only_b = await admin.ok("GET", f"/v1/apps?tenant={TB}")
    assert [a["name"] for a in only_b["apps"]] == ["app-of-bb"]
    status, listed = await call(admin, "GET", "/v1/tokens", None, world.tokens["admin A"])
    assert status == 200 and {t["tenant"] for t in listed["tokens"]} == {TA}
    status, tenants = await call(admin, "GET", "/v1/tenants", None, world.tokens["operator B"])
    assert [t["id"] for t in tenants["tenants"]] == [TB]
    everyone = await admin.ok("GET", "/v1/tenants")
    assert {t["id"] for t in everyone["tenants"]} == {"default", TA, TB}
