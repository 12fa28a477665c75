"""A replica's front (central_hub.front), on real HTTP servers: what it forwards, and what
it refuses before forwarding anything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import aiohttp
from aiohttp import web

from central_hub.front import (
    CLIENT_HEADER,
    SERVED_BY_HEADER,
    Front,
    Target,
    client_header,
    forwarded_client,
    forwarding_key,
    trusted_client,
)

KEY = forwarding_key(b"k" * 32)


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    try:
        yield f"http://{host}:{port}"
    finally:
        await runner.cleanup()


def upstream(seen: list[tuple[str, str | None, bytes]]) -> web.Application:
    """The hub behind the front: records what reached it, and from which source."""

    async def handler(request: web.Request) -> web.Response:
        seen.append((request.path_qs, request.remote, await request.read()))
        return web.json_response({"host": request.host}, status=201)

    app = web.Application(middlewares=[forwarded_client(KEY)])
    app.router.add_route("*", "/{tail:.*}", handler)
    return app


def front_to(target: Callable[[], tuple[Target | None, bool]]) -> web.Application:
    return Front(KEY, target, max_body_bytes=1024, name="me").app()


async def call(
    url: str, method: str = "GET", body: bytes | None = None, headers: dict[str, str] | None = None
) -> tuple[int, dict[str, str], bytes]:
    async with (
        aiohttp.ClientSession() as session,
        session.request(method, url, data=body, headers=headers) as resp,
    ):
        return resp.status, dict(resp.headers), await resp.read()


def test_the_client_header_is_trusted_only_with_the_key() -> None:
    assert trusted_client(KEY, client_header(KEY, "10.1.2.3")) == "10.1.2.3"
    other = forwarding_key(b"x" * 32)
    assert trusted_client(KEY, client_header(other, "10.1.2.3")) is None
    assert trusted_client(KEY, "10.1.2.3") is None
    assert trusted_client(KEY, "not-an-address " + "0" * 64) is None
    assert trusted_client(KEY, "1.2.3.4 " + "z" * 500) is None
    assert trusted_client(KEY, None) is None


async def test_forwards_with_the_client_address_and_the_host_the_client_used() -> None:
    seen: list[tuple[str, str | None, bytes]] = []
    # A client's own X-Meshorch-Client claim is replaced, not believed.
    forged = {CLIENT_HEADER: "203.0.113.9 " + "0" * 64, "Host": "hub.example:7900"}
    async with (
        serve(upstream(seen)) as hub,
        serve(front_to(lambda: ((hub, True), True))) as front,
    ):
        status, headers, body = await call(front + "/v1/x?a=1", "POST", b"payload", forged)
    assert status == 201 and b"hub.example:7900" in body
    assert headers[SERVED_BY_HEADER] == "me"
    assert seen == [("/v1/x?a=1", "127.0.0.1", b"payload")]


async def test_refused_before_anything_is_forwarded() -> None:
    seen: list[tuple[str, str | None, bytes]] = []
    async with serve(upstream(seen)) as hub:
        async with serve(front_to(lambda: ((hub, True), True))) as front:
            status, _, body = await call(front + "/v1/x", "POST", b"x" * 4096)
            assert status == 413 and b"body_too_large" in body
        async with serve(front_to(lambda: (None, False))) as leaderless:
            status, headers, body = await call(leaderless + "/v1/fleet")
            assert status == 503 and b"no_leader" in body and headers["Retry-After"] == "1"
        # A request another replica already forwarded is not forwarded again (no loops).
        async with serve(front_to(lambda: ((hub, True), False))) as follower:
            again = {CLIENT_HEADER: client_header(KEY, "10.0.0.7")}
            status, _, body = await call(follower + "/v1/fleet", headers=again)
            assert status == 503 and b"no_leader" in body
    assert seen == []


async def test_a_dead_leader_is_a_503_that_says_retry() -> None:
    async with serve(web.Application()) as gone:
        pass  # its port is closed now
    async with serve(front_to(lambda: ((gone, True), False))) as front:
        status, headers, body = await call(front + "/v1/fleet")
    assert status == 503 and b"leader_unreachable" in body and headers["Retry-After"] == "1"


async def test_the_leaders_own_hub_is_handed_the_request_in_process() -> None:
    seen: list[tuple[str, str | None, bytes]] = []
    hub = upstream(seen)
    async with serve(hub), serve(front_to(lambda: (hub, True))) as front:
        relayed = {CLIENT_HEADER: client_header(KEY, "10.0.0.7")}  # from a follower
        status, headers, _ = await call(front + "/v1/y", "PUT", b"body", relayed)
        forged = {CLIENT_HEADER: client_header(forwarding_key(b"x" * 32), "10.0.0.8")}
        await call(front + "/v1/z", "PUT", b"", forged)
    assert status == 201 and headers[SERVED_BY_HEADER] == "me"
    assert seen == [("/v1/y", "10.0.0.7", b"body"), ("/v1/z", "127.0.0.1", b"")]
