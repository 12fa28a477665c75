"""A report the replica did not take on an open report stream whose path is sound (a 5xx
answer, or no answer in time while the hub's host acknowledged every byte) keeps the
stream; the site moves to the next replica only after ``STREAM_FAIL_OVER_AFTER`` in a row.
A cut path (``ReportStream.stalled``) moves it at once. Real WebSocket servers on loopback
stand in for the replicas, their answers scripted (a follower whose leader is slow or cut
off cannot be made on demand from a real hub). Loopback is never cut: a cut is what
``stalled`` says in the tests that need one (the kernel's side of it, on a real cut, is
``tests/lab/test_tcp_stall_lab.py``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import orjson
import pytest
from aiohttp import WSMsgType, web
from nacl.signing import SigningKey

from meshorch.fleet.client import STREAM_FAIL_OVER_AFTER, HubUnreachable, LinkClient, first_replica
from meshorch.fleet.report_stream import ReportStream
from tests.hub.helpers import until

KEY = SigningKey(b"k" * 32)
# A site whose id sends it to the first of two URLs first.
SITE = next(f"shop-{n}" for n in range(100) if first_replica(f"shop-{n}", 2) == 0)
REPORT = {"v": 1, "site": SITE, "time": 0.0}


class Replica:
    """Answers each report on its stream as ``script`` says, in order: an int is a status
    (``200`` answers ``{"head": n}``, n the report's number on this replica); ``"hold"``
    answers only when the next report arrives (a replica slower than the site's wait).
    Past the script: 200."""

    def __init__(self, script: list[int | str]) -> None:
        self.script = script
        self.upgrades = 0
        self.reports = 0
        self.bodies: list[bytes] = []
        self.url = ""
        self._runner: web.AppRunner | None = None

    def _answer(self, status: int) -> bytes:
        body: dict[str, object] = (
            {"head": self.reports}
            if status == 200
            else {"error": {"code": "leader_unreachable", "message": "the leader is slow"}}
        )
        return orjson.dumps({"status": status, "body": body})

    async def _stream(self, request: web.Request) -> web.WebSocketResponse:
        self.upgrades += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        held: list[bytes] = []
        async for message in ws:
            if message.type is not WSMsgType.BINARY:
                break
            self.reports += 1
            self.bodies.append(message.data)
            step = self.script.pop(0) if self.script else 200
            if step == "hold":
                held.append(self._answer(200))
                continue
            for answer in held:
                await ws.send_bytes(answer)
            held.clear()
            assert isinstance(step, int)
            await ws.send_bytes(self._answer(step))
        return ws

    async def __aenter__(self) -> Replica:
        app = web.Application()
        app.router.add_get("/v1/link/reports", self._stream)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()


@pytest.fixture
async def spare() -> AsyncIterator[Replica]:
    async with Replica([]) as replica:
        yield replica


async def test_5xx_answers_keep_the_stream_until_several_in_a_row(spare: Replica) -> None:
    assert STREAM_FAIL_OVER_AFTER == 3  # the script below counts on it
    script: list[int | str] = [503, 503, 200, 503, 500, 503]
    async with (
        Replica(script) as busy,
        LinkClient(f"{busy.url},{spare.url}", SITE, KEY) as client,
    ):
        for _ in range(2):
            with pytest.raises(HubUnreachable, match="503"):
                await client.report(REPORT)
            assert client.hub_url == busy.url and client._stream is not None
        assert await client.report(REPORT) == 3  # taken: the count starts again
        for _ in range(2):
            with pytest.raises(HubUnreachable):
                await client.report(REPORT)
            assert client.hub_url == busy.url
        assert busy.upgrades == 1  # one stream for all five
        with pytest.raises(HubUnreachable):
            await client.report(REPORT)  # the third in a row
        assert client.hub_url == spare.url and client._stream is None
        assert await client.report(REPORT) == 1
        assert spare.upgrades == 1 and busy.reports == 6


async def test_no_answer_on_a_sound_path_keeps_the_stream_until_several_in_a_row(
    spare: Replica,
) -> None:
    """A busy replica: the hub's host took the report (loopback acknowledges at once), its
    answer comes late. The stream stays; the late answer is not taken for the next report's."""
    async with (
        Replica(["hold", 200, "hold", "hold", "hold"]) as slow,
        LinkClient(f"{slow.url},{spare.url}", SITE, KEY) as client,
    ):
        with pytest.raises(HubUnreachable, match="no answer within"):
            await client.report(REPORT, timeout_s=0.2)
        assert client._stream is not None and client._stream.stalled() is False
        # The first report's late answer ({"head": 1}) comes first: it is not this one's.
        assert await client.report(REPORT, timeout_s=5.0) == 2
        for _ in range(STREAM_FAIL_OVER_AFTER - 1):
            with pytest.raises(HubUnreachable):
                await client.report(REPORT, timeout_s=0.2)
            assert client.hub_url == slow.url
        assert slow.upgrades == 1
        with pytest.raises(HubUnreachable):
            await client.report(REPORT, timeout_s=0.2)  # the third in a row
        assert client.hub_url == spare.url
        assert await client.report(REPORT) == 1


async def test_no_answer_on_a_cut_path_moves_to_the_next_replica_at_once(
    spare: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with (
        Replica(["hold"]) as slow,
        LinkClient(f"{slow.url},{spare.url}", SITE, KEY) as client,
    ):
        # Cut once the report is sent: its bytes wait unacknowledged.
        monkeypatch.setattr(
            ReportStream, "stalled", lambda self: self.url == slow.url and slow.reports > 0
        )
        with pytest.raises(HubUnreachable):
            await client.report(REPORT, timeout_s=0.2)
        assert client.hub_url == spare.url and client._stream is None
        assert await client.report(REPORT) == 1
        assert spare.upgrades == 1 and slow.upgrades == 1


async def test_a_path_cut_since_the_last_report_is_left_before_sending(
    spare: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The report after a cut goes to the next replica on a new connection, in the same
    call: nothing is sent into the cut path, and no timeout is waited for."""
    cut = False
    monkeypatch.setattr(ReportStream, "stalled", lambda self: cut and self.url == slow.url)
    async with (
        Replica([]) as slow,
        LinkClient(f"{slow.url},{spare.url}", SITE, KEY) as client,
    ):
        assert await client.report(REPORT) == 1
        cut = True
        assert await client.report(REPORT, timeout_s=5.0) == 1  # the spare's first
        assert client.hub_url == spare.url and slow.reports == 1


async def test_where_the_kernel_says_nothing_no_answer_moves_at_once(
    spare: Replica, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without TCP_INFO a cut cannot be told from a busy replica: a new connection."""
    monkeypatch.setattr(ReportStream, "stalled", lambda self: None)
    async with (
        Replica(["hold"]) as slow,
        LinkClient(f"{slow.url},{spare.url}", SITE, KEY) as client,
    ):
        with pytest.raises(HubUnreachable):
            await client.report(REPORT, timeout_s=0.2)
        assert client.hub_url == spare.url and client._stream is None
        assert await client.report(REPORT) == 1


async def test_a_report_cancelled_while_waiting_keeps_the_stream(spare: Replica) -> None:
    async with (
        Replica(["hold", 200]) as slow,
        LinkClient(f"{slow.url},{spare.url}", SITE, KEY) as client,
    ):
        task = asyncio.create_task(client.report(REPORT, timeout_s=30.0))
        await until(lambda: slow.reports == 1)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        stream = client._stream
        assert stream is not None and not stream.closed
        assert await client.report(REPORT) == 2  # its own answer, on the same stream
        assert client._stream is stream and slow.upgrades == 1


async def test_a_hub_without_quiet_reports_answers_and_is_awaited_each_time(
    spare: Replica,
) -> None:
    """A hub of a release before quiet reports (no subprotocol): a quiet report is sent
    as before, unprefixed, and waits for its answer."""
    async with LinkClient(spare.url, SITE, KEY) as client:
        for number in (1, 2, 3):
            assert await client.report(REPORT, quiet=True) == number
        assert client._stream is not None and not client._stream.quiet
        assert spare.upgrades == 1 and spare.reports == 3
        assert all(body.startswith(b"{") for body in spare.bodies)  # no prefix
