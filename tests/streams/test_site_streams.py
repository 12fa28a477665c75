"""Streams on a real three-agent site: produce anywhere, read anywhere, offsets, tail,
bad input, and a killed host losing no acknowledged event."""

from __future__ import annotations

import asyncio
import base64
import itertools

import aiohttp
import orjson
import pytest

from meshorch.demo.localsite import LocalSite, wait_ready
from tests.waiting import until

STREAM = "/v1/streams/acme/sensors/readings"


async def produce(
    session: aiohttp.ClientSession, url: str, payloads: list[str], stream: str = STREAM
) -> dict[str, int]:
    body = {"events": [{"payload": p, "level": 6} for p in payloads]}
    async with session.post(f"{url}{stream}/events", json=body) as response:
        data = await response.json()
        assert response.status == 200, data
        return data  # type: ignore[no-any-return]


async def read_all(
    session: aiohttp.ClientSession, url: str, start: int = 1
) -> list[dict[str, object]]:
    events: list[dict[str, object]] = []
    while True:
        async with session.get(f"{url}{STREAM}/events", params={"from": start}) as response:
            data = await response.json()
            assert response.status == 200, data
        if not data["events"]:
            return events
        events.extend(data["events"])
        start = data["next"]


async def test_events_produced_on_every_host_are_numbered_once_and_read_everywhere(
    site: LocalSite, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, site.members)
    answers = []
    for round_ in range(5):
        for host in site.members:
            payloads = [f"{host.host_id}-{round_}-{i}" for i in range(100)]
            answers.append(await produce(session, host.url, payloads))
    numbered = sorted((a["first_seq"], a["last_seq"]) for a in answers)
    assert numbered[0][0] == 1 and numbered[-1][1] == 1500
    assert all(b[0] == a[1] + 1 for a, b in itertools.pairwise(numbered))
    for host in site.members:
        await until(f"{host.host_id} has 1500", lambda h=host: _has_last(session, h.url, 1500), 10)
        events = await read_all(session, host.url)
        assert [e["seq"] for e in events] == list(range(1, 1501))
    # Every batch is contiguous and in the order it was sent, tagged with its host.
    events = await read_all(session, site.members[0].url)
    for answer in answers:
        batch = events[answer["first_seq"] - 1 : answer["last_seq"]]
        host = batch[0]["host"]
        assert all(e["host"] == host and str(e["payload"]).startswith(host) for e in batch)
        assert [int(str(e["payload"]).rsplit("-", 1)[1]) for e in batch] == list(range(100))


async def _has_last(session: aiohttp.ClientSession, url: str, last: int) -> bool:
    async with session.get(f"{url}{STREAM}") as response:
        return response.status == 200 and (await response.json())["last_seq"] == last


async def test_consumer_offsets_tail_and_binary_payloads(
    site: LocalSite, session: aiohttp.ClientSession
) -> None:
    await wait_ready(session, site.members)
    a, b = site.members[0].url, site.members[1].url
    await produce(session, a, [f"e{i}" for i in range(10)])
    async with session.put(f"{a}{STREAM}/offsets/worker", json={"seq": 4}) as response:
        assert response.status == 200, await response.text()
    await until("offset seen on b", lambda: _has_offset(session, b, 4), 10)
    async with session.get(f"{b}{STREAM}/events", params={"consumer": "worker", "limit": 3}) as r:
        data = await r.json()
    assert [e["payload"] for e in data["events"]] == ["e4", "e5", "e6"]
    async with session.put(f"{a}{STREAM}/offsets/worker", json={"seq": 99}) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "offset_out_of_range"

    async with session.ws_connect(f"{b}{STREAM}/tail") as ws:
        blob = bytes(range(256))
        body = {"events": [{"payload_b64": base64.b64encode(blob).decode(), "key": "k"}]}
        async with session.post(f"{a}{STREAM}/events", json=body) as response:
            assert response.status == 200
        message = await asyncio.wait_for(ws.receive_json(loads=orjson.loads), 10)
        (event,) = message["events"]
        assert event["seq"] == 11 and event["key"] == "k"
        assert base64.b64decode(event["payload_b64"]) == blob


async def _has_offset(session: aiohttp.ClientSession, url: str, seq: int) -> bool:
    async with session.get(f"{url}{STREAM}/offsets/worker") as response:
        return response.status == 200 and (await response.json())["seq"] == seq


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b"not json", "malformed_event"),
        (b"{}", "malformed_event"),
        (b'{"events": []}', "malformed_event"),
        (b'{"events": [{"payload": 1}]}', "malformed_event"),
        (b'{"events": [{"payload": "x", "payload_b64": "eA=="}]}', "malformed_event"),
        (b'{"events": [{"payload_b64": "!!"}]}', "malformed_event"),
        (b'{"events": [{"payload": "x", "level": 300}]}', "malformed_event"),
        (b'{"events": [{"payload": "x", "time": "now"}]}', "malformed_event"),
        (b'{"events": [{"payload": "x", "extra": 1}]}', "malformed_event"),
        (b'{"events": [{"payload": "' + b"x" * 300_000 + b'"}]}', "event_too_large"),
    ],
)
async def test_malformed_produce_is_refused_and_stores_nothing(
    site: LocalSite, session: aiohttp.ClientSession, body: bytes, code: str
) -> None:
    host = site.members[0]
    await wait_ready(session, [host, *site.members[1:]])
    await produce(session, host.url, ["kept"])
    async with session.post(f"{host.url}{STREAM}/events", data=body) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == code
    async with session.post(
        f"{host.url}/v1/streams/Acme/x/y/events", data=b'{"events":[{"payload":"x"}]}'
    ) as response:
        assert response.status == 400
        assert (await response.json())["error"]["code"] == "invalid_stream_name"
    assert [e["payload"] for e in await read_all(session, host.url)] == ["kept"]
