"""A pulled blob travels along the chain of a site's hosts (three real agents on
loopback, a small registry in this process that sends a layer slowly or stalls it): the
puller h1 receives it from the registry, h2 follows h1's partial file as it grows, h3
follows h2's. And the route they follow by, ``GET /v1/images/partials/{digest}?follow=
SIZE``: signed by a member, query included; SIZE the blob's size; the bytes as they
arrive, byte for byte up to SIZE; ended short when nothing arrives for a while."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import aiohttp
import orjson
import pytest
from aiohttp import web

from meshorch.demo.localsite import LocalSite
from meshorch.images.follow import IDLE_S
from meshorch.images.oci import OCI_MANIFEST
from meshorch.images.service import MAX_IMAGE_BYTES
from tests.agents_util import peer_headers
from tests.waiting import until

pytestmark = pytest.mark.timeout(180)

LAYER = os.urandom(8 << 20)
HALF = 3 << 20
CONFIG = b'{"architecture": "amd64", "os": "linux"}'
STEP = 128 << 10


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


MANIFEST = orjson.dumps({
    "schemaVersion": 2, "mediaType": OCI_MANIFEST,
    "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
               "digest": digest_of(CONFIG), "size": len(CONFIG)},
    "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                "digest": digest_of(LAYER), "size": len(LAYER)}],
})  # fmt: skip


class Registry:
    """Serves one image; the layer at ``STEP`` bytes per ``pause_s``, and once ``HALF``
    is sent, not before ``gate`` is set."""

    def __init__(self, pause_s: float) -> None:
        self.pause_s = pause_s
        self.gate = asyncio.Event()
        self.layer_requests = 0
        self.layer_bytes = 0

    async def manifest(self, _request: web.Request) -> web.Response:
        return web.Response(body=MANIFEST, content_type=OCI_MANIFEST)

    async def blob(self, request: web.Request) -> web.StreamResponse:
        wanted = request.match_info["digest"]
        if wanted == digest_of(CONFIG):
            return web.Response(body=CONFIG)
        if wanted != digest_of(LAYER):
            raise web.HTTPNotFound()
        response = web.StreamResponse()
        response.content_length = len(LAYER)
        await response.prepare(request)
        if request.method == "HEAD":
            return response
        self.layer_requests += 1
        for start in range(0, len(LAYER), STEP):
            if start == HALF:
                await self.gate.wait()
            await response.write(LAYER[start : start + STEP])
            self.layer_bytes += len(LAYER[start : start + STEP])
            await asyncio.sleep(self.pause_s)
        return response


@pytest.fixture
async def registry() -> AsyncIterator[Callable[[float], Any]]:
    runners: list[web.AppRunner] = []

    async def start(pause_s: float) -> tuple[Registry, str]:
        served = Registry(pause_s)
        app = web.Application()
        app.router.add_get("/v2/x/app/manifests/{ref}", served.manifest)
        app.router.add_get("/v2/x/app/blobs/{digest}", served.blob)
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return served, f"127.0.0.1:{runner.addresses[0][1]}/x/app:1"

    yield start
    for runner in runners:
        await runner.cleanup()


async def pull(session: aiohttp.ClientSession, url: str, ref: str) -> dict[str, Any]:
    body = {"ref": ref, "plain_http": True}
    async with session.post(f"{url}/v1/images/pull", json=body, timeout=120) as response:
        answer: dict[str, Any] = await response.json()
        assert response.status == 200, answer
        return answer


async def local(session: aiohttp.ClientSession, url: str) -> dict[str, Any]:
    async with session.get(f"{url}/v1/images?consistency=local") as response:
        assert response.status == 200
        answer: dict[str, Any] = await response.json()
        return answer


async def every_host_holds(session: aiohttp.ClientSession, site: LocalSite) -> None:
    async def held() -> bool:
        images = (await local(session, site.members[0].url))["images"]
        return bool(images) and sorted(images[0]["holders"]) == ["h1", "h2", "h3"]

    await until("every host holds the image", held, timeout_s=60)
    for host in site.members:
        blob = host.data_dir / "images" / "blobs" / "sha256" / digest_of(LAYER)[7:]
        assert blob.read_bytes() == LAYER, host.host_id


async def test_the_layer_crosses_each_host_once_along_the_chain(
    ready_site: LocalSite, session: aiohttp.ClientSession, registry: Any
) -> None:
    served, ref = await registry(0.03)  # 8 MiB in about 2 s: the others follow the pull
    served.gate.set()
    h1 = ready_site.members[0]
    await pull(session, h1.url, ref)
    await every_host_holds(session, ready_site)
    assert (served.layer_requests, served.layer_bytes) == (1, len(LAYER))  # one from outside
    counters = {h.host_id: (await local(session, h.url))["local"] for h in ready_site.members}
    sent = {host: c["followed_bytes"] for host, c in counters.items()}
    # h1 sends the blobs to h2 alone, h2 to h3; nobody follows h3.
    assert len(LAYER) <= sent["h1"] < len(LAYER) + (64 << 10), counters
    assert len(LAYER) <= sent["h2"] < len(LAYER) + (64 << 10), counters
    assert sent["h3"] == 0, counters
    assert counters["h2"]["fetched_bytes"] >= len(LAYER), counters
    assert counters["h3"]["fetched_bytes"] >= len(LAYER), counters


async def test_the_follow_route_refuses_before_any_wait_and_streams_as_bytes_arrive(
    ready_site: LocalSite, session: aiohttp.ClientSession, registry: Any
) -> None:
    served, ref = await registry(0.005)
    h1, h3 = ready_site.members[0], ready_site.members[2]
    puller = asyncio.create_task(pull(session, h1.url, ref))
    layer = digest_of(LAYER)
    partial = h1.data_dir / "images" / "partial" / layer[7:]
    await until("half the layer at h1", lambda: partial.stat().st_size >= HALF, timeout_s=30)

    path = f"/v1/images/partials/{layer}"
    following = f"{path}?follow={len(LAYER)}"

    def signed(path_qs: str) -> dict[str, str]:
        return peer_headers(h3.data_dir, "h3", "GET", path_qs)

    async with aiohttp.ClientSession() as peer:

        async def answer(path_qs: str, headers: dict[str, str]) -> tuple[int, str, float]:
            started = time.monotonic()
            async with peer.get(h1.url + path_qs, headers=headers) as response:
                body = await response.json()
                return response.status, body["error"]["code"], time.monotonic() - started

        refused = [
            await answer(following, {}),  # a stranger
            await answer(following, signed(path)),  # signed without the query
            await answer(f"{path}?follow={HALF}", signed(following)),  # query changed
        ]
        assert all(r[:2] == (401, "peer_only") and r[2] < 1.0 for r in refused), refused
        for size in ("abc", "-1", str(MAX_IMAGE_BYTES + 1), str(len(LAYER) - 1)):
            asked = f"{path}?follow={size}"
            status, code, seconds = await answer(asked, signed(asked))
            assert (status, code) == (400, "bad_follow") and seconds < 1.0, size

        # The registry holds the rest back: the follow ends short after IDLE_S.
        started = time.monotonic()
        headers = {**signed(following), "Range": "bytes=100-"}
        async with peer.get(h1.url + following, headers=headers) as response:
            assert response.status == 206
            assert response.headers["Content-Range"] == f"bytes 100-{len(LAYER) - 1}/{len(LAYER)}"
            body = await response.read()
        assert body == LAYER[100 : 100 + len(body)] and len(body) >= HALF - 100
        assert IDLE_S - 0.5 <= time.monotonic() - started < IDLE_S + 5

        # A follow from the start, the registry let go meanwhile: every byte, to SIZE.
        async def follow_all() -> bytes:
            async with peer.get(h1.url + following, headers=signed(following)) as response:
                assert response.status == 200
                return await response.read()

        whole = asyncio.create_task(follow_all())
        await asyncio.sleep(0.5)
        assert not whole.done()
        served.gate.set()
        assert await whole == LAYER
    await puller
    await every_host_holds(session, ready_site)
    assert served.layer_requests == 1


async def test_a_pull_done_before_the_others_start_still_spreads_along_the_chain(
    ready_site: LocalSite, session: aiohttp.ClientSession, registry: Any
) -> None:
    served, ref = await registry(0.0)  # the registry faster than the others' next round
    served.gate.set()
    await pull(session, ready_site.members[0].url, ref)
    await every_host_holds(session, ready_site)
    assert (served.layer_requests, served.layer_bytes) == (1, len(LAYER))
    counters = {h.host_id: (await local(session, h.url))["local"] for h in ready_site.members}
    sent = {host: c["followed_bytes"] for host, c in counters.items()}
    # h2 follows h1 (one holder: no swarm); h3 follows h2, unless h2 was listed as a
    # holder by then and h3 took pieces from both (a swarm: half from each).
    assert len(LAYER) <= sent["h1"], counters
    assert sent["h2"] + counters["h3"]["swarm_bytes"] >= len(LAYER), counters
    assert sent["h3"] == 0, counters
