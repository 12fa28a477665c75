"""A site's report stream to one hub replica, the site's side (``GET /v1/link/reports``,
docs/fleet-link.md). ``LinkClient`` opens it (a signed upgrade) and decides what to do
when a report is not taken; this module numbers the reports and pairs the answers.

A reader task takes every answer as it arrives and hands it to the report waiting for it
by number. Where the hub speaks ``QUIET_PROTOCOL`` a report may be sent quiet: nobody
waits for it, and the hub answers it only when the answer is not the last one it sent
(a new head, a hold) or is an error; such an answer, and the late answer of a report
whose waiter was cancelled, is kept as the stream's ``news``. A hub without the subprotocol
answers every report in order: its answers are numbered by that order.

A stream whose reports go unanswered may be cut (an uplink down leaves the connection
half-open: nothing says so until TCP gives up, minutes later) or its replica may be busy.
The kernel knows which: ``stalled`` reads the connection's TCP state (Linux ``TCP_INFO``):
the last report's bytes, sent ``STALLED_S`` ago or more, still retransmitted and not
acknowledged mean the packets do not reach the hub's host; everything acknowledged means
they do, and the replica is slow to answer.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
from typing import Any

import aiohttp
import orjson

STREAM_PATH = "/v1/link/reports"
QUIET_PROTOCOL = "meshorch-reports-2"
ASK, QUIET = b"a", b"q"  # a report's first byte on a quiet stream: answer it / only a change

# A report's answer: the status and body ``POST /v1/link/report`` would answer.
Answer = tuple[int, dict[str, Any]]

# A path is cut when bytes sent this long ago still wait for an acknowledgement while
# the kernel retransmits them. A packet lost on a sound path (a loaded host's loopback
# drops some) is retransmitted and acknowledged within a second; 2 s is under the 3 s
# between reports, so the report after a cut finds it.
STALLED_S = 2.0
# struct tcp_info (linux/tcp.h), ABI: tcpi_retransmits (RTO retransmissions of the oldest
# unacknowledged segment, reset by any progress) and tcpi_unacked (segments sent and not
# acknowledged).
_TCP_INFO = getattr(socket, "TCP_INFO", None)
_RETRANSMITS_AT, _UNACKED_AT, _TCP_INFO_BYTES = 2, 24, 28


def tcp_stalled(sock: Any, sent_s_ago: float) -> bool | None:
    """Whether what was last sent on ``sock``, ``sent_s_ago`` seconds ago, still waits for
    an acknowledgement the kernel keeps retransmitting for, ``STALLED_S`` or more after;
    None when the kernel does not say (not Linux, not TCP, no socket)."""
    if _TCP_INFO is None or sock is None:
        return None
    try:
        info: bytes = sock.getsockopt(socket.IPPROTO_TCP, _TCP_INFO, _TCP_INFO_BYTES)
    except (OSError, AttributeError, TypeError):
        return None
    if len(info) < _TCP_INFO_BYTES:
        return None
    (unacked,) = struct.unpack_from("=I", info, _UNACKED_AT)
    return unacked > 0 and info[_RETRANSMITS_AT] > 0 and sent_s_ago >= STALLED_S


class StreamClosed(Exception):
    """The stream closed (by the hub, or broken) before the answer came; ``malformed``
    when the reader closed it on an answer that is not ``{status, body}``."""

    def __init__(self, reason: str, *, malformed: bool = False) -> None:
        super().__init__(reason)
        self.malformed = malformed


class ReportStream:
    """One open report stream. ``misses`` counts the reports in a row its replica did
    not take (the client fails over at a threshold)."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, url: str) -> None:
        self.ws = ws
        self.url = url
        self.quiet = ws.protocol == QUIET_PROTOCOL
        self.sent = 0
        self.misses = 0
        self.answered_at = time.monotonic()  # the last answer read (or the opening)
        self.sent_at = time.monotonic()  # the last report sent (or the opening)
        self.news: Answer | None = None
        self._read_count = 0  # numbers the answers of a stream without QUIET_PROTOCOL
        self._waiters: dict[int, asyncio.Future[Answer]] = {}
        self._given_up: set[int] = set()  # asked reports whose waiter was cancelled
        self._reader = asyncio.get_running_loop().create_task(self._read())
        # Whether the kernel tells this connection's cut (``stalled``): quiet reports need it.
        self.watched = self.stalled() is not None

    @property
    def closed(self) -> bool:
        return self.ws.closed or self._reader.done()

    async def send(self, body: bytes, *, quiet: bool) -> tuple[int, asyncio.Future[Answer] | None]:
        """Send one report: (its number, the future of its answer); no future for a quiet
        one (a stream without QUIET_PROTOCOL sends every report asked)."""
        quiet = quiet and self.quiet
        self.sent += 1
        number = self.sent
        waiter: asyncio.Future[Answer] | None = None
        if not quiet:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters[number] = waiter
        prefix = (QUIET if quiet else ASK) if self.quiet else b""
        self.sent_at = time.monotonic()
        await self.ws.send_bytes(prefix + body)
        return number, waiter

    def stalled(self) -> bool | None:
        """Whether the connection's sent bytes wait unacknowledged (``tcp_stalled``): True
        for a cut path, False for a sound one, None when the kernel does not say."""
        return tcp_stalled(self.ws.get_extra_info("socket"), time.monotonic() - self.sent_at)

    def give_up(self, number: int) -> None:
        """No longer wait for report ``number``'s answer (its caller was cancelled): when
        it comes, a 200 is news, an error is dropped (nobody is left to tell)."""
        if self._waiters.pop(number, None) is not None:
            self._given_up.add(number)

    def take_news(self) -> Answer | None:
        news, self.news = self.news, None
        return news

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.gather(self._reader, return_exceptions=True)

    async def _read(self) -> None:
        failure = StreamClosed("the hub closed the report stream")
        try:
            async for message in self.ws:
                if message.type not in (aiohttp.WSMsgType.BINARY, aiohttp.WSMsgType.TEXT):
                    failure = StreamClosed(f"the report stream failed: {message.data!r:.200}")
                    break
                try:
                    number, answer = self._parse(message.data)
                except (ValueError, KeyError, TypeError) as exc:
                    failure = StreamClosed(f"an answer is {{status, body}}: {exc}", malformed=True)
                    await self.ws.close()
                    break
                self.answered_at = time.monotonic()
                self._take(number, answer)
        except (aiohttp.ClientError, OSError) as exc:
            failure = StreamClosed(f"the report stream broke: {exc!r}")
        finally:
            for waiter in self._waiters.values():
                if not waiter.done():
                    waiter.set_exception(failure)
            self._waiters.clear()

    def _parse(self, data: str | bytes) -> tuple[int, Answer]:
        parsed = orjson.loads(data)
        status, body = parsed["status"], parsed["body"]
        self._read_count += 1
        number = parsed["n"] if self.quiet else self._read_count
        if type(status) is not int or not isinstance(body, dict) or type(number) is not int:
            raise TypeError(f"status {status!r}, n {number!r}")
        return number, (status, body)

    def _take(self, number: int, answer: Answer) -> None:
        waiter = self._waiters.pop(number, None)
        if waiter is not None:
            if not waiter.done():
                waiter.set_result(answer)
            return
        late = number in self._given_up
        self._given_up.discard(number)
        if answer[0] == 200 or not late:
            self.news = answer
