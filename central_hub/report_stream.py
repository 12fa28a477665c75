"""A site's reports over one WebSocket: ``GET /v1/link/reports`` (docs/fleet-link.md).

Why: a site reports every few seconds, 3,300 reports a second at 10,000 sites. As ``POST
/v1/link/report`` each is an HTTP request with its own Ed25519 signature: in a profile of a
follower replica at 3,000 sites the signature check took 11-15% of its time and aiohttp's
request and answer machinery about a third (aiohttp alone over TLS on this machine: about
100 us of server CPU per signed POST, 21 us per WebSocket message). On a stream the site
signs once, the upgrade request (checked like every link request, before the upgrade: a
stranger gets 401 and no socket), then sends each report as one message on the same TLS
connection, which nobody else can write to; the hub answers each with one message.

Per message, before any work: the site must still be enrolled with the key that signed
the upgrade (a site deleted or moved to a new key since gets its stream closed,
``CLOSE_REVOKED``); a message is bounded by the hub's ``--max-body``. One stream per
site: a newer one closes the older (``CLOSE_REPLACED``), so a stranger cannot hold more
sockets than there are sites with keys it holds. A stream with no report for
``IDLE_S`` is closed. The answer of a message is ``{"status": N, "body": ...}`` where
status and body are what ``POST /v1/link/report`` would have answered.

Quiet reports: a site that offers the WebSocket subprotocol ``QUIET_PROTOCOL`` prefixes
each report with ``ASK`` (answer it) or ``QUIET`` (answer it only if the answer is not
the 200 answer last sent on this stream), and each answer carries ``n``, the number of
the report it answers on this stream. Why: in steady state a report's answer (the fleet
head, the site's head, its hold) is the same as the last one, and writing it (a TLS
record and a send) was 10-13% of each replica's samples in a py-spy profile at 3,000
sites. A site without the subprotocol gets every report answered, in order.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from aiohttp import WSMsgType, web

from central_hub.routing import error_response
from central_hub.store import Store
from meshorch.fleet.report_stream import ASK, QUIET, QUIET_PROTOCOL
from meshorch.fleet.report_stream import STREAM_PATH as STREAM_PATH  # re-exported
from meshorch.fleet.report_stream import Answer as Answer  # re-exported

IDLE_S = 60.0  # a site reports every few seconds
CLOSE_REVOKED = 4401  # the site is no longer enrolled with the key that opened the stream
CLOSE_REPLACED = 4409  # the site opened a newer stream
CLOSE_WAIT_S = 2.0  # for the site's answer to a close, then the socket is dropped
CLOSE_STOPPING = 1001  # going away: the hub stops or its replica's role changed

# Takes a report's raw body; its answer.
ReportHandler = Callable[[bytes], Awaitable[Answer]]


def upgrade_refusal(request: web.Request) -> web.Response | None:
    """426 when the request is no WebSocket upgrade (checked before ``Streams.serve``)."""
    if web.WebSocketResponse(protocols=(QUIET_PROTOCOL,)).can_prepare(request).ok:
        return None
    response = error_response(
        426, "upgrade_required", f"GET {STREAM_PATH} is a WebSocket: send each report on it"
    )
    response.headers["Upgrade"] = "websocket"
    return response


def enrolled_with(store: Store, site: str, key: str) -> Callable[[], bool]:
    """A stream's check, before each message, that ``site`` is still enrolled with the
    ``key`` that signed its upgrade. The site's record is read again only after the sites
    table changed (``Store.generation``): a steady stream's reports cost no read of it."""
    passed_at = [-1]  # the table's generation when the check last passed

    def enrolled() -> bool:
        generation = store.generation("sites")
        if generation == passed_at[0]:
            return True
        found = store.get_json("sites", site)
        ok = isinstance(found, dict) and found.get("public_key") == key
        passed_at[0] = generation if ok else -1
        return ok

    return enrolled


def encode_answer(answer: Answer, number: int | None = None) -> bytes:
    status, body = answer
    if number is None:
        return orjson.dumps({"status": status, "body": body})
    return orjson.dumps({"status": status, "body": body, "n": number})


class Quieter:
    """A quiet stream's rule (``QUIET_PROTOCOL``): which answers are sent. Pure."""

    def __init__(self) -> None:
        self.received = 0
        self._last: dict[str, Any] | None = None  # the last 200 answer sent

    def split(self, message: bytes) -> tuple[bool, bytes | None]:
        """(quiet, report body) of a message; body None when it has no valid prefix."""
        self.received += 1
        prefix = message[:1]
        return prefix == QUIET, message[1:] if prefix in (ASK, QUIET) else None

    def send(self, quiet: bool, answer: Answer) -> bool:
        status, body = answer
        if status != 200:
            return True
        if quiet and body == self._last:
            return False
        self._last = body
        return True


def no_prefix() -> Answer:
    return 400, {
        "error": {
            "code": "bad_message",
            "message": f"on a {QUIET_PROTOCOL} stream a report starts with "
            f"{ASK.decode()!r} (answer it) or {QUIET.decode()!r} (answer only a change)",
        }
    }


class Streams:
    """The open report streams of one hub (or one replica's relay), by site."""

    def __init__(self) -> None:
        self._open: dict[str, web.WebSocketResponse] = {}

    def __len__(self) -> int:
        return len(self._open)

    async def serve(
        self,
        request: web.Request,
        site: str,
        enrolled: Callable[[], bool],
        handle: ReportHandler,
        max_body: int,
    ) -> web.StreamResponse:
        """Upgrade ``request`` (its signature already checked for ``site``) and answer each
        report on it with ``handle`` while ``enrolled()`` holds."""
        refused = upgrade_refusal(request)
        if refused is not None:
            return refused
        ws = web.WebSocketResponse(
            max_msg_size=max_body,
            receive_timeout=IDLE_S,
            compress=False,
            timeout=CLOSE_WAIT_S,
            protocols=(QUIET_PROTOCOL,),
        )
        try:
            await ws.prepare(request)
        except ConnectionResetError:
            # The site went away meanwhile (e.g. it timed out): aiohttp finds the
            # connection gone when it writes this, and drops it.
            return web.Response(status=400)
        older = self._open.get(site)
        self._open[site] = ws
        if older is not None:
            await older.close(code=CLOSE_REPLACED, message=b"a newer stream of this site")
        try:
            await self._answer_each(ws, enrolled, handle)
        except TimeoutError:
            await ws.close(code=CLOSE_STOPPING, message=b"no report for too long")
        except ConnectionResetError:
            pass  # the site closed its end while its answer was on the way
        finally:
            if self._open.get(site) is ws:
                del self._open[site]
        return ws

    @staticmethod
    async def _answer_each(
        ws: web.WebSocketResponse, enrolled: Callable[[], bool], handle: ReportHandler
    ) -> None:
        quieter = Quieter() if ws.ws_protocol == QUIET_PROTOCOL else None
        async for message in ws:
            if message.type is WSMsgType.BINARY:
                body: bytes = message.data
            elif message.type is WSMsgType.TEXT:
                body = message.data.encode()
            else:
                return  # an error frame (e.g. too large): aiohttp closes with its code
            if not enrolled():
                await ws.close(code=CLOSE_REVOKED, message=b"site unknown or its key changed")
                return
            if quieter is None:
                await ws.send_bytes(encode_answer(await handle(body)))
                continue
            quiet, report = quieter.split(body)
            answer = no_prefix() if report is None else await handle(report)
            if quieter.send(quiet, answer):
                await ws.send_bytes(encode_answer(answer, quieter.received))

    async def close_all(self) -> None:
        """Close every stream (the hub stops, or the replica's role changed): the sites
        open a new one, at whichever replica now takes their reports."""
        streams, self._open = list(self._open.values()), {}
        message = b"the hub replica stops or moves"
        await asyncio.gather(*(ws.close(code=CLOSE_STOPPING, message=message) for ws in streams))
