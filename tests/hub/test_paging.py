"""Paginated, filtered listings of a real hub: limit, cursor, selector, tenants."""

from __future__ import annotations

import argparse
import asyncio

from central_hub import Hub, paging
from meshorch.cli.fleet import hub_list
from tests.hub.conftest import MakeSite, admin_token
from tests.hub.helpers import Operator, spec_text


async def walk(op: Operator, path: str, key: str, token: str | None = None) -> list[str]:
    """Every page of a listing, following next_cursor; the ids in order."""
    found: list[str] = []
    cursor = None
    while True:
        query = f"{path}{'&' if '?' in path else '?'}limit=7"
        if cursor is not None:
            query += f"&cursor={cursor}"
        status, answer = await op.call("GET", query, token=token)
        assert status == 200, answer
        assert len(answer[key]) <= 7
        found += [item.get("id") or item["name"] for item in answer[key]]
        cursor = answer["next_cursor"]
        if cursor is None:
            return found


async def test_a_cursor_walk_returns_every_site_once_across_inserts(
    admin: Operator, make_site: MakeSite
) -> None:
    for n in range(0, 40, 2):
        await make_site(f"s{n:02d}", zone="a" if n % 4 == 0 else "b")
    seen: list[str] = []
    cursor = None
    inserted = 0
    while True:
        query = "/v1/sites?limit=5" + ("" if cursor is None else f"&cursor={cursor}")
        answer = await admin.ok("GET", query)
        seen += [s["id"] for s in answer["sites"]]
        cursor = answer["next_cursor"]
        if cursor is None:
            break
        # Concurrent inserts: before the cursor, after it, and a deletion of one not read.
        await make_site(f"s{inserted * 2 + 1:02d}")
        inserted += 1
    before = {f"s{n:02d}" for n in range(0, 40, 2)}
    assert len(seen) == len(set(seen))  # nobody twice
    assert before <= set(seen)  # everyone present throughout
    assert seen == sorted(seen)  # id order
    first = await admin.ok("GET", "/v1/sites")
    assert len(first["sites"]) == min(paging.DEFAULT_LIMIT, 20 + inserted)


async def test_limit_bounds_and_bad_cursors_are_400(admin: Operator, make_site: MakeSite) -> None:
    await make_site("s1")
    for bad in ("0", "-1", "1001", "x", "1.5", ""):
        status, answer = await admin.call("GET", f"/v1/sites?limit={bad}")
        assert (status, answer["error"]["code"]) == (400, "bad_limit"), bad
    assert (await admin.ok("GET", "/v1/sites?limit=1000"))["next_cursor"] is None
    good = await admin.ok("GET", "/v1/sites?limit=1")
    assert good["next_cursor"] is None  # one site: the last page
    await make_site("s2")
    cursor = (await admin.ok("GET", "/v1/sites?limit=1"))["next_cursor"]
    assert isinstance(cursor, str)
    body, mac = cursor.split(".")
    for bad in ("garbage", "a.b", "", "..", cursor + "x", body + "." + mac[::-1], "%ff%fe"):
        status, answer = await admin.call("GET", f"/v1/sites?cursor={bad}")
        assert (status, answer["error"]["code"]) == (400, "bad_cursor"), bad
    status, answer = await admin.call("GET", f"/v1/apps?cursor={cursor}")  # another listing
    assert (status, answer["error"]["code"]) == (400, "bad_cursor")
    page = await admin.ok("GET", f"/v1/sites?limit=1&cursor={cursor}")
    assert [s["id"] for s in page["sites"]] == ["s2"] and page["next_cursor"] is None


async def test_selectors_filter_sites_by_labels(admin: Operator, make_site: MakeSite) -> None:
    await make_site("a1", zone="eu", tier="gold")
    await make_site("a2", zone="eu")
    await make_site("a3", zone="us", tier="gold")
    await make_site("a4")

    async def ids(selector: str) -> list[str]:
        answer = await admin.ok("GET", f"/v1/sites?selector={selector}")
        return [s["id"] for s in answer["sites"]]

    assert await ids("zone=eu") == ["a1", "a2"]
    assert await ids("zone==eu,tier=gold") == ["a1"]
    assert await ids("zone!=eu") == ["a3", "a4"]
    assert await ids("tier") == ["a1", "a3"]
    assert await ids("!tier") == ["a2", "a4"]
    assert await walk(admin, "/v1/sites?selector=tier", "sites") == ["a1", "a3"]
    for bad in ("=x", "zone=", "a=b=c", "!", "zone!=", ","):
        status, answer = await admin.call("GET", f"/v1/sites?selector={bad}")
        assert (status, answer["error"]["code"]) == (400, "bad_selector"), bad
    status, answer = await admin.call("GET", "/v1/apps?selector=zone=eu")  # apps: no labels
    assert (status, answer["error"]["code"]) == (400, "bad_selector")


async def test_a_tenants_cursor_never_reveals_another_tenants_apps(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    await make_site("s1")
    tokens = {}
    for tenant in ("ta", "tb"):
        await admin.ok("POST", "/v1/tenants", {"id": tenant}, 201)
        made = await admin.ok("POST", "/v1/tokens", {"role": "operator", "tenant": tenant}, 201)
        tokens[tenant] = made["token"]
    for n in range(10):  # interleaved names: a-0 (ta), b-0 (tb), ...
        for tenant, prefix in (("ta", "a"), ("tb", "b")):
            body = {"spec": spec_text(f"{prefix}{n}", "1.0"), "tenant": tenant}
            await admin.ok("POST", "/v1/apps", body, 202)
    walked_a = await walk(admin, "/v1/apps", "apps", token=tokens["ta"])
    walked_b = await walk(admin, "/v1/apps", "apps", token=tokens["tb"])
    assert walked_a == sorted(f"a{n}" for n in range(10))
    assert walked_b == sorted(f"b{n}" for n in range(10))
    everyone = await walk(admin, "/v1/apps", "apps")
    assert sorted(everyone) == sorted(walked_a + walked_b)

    status, page = await admin.call("GET", "/v1/apps?limit=3", token=tokens["ta"])
    cursor = page["next_cursor"]
    assert status == 200 and cursor is not None
    status, answer = await admin.call("GET", f"/v1/apps?cursor={cursor}", token=tokens["tb"])
    assert (status, answer["error"]["code"]) == (400, "bad_cursor")  # not B's cursor
    status, answer = await admin.call("GET", f"/v1/apps?cursor={cursor}")  # nor the admin's
    assert (status, answer["error"]["code"]) == (400, "bad_cursor")
    # Tokens, tenants and secrets page the same way, each within the caller's reach.
    for tenant in ("ta", "tb"):
        body = {"name": f"sec-{tenant}", "value": "v", "tenant": tenant}
        await admin.ok("POST", "/v1/secrets", body, 201)
    secrets = await walk(admin, "/v1/secrets", "secrets", token=tokens["ta"])
    assert secrets == ["sec-ta"]
    assert await walk(admin, "/v1/tenants", "tenants", token=tokens["tb"]) == ["tb"]
    status, answer = await admin.call("GET", "/v1/tokens?limit=0")
    assert (status, answer["error"]["code"]) == (400, "bad_limit")


async def test_the_cli_follows_cursors_or_takes_one_page(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    for n in range(130):  # more than one default page
        await admin.ok("POST", "/v1/sites", {"id": f"c{n:03d}", "public_key": "ab" * 32}, 201)
    args = argparse.Namespace(hub=hub.url, token=admin_token(hub), limit=None, cursor=None)
    every = await asyncio.to_thread(hub_list, args, "/v1/sites", "sites")
    assert [s["id"] for s in every] == [f"c{n:03d}" for n in range(130)]
    args.limit = 50
    page = await asyncio.to_thread(hub_list, args, "/v1/sites", "sites")
    assert [s["id"] for s in page] == [f"c{n:03d}" for n in range(50)]
