"""Bad input is answered with a JSON error and changes nothing; the OpenAPI document."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson

from central_hub import Hub
from central_hub.api import ROUTES
from meshorch.apps.spec import MAX_SPEC_BYTES, parse_app_spec, to_json
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, spec_text


async def raw(
    session: aiohttp.ClientSession, admin: Operator, method: str, path: str, data: bytes
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {admin.token}"}
    async with session.request(method, admin.url + path, data=data, headers=headers) as resp:
        assert resp.content_type == "application/json"
        return resp.status, await resp.json()


async def test_bad_bodies_are_400_and_change_nothing(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession, make_site: MakeSite
) -> None:
    await make_site("shop-1")
    cases: list[tuple[str, str, bytes, int, str]] = [
        ("POST", "/v1/apps", b"{not json", 400, "bad_json"),
        ("POST", "/v1/apps", b"[]", 400, "bad_request"),
        ("POST", "/v1/apps", b'{"spec": 5}', 400, "bad_spec"),
        ("POST", "/v1/apps", b'{"spec": "name: [unclosed"}', 400, "bad_spec"),
        # A control character: YAML's reader refuses it as the loader is built (was 500).
        ("POST", "/v1/apps", b'{"spec": "name: a\\u0001b"}', 400, "bad_spec"),
        ("POST", "/v1/apps", b'{"spec": "name: a\\u0000"}', 400, "bad_spec"),
        ("POST", "/v1/apps", b'{"spec": {"name": "web"}}', 400, "bad_spec"),
        ("POST", "/v1/apps", b'{"spec": {}, "extra": 1}', 400, "field_not_allowed"),
        ("POST", "/v1/sites", b'{"id": "Shop_1"}', 400, "bad_site_id"),
        ("POST", "/v1/sites", b'{"id": "s", "labels": {"a": 1}}', 400, "bad_labels"),
        ("POST", "/v1/sites", b'{"id": "s", "public_key": "zz"}', 400, "bad_public_key"),
        ("POST", "/v1/sites", b'{"id": "shop-1"}', 409, "site_exists"),
        ("PUT", "/v1/sites/shop-1/labels", b'["x"]', 400, "bad_labels"),
        ("PUT", "/v1/sites/nope/labels", b"{}", 404, "not_found"),
        ("POST", "/v1/tokens", b'{"role": "root"}', 400, "bad_role"),
        ("POST", "/v1/tokens", b'{"role": "viewer", "expires_in_s": -1}', 400, "bad_request"),
        ("GET", "/v1/deltas?after=-1", b"", 400, "bad_after"),
        ("GET", "/v1/deltas?limit=100000", b"", 400, "bad_limit"),
        ("GET", "/v1/deltas/export?after=x", b"", 400, "bad_after"),
        ("GET", "/v1/deltas/export?limit=0", b"", 400, "bad_limit"),
        ("GET", "/v1/deltas/export?site=Bad_Site", b"", 400, "bad_site_id"),
        ("GET", "/v1/apps/nope", b"", 404, "not_found"),
        ("GET", "/v1/deployments/dep-9", b"", 404, "not_found"),
        ("GET", "/v1/nowhere", b"", 404, "not_found"),
        ("DELETE", "/v1/fleet", b"", 405, "method_not_allowed"),
    ]
    spec = spec_text().replace('"', '\\"').replace("\n", "\\n")
    bad_placement = f'{{"spec": "{spec}", "placement": {{"max_parallel": "x"}}}}'.encode()
    cases.append(("POST", "/v1/apps", bad_placement, 400, "bad_placement"))
    for method, path, data, status, code in cases:
        got, answer = await raw(session, admin, method, path, data)
        assert (got, answer["error"]["code"]) == (status, code), (path, data, answer)
        assert answer["error"]["message"]
    assert hub.head.version == 0
    assert (await admin.ok("GET", "/v1/apps"))["apps"] == []
    assert [s["id"] for s in (await admin.ok("GET", "/v1/sites"))["sites"]] == ["shop-1"]


async def test_huge_bodies_are_413(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession, make_site: MakeSite
) -> None:
    site = await make_site("shop-1")
    huge = b'{"spec": "' + b"x" * (3 * 1024 * 1024) + b'"}'
    status, answer = await raw(session, admin, "POST", "/v1/apps", huge)
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    status, answer = await site.request("POST", "/v1/link/report", b"[" + b"1," * 2_000_000 + b"1]")
    assert status == 413


async def test_a_too_large_spec_is_refused(admin: Operator, make_site: MakeSite) -> None:
    await make_site("shop-1")
    spec = to_json(parse_app_spec(spec_text()))
    # Quotes are escaped twice in an envelope: a spec under its own limit makes a delta
    # over the delta limit.
    spec["services"][0]["containers"][0]["env"] = {f"V{i}": '"' * 100 for i in range(800)}  # type: ignore[index]
    assert len(orjson.dumps(spec)) < MAX_SPEC_BYTES
    status, answer = await admin.call("POST", "/v1/apps", {"spec": spec})
    assert status == 413 and answer["error"]["code"] == "delta_too_large"
    assert (await admin.ok("GET", "/v1/apps"))["apps"] == []
    assert (await admin.ok("GET", "/v1/deltas"))["head"] == 0


async def test_openapi_lists_every_route(hub: Hub, session: aiohttp.ClientSession) -> None:
    async with session.get(hub.url + "/v1/openapi.json") as resp:
        assert resp.status == 200
        doc = await resp.json()
    assert doc["openapi"].startswith("3.1")
    registered = {
        (route.method.lower(), route.resource.canonical)
        for route in hub_routes(hub)
        if route.method != "HEAD"
        and route.resource is not None
        and route.resource.canonical.startswith("/v1/")  # the API; not the dashboard's pages
    }
    documented = {(m, path) for path, ops in doc["paths"].items() for m in ops}
    assert registered == documented
    assert len(documented) == len(ROUTES)
    schemas = doc["components"]["schemas"]
    for path, ops in doc["paths"].items():
        for method, op in ops.items():
            for answer in op["responses"].values():
                ref = answer["content"]["application/json"]["schema"]["$ref"]
                assert ref.rsplit("/", 1)[1] in schemas, (path, method)
    apps = doc["paths"]["/v1/apps"]["post"]
    assert apps["security"] == [{"operatorToken": []}] and "202" in apps["responses"]
    assert doc["paths"]["/v1/link/report"]["post"]["security"] == [{"siteSignature": []}]
    assert doc["paths"]["/v1/fleet"]["get"]["security"] == []


def hub_routes(hub: Hub) -> list[Any]:
    runner = hub._runner
    assert runner is not None and runner.app is not None
    return list(runner.app.router.routes())
