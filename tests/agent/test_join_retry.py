"""A joining host's answer classes (``meshorch.join.mesh._ask_peers``) against a real HTTP
server on loopback: a site that cannot commit for a moment (504: its leader lost while
another host's join changes the membership) or is busy (503) is asked again; a refusal
(4xx) ends the join with the site's reason."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web

from meshorch.demo.localsite import free_port
from meshorch.join.mesh import _ask_peers
from meshorch.join.protocol import JoinRefused, JoinRequest, JoinToken
from netmesh import KeyPair, generate_keypair
from netmesh.discovery import DiscoveredPeer


async def _site_answering(status: int, code: str) -> tuple[web.AppRunner, str]:
    async def join(_request: web.Request) -> web.Response:
        body = {"error": {"code": code, "message": f"answered {status}"}}
        return web.json_response(body, status=status)

    app = web.Application()
    app.router.add_post("/v1/join", join)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"127.0.0.1:{port}"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as client:
        yield client


@pytest.mark.parametrize(("status", "busy"), [(503, True), (504, True), (500, False)])
async def test_a_site_that_cannot_commit_or_is_busy_is_asked_again(
    session: aiohttp.ClientSession, status: int, busy: bool
) -> None:
    runner, endpoint = await _site_answering(status, "unavailable")
    try:
        answered, error, retry = await _ask_peers(session, *_join_for(endpoint))
    finally:
        await runner.cleanup()
    assert answered is None and retry is busy
    assert error == f"s1-h1: {status} answered {status}"


async def test_a_refusal_ends_the_join_with_the_sites_reason(
    session: aiohttp.ClientSession,
) -> None:
    runner, endpoint = await _site_answering(403, "revoked_host")
    try:
        with pytest.raises(JoinRefused) as refused:
            await _ask_peers(session, *_join_for(endpoint))
    finally:
        await runner.cleanup()
    assert refused.value.code == "revoked_host"


def _join_for(endpoint: str) -> tuple[dict[str, DiscoveredPeer], JoinRequest, JoinToken, KeyPair]:
    keypair = generate_keypair()
    token = JoinToken("s1", "t1", b"s" * 32, "ab" * 16)
    peer = DiscoveredPeer("s1", "s1-h1", endpoint, keypair.public_key_b64, "0.1.0")
    request = JoinRequest(
        site="s1", token_id=token.token_id, host_id="s1-h2",
        wg_public_key=keypair.public_key_b64, wg_endpoint="127.0.0.1:51820",
        api="127.0.0.1:7700", timestamp=0.0, nonce="00" * 16,
    ).with_proof(token.secret)  # fmt: skip
    return {"s1-h1": peer}, request, token, keypair
