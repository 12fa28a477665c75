"""Agents remember the tokens they verified (by hash), yet every request is still checked:
on a real 3-host site, a token used on every host is refused on every host as soon as
each has applied its revocation, an expiring one as soon as it expires, and a forged
token with a remembered token's id never passes."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalSite
from tests.security.conftest import running_site


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalSite]:
    yield from running_site(tmp_path_factory, hosts=3, name="tokens")


async def status_of(session: aiohttp.ClientSession, url: str, token: str | None = None) -> int:
    headers = {} if token is None else {"Authorization": f"Bearer {token}"}
    async with session.get(url + "/v1/members", headers=headers) as response:
        await response.read()
        return response.status


async def make_token(session: aiohttp.ClientSession, url: str, **body: Any) -> dict[str, Any]:
    async with session.post(url + "/v1/access-tokens", json=body) as response:
        made: dict[str, Any] = await response.json()
        assert response.status == 201, made
        return made


async def applied_everywhere(admin: aiohttp.ClientSession, site: LocalSite) -> None:
    """Each host has applied every entry committed so far (a linearizable read on it)."""
    for host in site.members:
        async with admin.get(host.url + "/v1/kv/probe") as response:
            assert response.status == 404


async def test_a_remembered_token_is_refused_once_revoked_or_expired(
    site: LocalSite, admin: aiohttp.ClientSession
) -> None:
    urls = [h.url for h in site.members]
    viewer = (await make_token(admin, urls[0], role="viewer"))["token"]
    made = await make_token(admin, urls[0], role="viewer", ttl_s=4)
    brief, expires_at = made["token"], made["expires_at"]
    await applied_everywhere(admin, site)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as plain:
        for _ in range(3):  # verified once, then remembered
            for url in urls:
                assert await status_of(plain, url, viewer) == 200
                assert await status_of(plain, url, brief) == 200
        token_id, secret = viewer.removeprefix("moat1.").split(".")
        forged = f"moat1.{token_id}.{'A' * len(secret)}"
        assert {await status_of(plain, url, forged) for url in urls} == {401}

        async with admin.delete(urls[1] + f"/v1/access-tokens/{token_id}") as response:
            assert response.status == 200
        await applied_everywhere(admin, site)
        assert {await status_of(plain, url, viewer) for url in urls} == {401}
        # What is still valid passes, through the same hosts.
        assert {await status_of(plain, url, brief) for url in urls} == {200}
        assert {await status_of(admin, url) for url in urls} == {200}

        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.2)
        assert {await status_of(plain, url, brief) for url in urls} == {401}
