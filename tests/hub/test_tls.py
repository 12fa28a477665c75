"""TLS on the hub and the site link's signatures: the certificate pinned by sites and by the
CLI, replays and requests signed for another host refused, old agents' signatures."""

from __future__ import annotations

import asyncio
import os
import stat
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import orjson
import pytest

from central_hub import Hub
from central_hub.cli import build_parser, config_from_args
from meshorch.fleet.client import HubNotTrusted, HubTrust, LinkClient
from meshorch.fleet.link_auth import sign_request, sign_request_v1, url_host
from tests.hub.conftest import hub_config
from tests.hub.helpers import Site

APPLIED = {"applied_version": 0, "applied_head": ""}


def tls_config(data_dir: Path, **overrides: object) -> object:
    return hub_config(data_dir, insecure_http=False, gossip=False, **overrides)


def pinned(hub: Hub) -> aiohttp.Fingerprint:
    assert hub.tls_fingerprint is not None
    return aiohttp.Fingerprint(bytes.fromhex(hub.tls_fingerprint))


@pytest.fixture
async def tls_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    async with Hub(tls_config(tmp_path / "hub")) as running:  # type: ignore[arg-type]
        yield running


async def admin_call(hub: Hub, method: str, path: str, body: object = None) -> object:
    token = hub.admin_token_path.read_text().strip()
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pinned(hub))) as session,
        session.request(
            method, hub.url + path, json=body, headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        answer = await response.json()
        assert response.status < 300, answer
        return answer


def test_tls_is_the_default_and_plain_http_needs_the_flag(tmp_path: Path) -> None:
    parser = build_parser()
    config = config_from_args(parser.parse_args(["--data-dir", str(tmp_path / "d")]))
    assert config.insecure_http is False and config.tls_cert is None
    config = config_from_args(
        parser.parse_args(["--data-dir", str(tmp_path / "d"), "--insecure-http"])
    )
    assert config.insecure_http is True


async def test_self_signed_certificate_kept_and_served(tmp_path: Path) -> None:
    data_dir = tmp_path / "hub"
    async with Hub(tls_config(data_dir)) as hub:  # type: ignore[arg-type]
        assert hub.url.startswith("https://")
        first = hub.tls_fingerprint
        assert first is not None and len(first) == 64
        assert stat.S_IMODE(os.stat(data_dir / "tls.key").st_mode) == 0o600
        async with aiohttp.ClientSession() as session:
            # Plain HTTP to the TLS port: no API answer.
            plain = hub.url.replace("https://", "http://")
            with pytest.raises(aiohttp.ClientError):
                async with session.get(plain + "/v1/fleet") as response:
                    assert response.status != 200
            async with session.get(hub.url + "/v1/fleet", ssl=pinned(hub)) as response:
                assert response.status == 200
    async with Hub(tls_config(data_dir)) as hub:  # type: ignore[arg-type]
        assert hub.tls_fingerprint == first  # the same certificate after a restart


async def enrolled_client(hub: Hub, site_id: str, trust: HubTrust) -> LinkClient:
    from nacl.signing import SigningKey

    created = await admin_call(hub, "POST", "/v1/sites", {"id": site_id})
    assert isinstance(created, dict)
    client = LinkClient(hub.url, site_id, SigningKey.generate(), trust=trust)
    assert await client.enroll(created["enroll_token"]) == site_id
    return client


async def test_site_pins_the_fingerprint_and_refuses_another_hub(tmp_path: Path) -> None:
    async with Hub(tls_config(tmp_path / "a")) as hub_a:  # type: ignore[arg-type]
        good = HubTrust(fingerprint=hub_a.tls_fingerprint)
        client = await enrolled_client(hub_a, "shop-1", good)
        async with client:
            head, _ = await client.fetch(0, wait_s=0)
            assert head >= 0
            assert (
                await client.report({"v": 1, "site": "shop-1", "time": time.time(), **APPLIED}) >= 0
            )
        port = int(hub_a.url.rsplit(":", 1)[1])
        # No pin and no CA: a self-signed hub is not trusted (the system's CAs).
        async with LinkClient(hub_a.url, "shop-1", client.key) as unpinned:
            with pytest.raises(HubNotTrusted, match="--hub-fingerprint"):
                await unpinned.fetch(0, wait_s=0)
    # Another hub (another certificate) at the same address.
    async with Hub(tls_config(tmp_path / "b", port=port)) as hub_b:  # type: ignore[arg-type]
        assert hub_b.tls_fingerprint != good.fingerprint
        async with LinkClient(hub_b.url, "shop-1", client.key, trust=good) as moved:
            with pytest.raises(HubNotTrusted) as refused:
                await moved.fetch(0, wait_s=0)
        message = str(refused.value)
        assert str(hub_b.tls_fingerprint) in message and str(good.fingerprint) in message
        assert "nothing was sent" in message


async def test_the_cli_pins_on_first_use_and_refuses_a_changed_certificate(
    tmp_path: Path,
) -> None:
    known = tmp_path / "known_hubs"
    env = {**os.environ, "MESHORCH_KNOWN_HUBS": str(known)}
    env.pop("MESHORCH_HUB_FINGERPRINT", None)

    async def sites(hub: Hub, token: str) -> tuple[int, str]:
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "meshorch", "sites", "--hub", hub.url, "--token", token,
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await process.communicate()
        return process.returncode or 0, (out + err).decode()

    async with Hub(tls_config(tmp_path / "a")) as hub_a:  # type: ignore[arg-type]
        token_a = hub_a.admin_token_path.read_text().strip()
        code, output = await sites(hub_a, token_a)
        assert code == 0, output
        assert "pinned the hub" in output
        assert str(hub_a.tls_fingerprint) in known.read_text()
        code, output = await sites(hub_a, token_a)  # pinned: no notice again
        assert code == 0 and "pinned the hub" not in output, output
        port = int(hub_a.url.rsplit(":", 1)[1])
    async with Hub(tls_config(tmp_path / "b", port=port)) as hub_b:  # type: ignore[arg-type]
        token_b = hub_b.admin_token_path.read_text().strip()
        code, output = await sites(hub_b, token_b)
        assert code != 0
        assert "CERTIFICATE CHANGED" in output and str(known) in output, output
        assert str(hub_b.tls_fingerprint) in output
        # The pin is checked on the TLS handshake, before the request (and its token).


@pytest.fixture
async def site(tls_hub: Hub) -> AsyncIterator[Site]:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pinned(tls_hub))) as s:
        site = Site(s, tls_hub.url, "shop-1", tls_hub.fleet, tls_hub.root_key)
        await admin_call(
            tls_hub, "POST", "/v1/sites", {"id": "shop-1", "public_key": site.public_key}
        )
        yield site


async def send(
    site: Site, method: str, path: str, body: bytes, headers: dict[str, str]
) -> tuple[int, dict[str, object]]:
    async with site.session.request(
        method, site.url + path, data=body or None, headers=headers
    ) as response:
        return response.status, orjson.loads(await response.read())


async def test_a_replayed_request_is_refused_and_changes_nothing(tls_hub: Hub, site: Site) -> None:
    host = url_host(tls_hub.url)
    path = "/v1/link/report"
    old = orjson.dumps({"v": 1, "site": "shop-1", "time": time.time() - 5, **APPLIED})
    captured = sign_request(site.key, "shop-1", "POST", path, old, time.time(), host=host)
    status, answer = await send(site, "POST", path, old, captured)
    assert status == 200, answer
    new = orjson.dumps({"v": 1, "site": "shop-1", "time": time.time(), **APPLIED})
    headers = sign_request(site.key, "shop-1", "POST", path, new, time.time(), host=host)
    assert (await send(site, "POST", path, new, headers))[0] == 200
    before = await admin_call(tls_hub, "GET", "/v1/sites/shop-1")
    # The captured request, byte for byte.
    status, answer = await send(site, "POST", path, old, captured)
    assert status == 401 and answer["error"]["code"] == "replayed_request", answer  # type: ignore[index]
    assert await admin_call(tls_hub, "GET", "/v1/sites/shop-1") == before
    # The unseal route: a captured request is accepted once (here: refused as not
    # approved), then refused as a replay before anything else is looked at.
    unseal = orjson.dumps({"public_key": "00" * 32})
    captured = sign_request(
        site.key, "shop-1", "POST", "/v1/link/unseal", unseal, time.time(), host=host
    )
    first, answer = await send(site, "POST", "/v1/link/unseal", unseal, captured)
    assert first != 401, answer
    status, answer = await send(site, "POST", "/v1/link/unseal", unseal, captured)
    assert status == 401 and answer["error"]["code"] == "replayed_request", answer  # type: ignore[index]


async def test_a_request_signed_for_another_host_is_refused(tls_hub: Hub, site: Site) -> None:
    path = "/v1/link/deltas?after=0&wait=0"
    for other in ("hub.example.com:7900", "127.0.0.1:1"):
        headers = sign_request(site.key, "shop-1", "GET", path, b"", time.time(), host=other)
        headers["Host"] = url_host(tls_hub.url)  # sent to this hub
        status, answer = await send(site, "GET", path, b"", headers)
        assert status == 401 and answer["error"]["code"] == "bad_site_signature", answer  # type: ignore[index]
    headers = sign_request(
        site.key, "shop-1", "GET", path, b"", time.time(), host=url_host(tls_hub.url)
    )
    assert (await send(site, "GET", path, b"", headers))[0] == 200


async def test_old_agents_signatures_only_on_get_routes(
    tmp_path: Path, tls_hub: Hub, site: Site
) -> None:
    deltas = "/v1/link/deltas?after=0&wait=0"
    headers = sign_request_v1(site.key, "shop-1", "GET", deltas, b"", time.time())
    assert (await send(site, "GET", deltas, b"", headers))[0] == 200
    for path, body in (
        (
            "/v1/link/report",
            orjson.dumps({"v": 1, "site": "shop-1", "time": time.time(), **APPLIED}),
        ),
        ("/v1/link/unseal", orjson.dumps({"public_key": "00" * 32})),
    ):
        headers = sign_request_v1(site.key, "shop-1", "POST", path, body, time.time())
        status, answer = await send(site, "POST", path, body, headers)
        assert status == 401 and answer["error"]["code"] == "signature_outdated", answer  # type: ignore[index]
        assert "upgrade" in str(answer)


async def test_old_agents_refused_everywhere_when_the_window_is_closed(tmp_path: Path) -> None:
    config = tls_config(tmp_path / "hub", legacy_link_signatures=False)
    async with (
        Hub(config) as hub,  # type: ignore[arg-type]
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=pinned(hub))) as s,
    ):
        site = Site(s, hub.url, "shop-1", hub.fleet, hub.root_key)
        await admin_call(hub, "POST", "/v1/sites", {"id": "shop-1", "public_key": site.public_key})
        deltas = "/v1/link/deltas?after=0&wait=0"
        headers = sign_request_v1(site.key, "shop-1", "GET", deltas, b"", time.time())
        status, answer = await send(site, "GET", deltas, b"", headers)
        assert status == 401 and answer["error"]["code"] == "signature_outdated"  # type: ignore[index]
