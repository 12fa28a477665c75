"""The agent's stream routes: the site's local event bus (docs/streams.md).

    GET  /v1/streams                                   every stream with its counters
    GET  /v1/streams/{tenant}/{app}/{name}             one stream
    PUT  /v1/streams/{tenant}/{app}/{name}             {"retention": {...}}: create / set policy
    POST /v1/streams/{tenant}/{app}/{name}/events      {"events": [...]}: produce
    GET  /v1/streams/{tenant}/{app}/{name}/events      ?from=SEQ | ?consumer=C, &limit, &wait
    GET  /v1/streams/{tenant}/{app}/{name}/tail        websocket: events as they arrive
    GET|PUT /v1/streams/{tenant}/{app}/{name}/offsets/{consumer}

A produce answers once the events are stored on a majority of the site's hosts.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import math
import time

import orjson
from aiohttp import WSMsgType, web

from meshorch.errors import ConfigurationError
from meshorch.http_body import read_limited
from meshorch.streams.model import (
    MAX_BATCH_EVENTS,
    MAX_EVENT_BYTES,
    EventTooLarge,
    MalformedEvent,
    NewEvent,
    RetentionPolicy,
    StreamName,
)
from meshorch.streams.site import DEFAULT_READ_LIMIT, MAX_READ_LIMIT, SiteStreams, StoredEvent

MAX_PRODUCE_BODY = 16 * 1024 * 1024
MAX_WAIT_S = 60.0
TAIL_POLL_S = 0.05
_EVENT_FIELDS = frozenset({"payload", "payload_b64", "key", "level", "time"})
_NAME = "/v1/streams/{tenant}/{app}/{name}"


def add_stream_routes(app: web.Application, streams: SiteStreams) -> None:
    """Register the routes, served from ``streams``."""
    app[_STREAMS] = streams
    app.router.add_get("/v1/streams", list_streams)
    app.router.add_get(_NAME, get_stream)
    app.router.add_put(_NAME, put_stream)
    app.router.add_post(_NAME + "/events", produce)
    app.router.add_get(_NAME + "/events", consume)
    app.router.add_get(_NAME + "/tail", tail)
    app.router.add_get(_NAME + "/offsets/{consumer}", get_offset)
    app.router.add_put(_NAME + "/offsets/{consumer}", put_offset)


_STREAMS: web.AppKey[SiteStreams] = web.AppKey("site_streams")


def _streams(request: web.Request) -> SiteStreams:
    return request.app[_STREAMS]


def _name(request: web.Request) -> StreamName:
    info = request.match_info
    return StreamName(info["tenant"], info["app"], info["name"])


def _json(data: object, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(data), status=status, content_type="application/json")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise MalformedEvent(f"query parameter {name} must be an integer, got {raw!r}") from None
    if not low <= value <= high:
        raise MalformedEvent(f"query parameter {name} must be {low}..{high}, got {value}")
    return value


def parse_events(body: bytes, now: float) -> list[NewEvent]:
    """``{"events": [{"payload": text | "payload_b64": base64, "key", "level", "time"}]}``."""
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"the body is not JSON: {exc}") from exc
    if (
        not isinstance(data, dict)
        or set(data) != {"events"}
        or not isinstance(data["events"], list)
    ):
        raise MalformedEvent('the body must be {"events": [...]}')
    raw_events = data["events"]
    if not raw_events:
        raise MalformedEvent("a batch holds at least one event")
    if len(raw_events) > MAX_BATCH_EVENTS:
        raise MalformedEvent(
            f"a batch holds at most {MAX_BATCH_EVENTS} events, got {len(raw_events)}",
            code="batch_too_large",
        )
    return [_event(i, item, now) for i, item in enumerate(raw_events)]


def _event(position: int, item: object, now: float) -> NewEvent:
    where = f"event {position}"
    if not isinstance(item, dict):
        raise MalformedEvent(f"{where} must be an object")
    unknown = set(item) - _EVENT_FIELDS
    if unknown:
        raise MalformedEvent(f"{where} has unknown fields: {', '.join(sorted(unknown))}")
    if ("payload" in item) == ("payload_b64" in item):
        raise MalformedEvent(f"{where} needs exactly one of payload (text) and payload_b64")
    if "payload" in item:
        if not isinstance(item["payload"], str):
            raise MalformedEvent(f"{where}: payload must be a string")
        payload = item["payload"].encode("utf-8", errors="surrogatepass")
    else:
        encoded = item["payload_b64"]
        if not isinstance(encoded, str):
            raise MalformedEvent(f"{where}: payload_b64 must be a base64 string")
        try:
            payload = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise MalformedEvent(f"{where}: payload_b64 is not base64: {exc}") from exc
    if len(payload) > MAX_EVENT_BYTES:
        raise EventTooLarge(
            f"{where} payload is {len(payload)} bytes; the limit is {MAX_EVENT_BYTES} bytes"
        )
    key = item.get("key")
    if key is not None and not isinstance(key, str):
        raise MalformedEvent(f"{where}: key must be a string")
    stamp = item.get("time", now)
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise MalformedEvent(f"{where}: time must be a number of unix seconds")
    return NewEvent(payload, float(stamp), None if key is None else key.encode(), item.get("level"))


def event_json(stored: StoredEvent) -> dict[str, object]:
    event = stored.event
    data: dict[str, object] = {"seq": event.seq, "time": event.time_s, "host": stored.host}
    if event.level is not None:
        data["level"] = event.level
    if event.key is not None:
        data["key"] = event.key.decode(errors="replace")
    try:
        data["payload"] = event.payload.decode()
    except UnicodeDecodeError:
        data["payload_b64"] = base64.b64encode(event.payload).decode()
    return data


async def list_streams(request: web.Request) -> web.Response:
    streams = _streams(request)
    return _json({"streams": [streams.status(name).to_json() for name in streams.names()]})


async def get_stream(request: web.Request) -> web.Response:
    return _json(_streams(request).status(_name(request)).to_json())


async def put_stream(request: web.Request) -> web.Response:
    body = await read_limited(request.content, 4096)
    try:
        data = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"retention"}:
        raise MalformedEvent('the body must be {"retention": {"max_bytes": ..., "max_age_s": ...}}')
    try:
        policy = RetentionPolicy.from_json(data["retention"])
    except ConfigurationError as exc:
        raise MalformedEvent(str(exc), code="bad_retention") from exc
    status = await _streams(request).configure(_name(request), policy)
    return _json(status.to_json())


async def produce(request: web.Request) -> web.Response:
    name = _name(request)
    body = await read_limited(request.content, MAX_PRODUCE_BODY)
    if len(body) > MAX_PRODUCE_BODY:
        raise MalformedEvent(
            f"a produce request is limited to {MAX_PRODUCE_BODY} bytes", code="batch_too_large"
        )
    events = parse_events(body, time.time())
    first, last = await _streams(request).produce(name, events)
    return _json({"stream": str(name), "first_seq": first, "last_seq": last, "count": len(events)})


async def consume(request: web.Request) -> web.Response:
    name = _name(request)
    streams = _streams(request)
    consumer = request.query.get("consumer")
    if consumer is not None and "from" in request.query:
        raise MalformedEvent("give either from or consumer, not both")
    start = (
        streams.offset(name, consumer) + 1
        if consumer is not None
        else _int_param(request, "from", 1, 0, 2**63)
    )
    limit = _int_param(request, "limit", DEFAULT_READ_LIMIT, 1, MAX_READ_LIMIT)
    wait = _int_param(request, "wait", 0, 0, int(MAX_WAIT_S))
    events = streams.read(name, start, limit=limit)
    if not events and wait and await streams.wait_beyond(name, start - 1, wait):
        events = streams.read(name, start, limit=limit)
    status = streams.status(name)
    return _json(
        {
            "stream": str(name),
            "events": [event_json(e) for e in events],
            "next": events[-1].event.seq + 1 if events else max(start, status.first_seq),
            "first_seq": status.first_seq,
            "last_seq": status.last_seq,
        }
    )


async def tail(request: web.Request) -> web.WebSocketResponse:
    """Send ``{"events": [...]}`` messages from ``from`` (default: new events only)."""
    name = _name(request)
    streams = _streams(request)
    status = streams.status(name)
    start = _int_param(request, "from", status.last_seq + 1, 0, 2**63)
    ws = web.WebSocketResponse(heartbeat=20)
    await ws.prepare(request)
    closed = asyncio.create_task(_until_closed(ws))
    try:
        while not closed.done():
            events = streams.read(name, start)
            if events:
                await ws.send_str(
                    orjson.dumps({"events": [event_json(e) for e in events]}).decode()
                )
                start = events[-1].event.seq + 1
                continue
            more = asyncio.create_task(streams.wait_beyond(name, start - 1, 5.0, TAIL_POLL_S))
            await asyncio.wait({closed, more}, return_when=asyncio.FIRST_COMPLETED)
            more.cancel()
    finally:
        closed.cancel()
        await ws.close()
    return ws


async def _until_closed(ws: web.WebSocketResponse) -> None:
    """Read (and ignore) client messages until it closes the socket."""
    async for message in ws:
        if message.type in (WSMsgType.CLOSE, WSMsgType.ERROR):
            return


async def get_offset(request: web.Request) -> web.Response:
    name, consumer = _name(request), request.match_info["consumer"]
    seq = _streams(request).offset(name, consumer)
    return _json({"stream": str(name), "consumer": consumer, "seq": seq})


async def put_offset(request: web.Request) -> web.Response:
    name, consumer = _name(request), request.match_info["consumer"]
    body = await read_limited(request.content, 1024)
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise MalformedEvent(f"the body is not JSON: {exc}") from exc
    if not isinstance(data, dict) or set(data) != {"seq"}:
        raise MalformedEvent('the body must be {"seq": N}')
    await _streams(request).commit_offset(name, consumer, data["seq"])
    return _json({"stream": str(name), "consumer": consumer, "seq": data["seq"]})
