"""The site link: enrollment, signed requests, long-poll, reports, root rotation."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import aiohttp
import orjson
import pytest

from central_hub import Hub
from meshorch.fleet.delta import TrustState, parse, verify, verify_batch
from meshorch.fleet.link_auth import sign_request, url_host
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, Site, healthy, spec_text, until


async def test_enrollment_token_is_single_use(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    answer = await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    token = answer["enroll_token"]
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    status, _ = await site.request("GET", "/v1/link/deltas?after=0&wait=0")
    assert status == 401  # not enrolled yet
    body = {"site": "shop-1", "public_key": site.public_key, "token": token}
    async with session.post(hub.url + "/v1/link/enroll", json=body) as resp:
        assert resp.status == 200 and await resp.json() == {"site": "shop-1"}
    status, answer = await site.request("GET", "/v1/link/deltas?after=0&wait=0")
    assert status == 200 and answer == {"head": 0, "deltas": []}
    thief = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    body["public_key"] = thief.public_key
    async with session.post(hub.url + "/v1/link/enroll", json=body) as resp:
        assert resp.status == 403
        assert (await resp.json())["error"]["code"] == "bad_enroll_token"
    status, answer = await thief.request("GET", "/v1/link/deltas?after=0&wait=0")
    assert status == 401 and answer["error"]["code"] == "bad_site_signature"
    detail = await admin.ok("GET", "/v1/sites/shop-1")
    assert detail["public_key"] == site.public_key


async def test_wrong_enroll_token_is_refused(
    hub: Hub, admin: Operator, session: aiohttp.ClientSession
) -> None:
    await admin.ok("POST", "/v1/sites", {"id": "shop-1"}, 201)
    body = {"site": "shop-1", "public_key": "ab" * 32, "token": "mhe_" + "00" * 24}
    async with session.post(hub.url + "/v1/link/enroll", json=body) as resp:
        assert resp.status == 403
    assert (await admin.ok("GET", "/v1/sites/shop-1"))["public_key"] is None


async def test_signatures_are_checked(
    hub: Hub, make_site: MakeSite, session: aiohttp.ClientSession
) -> None:
    site = await make_site("shop-1")
    path = "/v1/link/deltas?after=0&wait=0"
    h = url_host(hub.url)
    cases = {
        "other path": sign_request(
            site.key, "shop-1", "GET", "/v1/link/deltas", b"", time.time(), host=h
        ),
        "old": sign_request(site.key, "shop-1", "GET", path, b"", time.time() - 1000, host=h),
        "unknown site": sign_request(site.key, "shop-9", "GET", path, b"", time.time(), host=h),
        "no headers": {},
    }
    for name, headers in cases.items():
        async with session.get(hub.url + path, headers=headers) as resp:
            answer = await resp.json()
            assert resp.status == 401, name
            assert answer["error"]["code"] == "bad_site_signature", name
    report = orjson.dumps({"v": 1})
    headers = sign_request(
        site.key, "shop-1", "POST", "/v1/link/report", report, time.time(), host=h
    )
    async with session.post(hub.url + "/v1/link/report", data=b"x" + report, headers=headers) as r:
        assert r.status == 401  # the body is covered by the signature


async def test_long_poll_answers_when_a_delta_is_appended(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    site = await make_site("shop-1")
    started = time.monotonic()
    fetch = asyncio.create_task(site.fetch(after=0, wait=20))
    await until(lambda: hub.link_waiters == 1)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    async with asyncio.timeout(5):
        head, envelopes = await fetch
    assert head == 1 and len(envelopes) == 1
    assert time.monotonic() - started < 15  # answered by the append, not the wait's end
    verify(envelopes[0], site.trust, time.time())


async def test_many_waiters_are_all_woken(hub: Hub, admin: Operator, make_site: MakeSite) -> None:
    site = await make_site("shop-1")
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        site.session = session
        fetches = [asyncio.create_task(site.fetch(after=0, wait=20)) for _ in range(150)]
        await until(lambda: hub.link_waiters == 150, timeout_s=15)
        await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
        async with asyncio.timeout(10):
            answers = await asyncio.gather(*fetches)
    assert all(head == 1 and len(envelopes) == 1 for head, envelopes in answers)
    assert hub.link_waiters == 0


async def test_deltas_limit_and_after(admin: Operator, make_site: MakeSite) -> None:
    site = await make_site("shop-1")
    for version in ("1", "2", "3"):
        await admin.ok("POST", "/v1/apps", {"spec": spec_text(version=version)}, 202)
    status, answer = await site.request("GET", "/v1/link/deltas?after=1&limit=1&wait=0")
    assert status == 200 and answer["head"] == 3
    (envelope,) = answer["deltas"]
    delta, _, _ = parse(orjson.dumps(envelope))
    assert delta.version == 2


async def test_reports_are_validated_and_kept(admin: Operator, make_site: MakeSite) -> None:
    site = await make_site("shop-1")
    status, answer = await site.report({"web": {"version": "1", "state": "sleepy"}})
    assert status == 400 and answer["error"]["code"] == "bad_report"
    assert any("sleepy" in p for p in answer["error"]["problems"])
    status, answer = await site.report({}, site="shop-2")
    assert status == 400
    for garbage in (b"", b"[1,2]", b"\xff\xfe", b'{"v": 1, "site": "shop-1", "hosts": 7}'):
        status, _ = await site.request("POST", "/v1/link/report", garbage)
        assert status == 400, garbage
    assert (await admin.ok("GET", "/v1/sites/shop-1"))["last_seen"] is None
    status, answer = await site.report({"web": healthy("1.0")})
    assert status == 200 and answer == {"head": 0}
    detail = await admin.ok("GET", "/v1/sites/shop-1")
    assert detail["health"] == "healthy" and detail["hosts"][0]["host_id"] == "h1"


async def test_rotation_is_signed_by_both_keys_then_only_the_new_one(
    hub: Hub, admin: Operator, make_site: MakeSite, tmp_path: Path
) -> None:
    site = await make_site("shop-1")
    old_key = hub.root_key
    await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
    rotation = await admin.ok("POST", "/v1/fleet/rotate")
    new_key = rotation["root_key"]
    assert new_key != old_key and rotation["version"] == 2
    assert (await admin.ok("GET", "/v1/fleet"))["root_key"] == new_key
    data_dir = hub.data_dir
    assert (data_dir / "fleet-root.key.1.retired").read_text().strip() != ""
    assert not (data_dir / "fleet-root.key.new").exists()
    await admin.ok("POST", "/v1/apps", {"spec": spec_text(version="2")}, 202)
    _, envelopes = await site.fetch(after=0)
    _, _, rotate_sigs = parse(envelopes[1])
    assert {key for key, _ in rotate_sigs} == {old_key, new_key}
    _, _, later_sigs = parse(envelopes[2])
    assert [key for key, _ in later_sigs] == [new_key]
    result = verify_batch(envelopes, site.trust, time.time())  # trusting the old key only
    assert result.rejected is None and result.state is not None
    assert result.state.trusted_keys == {new_key}
    stale = TrustState(
        fleet=hub.fleet,
        trusted_keys=frozenset({old_key}),
        version=2,
        head=result.accepted[1].digest,
    )
    with pytest.raises(Exception, match="unknown_key"):
        verify(envelopes[2], stale, time.time())
