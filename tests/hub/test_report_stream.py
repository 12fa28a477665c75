"""A site's reports on one WebSocket (``central_hub.report_stream``, ``GET /v1/link/reports``):
the real client against a real hub (in-process, and a follower of three replica
processes), and every way a stranger or a revoked site is refused."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web
from nacl.signing import SigningKey

from bench.hubcluster import cluster
from bench.hubcluster import until as until_answered
from central_hub import Hub
from central_hub.api import STREAMS_KEY
from central_hub.report_stream import CLOSE_REPLACED, CLOSE_REVOKED, STREAM_PATH
from meshorch.fleet import client as client_module
from meshorch.fleet.client import HubTrust, LinkClient, LinkRefused
from meshorch.fleet.link_auth import sign_request, sign_request_v1, url_host
from meshorch.fleet.report_stream import ASK, QUIET, QUIET_PROTOCOL
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, Site, spec_text, until
from tests.hub.replicas import site_report


def _signed(
    site: Site | tuple[str, SigningKey], url: str, at: float | None = None
) -> dict[str, str]:
    site_id, key = (site.id, site.key) if isinstance(site, Site) else site
    return sign_request(
        key, site_id, "GET", STREAM_PATH, b"", time.time() if at is None else at, host=url_host(url)
    )


async def _last_seen(admin: Operator, site: str) -> Any:
    return (await admin.ok("GET", f"/v1/sites/{site}"))["last_seen"]


@pytest.fixture
async def small_hub(tmp_path: Path) -> AsyncIterator[Hub]:
    from tests.hub.conftest import hub_config

    async with Hub(hub_config(tmp_path / "hub", max_body_bytes=64 * 1024)) as running:
        yield running


async def test_the_client_reports_on_one_stream_signed_once(
    hub: Hub, make_site: MakeSite, admin: Operator
) -> None:
    site = await make_site("shop-1")
    streams = hub.app[STREAMS_KEY]
    async with LinkClient(hub.url, site.id, site.key) as client:
        head = await client.report(site_report(site.id))
        assert head == hub.head.version
        opened = client._stream
        assert opened is not None and len(streams) == 1
        for _ in range(3):
            await client.report(site_report(site.id))
        assert client._stream is opened  # the same socket: no new signature, no new request
        assert await _last_seen(admin, site.id) is not None
    await until(lambda: len(streams) == 0)  # closed with the client


async def test_strangers_are_refused_before_the_upgrade(
    hub: Hub, make_site: MakeSite, session: aiohttp.ClientSession
) -> None:
    site = await make_site("shop-1")
    url = hub.url + STREAM_PATH
    streams = hub.app[STREAMS_KEY]
    stranger = ("shop-1", SigningKey.generate())
    other = await make_site("shop-2")
    refusals = [
        {},  # unsigned
        _signed(stranger, hub.url),  # another key in the site's name
        {**_signed(other, hub.url), "X-Meshorch-Site": "shop-1"},  # another site's signature
        _signed(site, hub.url, at=time.time() - 3600),  # stale
    ]
    for headers in refusals:
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(url, headers=headers)
        assert refused.value.status == 401, headers
    # A format 1 signature (no nonce: replayable) opens no stream, though it is a GET.
    legacy = sign_request_v1(site.key, site.id, "GET", STREAM_PATH, b"", time.time())
    with pytest.raises(aiohttp.WSServerHandshakeError) as outdated:
        await session.ws_connect(url, headers=legacy)
    assert outdated.value.status == 401
    replayed = _signed(site, hub.url)
    async with session.ws_connect(url, headers=replayed):
        pass
    with pytest.raises(aiohttp.WSServerHandshakeError) as again:
        await session.ws_connect(url, headers=replayed)  # the same signature twice
    assert again.value.status in (401, 409)
    # Signed, but no upgrade: a clear 426, not a socket.
    async with session.get(url, headers=_signed(site, hub.url)) as plain:
        assert plain.status == 426
        assert (await plain.json())["error"]["code"] == "upgrade_required"
    await until(lambda: len(streams) == 0)


async def test_bad_messages_are_answered_and_change_nothing(
    small_hub: Hub, session: aiohttp.ClientSession
) -> None:
    hub = small_hub
    admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    await admin.ok(
        "POST", "/v1/sites", {"id": site.id, "labels": {}, "public_key": site.public_key}, 201
    )
    async with session.ws_connect(hub.url + STREAM_PATH, headers=_signed(site, hub.url)) as ws:
        await ws.send_bytes(b"{not json")
        answer = orjson.loads((await ws.receive()).data)
        assert answer["status"] == 400 and answer["body"]["error"]["code"] == "bad_json"
        await ws.send_bytes(orjson.dumps({**site_report(site.id), "applied_version": "seven"}))
        answer = orjson.loads((await ws.receive()).data)
        assert answer["status"] == 400
        await ws.send_bytes(orjson.dumps(site_report("shop-2")))  # in another site's name
        answer = orjson.loads((await ws.receive()).data)
        assert answer["status"] == 400
        assert await _last_seen(admin, site.id) is None
        await ws.send_bytes(orjson.dumps(site_report(site.id)))
        answer = orjson.loads((await ws.receive()).data)
        assert answer["status"] == 200 and answer["body"]["head"] == hub.head.version
        assert await _last_seen(admin, site.id) is not None
        # A message past the hub's body limit closes the stream (1009), unread.
        await ws.send_bytes(b" " * (65 * 1024))
        closed = await ws.receive()
        assert closed.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
        assert ws.close_code == aiohttp.WSCloseCode.MESSAGE_TOO_BIG


async def test_a_deleted_site_or_a_newer_stream_closes_it(
    hub: Hub, make_site: MakeSite, admin: Operator, session: aiohttp.ClientSession
) -> None:
    site = await make_site("shop-1")
    url = hub.url + STREAM_PATH
    first = await session.ws_connect(url, headers=_signed(site, hub.url))
    second = await session.ws_connect(url, headers=_signed(site, hub.url))
    assert (await first.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert first.close_code == CLOSE_REPLACED
    await admin.ok("DELETE", f"/v1/sites/{site.id}?confirm=true")
    await second.send_bytes(orjson.dumps(site_report(site.id)))
    assert (await second.receive()).type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)
    assert second.close_code == CLOSE_REVOKED
    await second.close()
    await until(lambda: len(hub.app[STREAMS_KEY]) == 0)


async def test_a_hub_without_streams_gets_posts() -> None:
    """An older hub answers the upgrade 404: the client reports with POST, and does not
    ask for a stream again for a while."""
    posted: list[bytes] = []

    async def report(request: web.Request) -> web.Response:
        posted.append(await request.read())
        return web.json_response({"head": 7})

    app = web.Application()
    app.router.add_post("/v1/link/report", report)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    try:
        async with LinkClient(
            f"http://127.0.0.1:{port}", "shop-1", SigningKey.generate()
        ) as client:
            assert await client.report(site_report("shop-1")) == 7
            assert await client.report(site_report("shop-1")) == 7
            assert len(posted) == 2 and client._stream is None
            assert client._no_stream_until  # remembered: not asked again at each report
    finally:
        await runner.cleanup()


async def test_a_follower_keeps_the_stream_and_the_leader_sees_its_reports(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    async with cluster(tmp_path, session) as running:
        await running.ready(running.replicas[0].url)
        leader = await running.leader()
        follower = next(r for r in running.replicas if r is not leader)
        key = SigningKey.generate()
        body = {"id": "shop-x", "labels": {}, "public_key": key.verify_key.encode().hex()}
        status, answer = await running.call(leader.url, "POST", "/v1/sites", body)
        assert status == 201, answer
        await asyncio.sleep(0.5)  # the registration applied on every replica
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
        stranger = _signed(("shop-x", SigningKey.generate()), follower.url)
        with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
            await session.ws_connect(follower.url + STREAM_PATH, headers=stranger, ssl=fingerprint)
        assert refused.value.status == 401
        legacy = sign_request_v1(key, "shop-x", "GET", STREAM_PATH, b"", time.time())
        with pytest.raises(aiohttp.WSServerHandshakeError) as outdated:
            await session.ws_connect(follower.url + STREAM_PATH, headers=legacy, ssl=fingerprint)
        assert outdated.value.status == 401
        trust = HubTrust(fingerprint=running.fingerprint)
        async with LinkClient(follower.url, "shop-x", key, trust=trust) as client:
            await client.report(site_report("shop-x"))
            assert client._stream is not None and not client._stream.closed

            async def seen() -> bool:
                status, answer = await running.call(leader.url, "GET", "/v1/sites/shop-x")
                return status == 200 and answer["last_seen"] is not None

            await until_answered(seen, 10.0, "the leader to see the follower's report")
            await client.report(site_report("shop-x"))  # unchanged: answered by the follower
        # The follower checks each message against its replicated view (cached until the
        # sites table changes there): a site deleted at the leader is closed out.
        report = orjson.dumps(site_report("shop-x"))
        async with session.ws_connect(
            follower.url + STREAM_PATH, headers=_signed(("shop-x", key), follower.url),
            ssl=fingerprint, protocols=(QUIET_PROTOCOL,),
        ) as ws:  # fmt: skip
            for _ in range(2):
                await ws.send_bytes(ASK + report)
                assert orjson.loads((await ws.receive()).data)["status"] == 200
            status, answer = await running.call(
                leader.url, "DELETE", "/v1/sites/shop-x?confirm=true"
            )
            assert status == 200, answer

            async def closed_out() -> bool:
                await ws.send_bytes(QUIET + report)  # unanswered while the site is known
                try:
                    message = await ws.receive(timeout=0.5)
                except TimeoutError:
                    return False
                return message.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED)

            await until_answered(closed_out, 10.0, "the follower to close the stream")
            assert ws.close_code == CLOSE_REVOKED


async def _no_answer(ws: aiohttp.ClientWebSocketResponse, within_s: float = 0.3) -> bool:
    with contextlib.suppress(TimeoutError):
        await ws.receive(timeout=within_s)
        return False
    return True


async def test_a_quiet_stream_answers_asked_reports_changes_and_errors_only(
    hub: Hub, make_site: MakeSite, admin: Operator, session: aiohttp.ClientSession
) -> None:
    site = await make_site("shop-1")
    report = orjson.dumps(site_report(site.id))
    async with session.ws_connect(
        hub.url + STREAM_PATH, headers=_signed(site, hub.url), protocols=(QUIET_PROTOCOL,)
    ) as ws:
        assert ws.protocol == QUIET_PROTOCOL
        await ws.send_bytes(report)  # no prefix: refused, nothing kept
        refused = orjson.loads((await ws.receive()).data)
        assert refused["n"] == 1 and refused["body"]["error"]["code"] == "bad_message"
        assert await _last_seen(admin, site.id) is None
        await ws.send_bytes(ASK + report)
        first = orjson.loads((await ws.receive()).data)
        assert first["status"] == 200 and first["n"] == 2
        assert first["body"]["head"] == hub.head.version == 0
        assert await _last_seen(admin, site.id) is not None
        await ws.send_bytes(QUIET + report)  # the same answer: not sent
        assert await _no_answer(ws)
        await ws.send_bytes(ASK + report)  # asked: sent, though the same
        assert orjson.loads((await ws.receive()).data)["n"] == 4
        await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)  # a new head
        await until(lambda: hub.head.version == 1)
        await ws.send_bytes(QUIET + report)  # a change: sent
        changed = orjson.loads((await ws.receive()).data)
        assert changed["n"] == 5 and changed["body"]["head"] == 1
        await ws.send_bytes(QUIET + report)
        assert await _no_answer(ws)
        await ws.send_bytes(QUIET + b"{not json")  # an error: always sent
        error = orjson.loads((await ws.receive()).data)
        assert error["n"] == 7 and error["status"] == 400
        assert error["body"]["error"]["code"] == "bad_json"
        # A stream without the subprotocol (an older site) gets every answer, unnumbered.
    async with session.ws_connect(hub.url + STREAM_PATH, headers=_signed(site, hub.url)) as old:
        assert old.protocol is None
        for _ in range(2):
            await old.send_bytes(report)
            answer = orjson.loads((await old.receive()).data)
            assert answer["status"] == 200 and answer["body"]["head"] == 1 and "n" not in answer


async def test_the_client_sends_routine_reports_quiet_and_learns_changes(
    hub: Hub, make_site: MakeSite, admin: Operator
) -> None:
    site = await make_site("shop-1")
    async with LinkClient(hub.url, site.id, site.key) as client:
        assert await client.report(site_report(site.id), quiet=True) == 0  # the first: asked
        stream = client._stream
        assert stream is not None and stream.quiet and stream.watched
        for _ in range(3):
            assert await client.report(site_report(site.id), quiet=True) == 0
        assert stream.sent == 4 and stream.misses == 0
        await admin.ok("POST", "/v1/apps", {"spec": spec_text()}, 202)
        await until(lambda: hub.head.version == 1)
        await client.report(site_report(site.id), quiet=True)  # its answer, a change, comes
        await until(lambda: stream.news is not None)
        assert await client.report(site_report(site.id), quiet=True) == 1  # learnt
        # A quiet report the hub refuses: the next call raises its error, sends nothing.
        bad = {**site_report(site.id), "applied_version": "seven"}
        assert await client.report(bad, quiet=True) == 1
        await until(lambda: stream.news is not None)
        with pytest.raises(LinkRefused) as refused:
            await client.report(site_report(site.id), quiet=True)
        assert refused.value.status == 400 and stream.sent == 7  # not sent
        assert await client.report(site_report(site.id)) == 1  # asked: answered
        assert client._stream is stream  # one stream throughout


async def test_a_quiet_report_is_asked_once_no_answer_came_for_a_while(
    hub: Hub, make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A quiet site still finds out, within QUIET_MAX_S, that its replica stopped
    answering: past it the report waits for its answer."""
    site = await make_site("shop-1")
    async with LinkClient(hub.url, site.id, site.key) as client:
        await client.report(site_report(site.id))
        stream = client._stream
        assert stream is not None
        answered = stream.answered_at
        await client.report(site_report(site.id), quiet=True)
        assert stream.answered_at == answered  # not answered: nothing changed
        monkeypatch.setattr(client_module, "QUIET_MAX_S", 0.0)
        await client.report(site_report(site.id), quiet=True)
        assert stream.answered_at > answered  # asked, and answered
