"""Attacks on the rotation of a site's key at a real hub (``POST /v1/link/key``): each
refused request changes nothing, and is paired with the right one succeeding."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from nacl.signing import SigningKey

from central_hub import Hub
from central_hub.gossip import SiteKeyOpener
from gossip import BadCertError, DatagramSealer, issue_cert
from meshorch.fleet.link_auth import sign_request, url_host
from meshorch.fleet.sitekey import rotation_body
from tests.hub.conftest import admin_token, hub_config
from tests.hub.helpers import Operator, Site

KEY_PATH = "/v1/link/key"
SITE_ROUTES = (
    ("GET", "/v1/link/deltas?after=0&wait=0"),
    ("GET", "/v1/link/streams"),
    ("GET", "/v1/link/escrow-key"),
)


@pytest.fixture
async def hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with Hub(hub_config(tmp_path / "hub")) as running:
        yield running


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as client:
        yield client


@pytest.fixture
async def site(hub: Hub, session: aiohttp.ClientSession) -> Site:
    shop = Site(session, hub.url, "shop", hub.fleet, hub.root_key)
    admin = Operator(session, hub.url, admin_token(hub))
    body = {"id": "shop", "labels": {}, "public_key": shop.public_key}
    await admin.ok("POST", "/v1/sites", body, 201)
    return shop


def admin_of(hub: Hub, session: aiohttp.ClientSession) -> Operator:
    return Operator(session, hub.url, admin_token(hub))


async def key_at_hub(hub: Hub, session: aiohttp.ClientSession) -> str:
    return str((await admin_of(hub, session).ok("GET", "/v1/sites/shop"))["public_key"])


async def post_key(
    session: aiohttp.ClientSession, hub: Hub, body: bytes, signer: SigningKey, site: str = "shop"
) -> tuple[int, Any]:
    headers = sign_request(
        signer, site, "POST", KEY_PATH, body, time.time(), host=url_host(hub.url)
    )
    async with session.post(hub.url + KEY_PATH, data=body, headers=headers) as response:
        return response.status, orjson.loads(await response.read())


async def reported(site: Site) -> int:
    status, _ = await site.report({})
    return status


async def test_a_rotation_replaces_the_key_and_the_old_one_opens_nothing(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    old, new = site.key, SigningKey.generate()
    assert await reported(site) == 200
    status, answer = await post_key(session, hub, rotation_body("shop", new, time.time()), old)
    assert status == 200, answer
    new_hex = bytes(new.verify_key).hex()
    assert answer == {"site": "shop", "public_key": new_hex, "rotated": True}
    assert await key_at_hub(hub, session) == new_hex
    # The old key (a revoked host's) is refused on every site route; the new one works.
    for method, path in SITE_ROUTES:
        status, answer = await site.request(method, path)
        assert status == 401 and answer["error"]["code"] == "bad_site_signature", path
    assert await reported(site) == 401
    site.key = new
    assert await reported(site) == 200
    for method, path in SITE_ROUTES:
        status, answer = await site.request(method, path)
        assert status == 200, (path, answer)
    detail = await admin_of(hub, session).ok("GET", "/v1/sites/shop")
    assert detail["key_rotations"] == 1 and detail["key_rotated_at"] is not None
    audit = await admin_of(hub, session).ok("GET", "/v1/audit")
    assert any("key rotated" in entry.get("detail", "") for entry in audit["entries"])


async def test_a_rotation_signed_by_another_key_is_refused_and_changes_nothing(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    thief, new = SigningKey.generate(), SigningKey.generate()
    body = rotation_body("shop", new, time.time())
    status, answer = await post_key(session, hub, body, thief)
    assert status == 401 and answer["error"]["code"] == "bad_site_signature"
    # Signed by the new key itself: a key cannot vouch for itself.
    status, answer = await post_key(session, hub, body, new)
    assert status == 401
    assert await key_at_hub(hub, session) == site.public_key
    assert await reported(site) == 200
    status, _ = await post_key(session, hub, body, site.key)
    assert status == 200 and await key_at_hub(hub, session) == bytes(new.verify_key).hex()


async def test_a_rotation_with_a_bad_proof_is_refused_and_changes_nothing(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    new, other = SigningKey.generate(), SigningKey.generate()
    now = time.time()
    good = orjson.loads(rotation_body("shop", new, now))
    bad_bodies = {
        # the proof made by a key other than the one bound
        "another key's proof": {
            **good,
            "proof": orjson.loads(rotation_body("shop", other, now))["proof"],
        },
        # a proof made for another site
        "another site's proof": orjson.loads(rotation_body("shop-2", new, now)),
        # a proof made long ago (or for later)
        "a stale proof": orjson.loads(rotation_body("shop", new, now - 3600)),
        "the time changed": {**good, "time": now + 1},
        "no proof": {"public_key": good["public_key"], "time": now},
        "an extra field": {**good, "labels": {"x": "y"}},
        "not hex": {**good, "proof": "zz" * 64},
    }
    for why, body in bad_bodies.items():
        status, answer = await post_key(session, hub, orjson.dumps(body), site.key)
        assert status == 400 and answer["error"]["code"] == "bad_key_rotation", why
    status, answer = await post_key(session, hub, b"[1, 2]", site.key)
    assert status == 400, answer
    assert await key_at_hub(hub, session) == site.public_key
    status, answer = await post_key(session, hub, orjson.dumps(good), site.key)
    assert status == 200 and answer["rotated"], answer


async def test_a_huge_rotation_body_is_refused_before_any_check(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    body = b'{"public_key": "' + b"a" * 100_000 + b'"}'
    status, answer = await post_key(session, hub, body, site.key)
    assert status == 413 and answer["error"]["code"] == "body_too_large"
    assert await key_at_hub(hub, session) == site.public_key


async def test_a_replayed_rotation_is_harmless(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    first, second = SigningKey.generate(), SigningKey.generate()
    first_hex = bytes(first.verify_key).hex()
    body = rotation_body("shop", first, time.time())
    headers = sign_request(
        site.key, "shop", "POST", KEY_PATH, body, time.time(), host=url_host(hub.url)
    )
    async with session.post(hub.url + KEY_PATH, data=body, headers=headers) as response:
        assert response.status == 200
    # The very same request again (captured on the wire): its signer is no longer the key.
    async with session.post(hub.url + KEY_PATH, data=body, headers=headers) as response:
        assert response.status == 401
    assert await key_at_hub(hub, session) == first_hex
    # Announced again by the new key (a site whose answer was lost): success, no change.
    status, answer = await post_key(session, hub, body, first)
    assert status == 200 and answer == {"site": "shop", "public_key": first_hex, "rotated": False}
    # On to a second key, then back to an earlier one: refused, the key stays.
    status, _ = await post_key(session, hub, rotation_body("shop", second, time.time()), first)
    assert status == 200
    back = rotation_body("shop", first, time.time())
    status, answer = await post_key(session, hub, back, second)
    assert status == 409 and answer["error"]["code"] == "key_reused"
    old_back = rotation_body("shop", site.key, time.time())  # the key the site started with
    status, answer = await post_key(session, hub, old_back, second)
    assert status == 409 and answer["error"]["code"] == "key_reused"
    assert await key_at_hub(hub, session) == bytes(second.verify_key).hex()
    detail = await admin_of(hub, session).ok("GET", "/v1/sites/shop")
    assert detail["key_rotations"] == 2


async def test_a_thief_that_rotates_first_locks_the_site_out_until_an_operator_rebinds_it(
    hub: Hub, session: aiohttp.ClientSession, site: Site
) -> None:
    admin = admin_of(hub, session)
    stolen, thiefs, pending = site.key, SigningKey.generate(), SigningKey.generate()
    status, _ = await post_key(session, hub, rotation_body("shop", thiefs, time.time()), stolen)
    assert status == 200
    # The site, still on the stolen key, is refused; so is its pending key.
    assert await reported(site) == 401
    body = rotation_body("shop", pending, time.time())
    assert (await post_key(session, hub, body, stolen))[0] == 401
    assert (await post_key(session, hub, body, pending))[0] == 401
    # What the hub shows: a rotation the site did not make, in the site and the audit log.
    detail = await admin.ok("GET", "/v1/sites/shop")
    assert detail["key_rotations"] == 1 and detail["public_key"] != site.public_key
    # Only a fleet admin may bind a key, and not one the site had (the stolen one).
    viewer = (await admin.ok("POST", "/v1/tokens", {"role": "viewer"}, 201))["token"]
    pending_hex = bytes(pending.verify_key).hex()
    status, _ = await admin.call(
        "PUT", "/v1/sites/shop/key", {"public_key": pending_hex}, token=viewer
    )
    assert status == 403
    status, answer = await admin.call("PUT", "/v1/sites/shop/key", {"public_key": site.public_key})
    assert status == 409 and answer["error"]["code"] == "key_reused"
    answer = await admin.ok("PUT", "/v1/sites/shop/key", {"public_key": pending_hex})
    assert answer["rotated"] is True
    # The site's retry signed by its pending key now succeeds; the thief's key is refused.
    status, answer = await post_key(session, hub, body, pending)
    assert status == 200 and answer["rotated"] is False
    site.key = pending
    assert await reported(site) == 200
    status, answer = await post_key(
        session, hub, rotation_body("shop", SigningKey.generate(), time.time()), thiefs
    )
    assert status == 401


def test_a_gossip_certificate_of_a_key_the_site_left_opens_nothing_at_the_hub() -> None:
    root, old, new = SigningKey.generate(), SigningKey.generate(), SigningKey.generate()
    registered = {"shop": bytes(old.verify_key).hex()}
    opener = SiteKeyOpener(
        lambda: frozenset({bytes(root.verify_key).hex()}), registered.get, recipient="hub"
    )
    now = time.time()

    def datagram(key: SigningKey, at: float) -> bytes:
        cert = issue_cert(root, "shop", bytes(key.verify_key), now + 3600)
        return DatagramSealer("shop", key, cert).seal(b"\x01hello", at, "hub")

    assert opener.open(datagram(old, now), now).sender_id == "shop"
    registered["shop"] = bytes(new.verify_key).hex()  # the site rotated its key
    with pytest.raises(BadCertError):
        opener.open(datagram(old, now + 0.1), now + 0.1)
    assert opener.open(datagram(new, now + 0.2), now + 0.2).sender_id == "shop"
