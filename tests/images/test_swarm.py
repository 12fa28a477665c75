"""A blob fetched in pieces from several peers at once, against real HTTP servers on
loopback that serve the blob with Range as agents do (aiohttp's FileResponse): every peer
serves a share; a peer that breaks off leaves its pieces to the others; a peer sending
other bytes is caught by the digest and the blob is not kept."""

from __future__ import annotations

import hashlib
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshorch.images.store import BlobStore
from meshorch.images.swarm import PIECE_BYTES, fetch_from_swarm, pieces

SIZE = 10 * PIECE_BYTES + 12345


def test_pieces_cover_the_blob_once() -> None:
    assert pieces(10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert pieces(8, 4) == [(0, 4), (4, 8)]
    assert pieces(0, 4) == []


@pytest.fixture
def blob(tmp_path: Path) -> tuple[Path, str]:
    path = tmp_path / "blob"
    path.write_bytes(os.urandom(SIZE))
    return path, "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


StartPeer = Callable[..., Awaitable[tuple[str, dict[str, int]]]]  # (behaviour) -> url, counts


@pytest.fixture
async def peers(blob: tuple[Path, str]) -> AsyncIterator[StartPeer]:
    runners: list[web.AppRunner] = []

    async def start(behaviour: str = "good") -> tuple[str, dict[str, int]]:
        served = {"requests": 0, "bytes": 0}
        path = blob[0]

        async def handler(request: web.Request) -> web.StreamResponse:
            served["requests"] += 1
            wanted = request.http_range
            length = (wanted.stop or SIZE) - (wanted.start or 0)
            if behaviour == "breaks" and served["requests"] > 1:
                raise web.HTTPServiceUnavailable()
            if behaviour == "lies":
                served["bytes"] += length
                return web.Response(status=206, body=b"x" * length)
            served["bytes"] += length
            return web.FileResponse(path)

        app = web.Application()
        app.router.add_get("/v1/images/blobs/{digest}", handler)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        runners.append(runner)
        port = runner.addresses[0][1]
        return f"http://127.0.0.1:{port}/v1/images/blobs/{blob[1]}", served

    yield start
    for runner in runners:
        await runner.cleanup()


async def test_every_peer_serves_a_share_and_the_blob_is_whole(
    peers: StartPeer, blob: tuple[Path, str], tmp_path: Path
) -> None:
    started = [await peers() for _ in range(3)]
    store = BlobStore(tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        result = await fetch_from_swarm(store, session, [u for u, _ in started], blob[1], SIZE)
    assert result is not None and result.fetched == SIZE
    assert store.path(blob[1]).read_bytes() == blob[0].read_bytes()
    shares = [served["bytes"] for _, served in started]
    assert sum(shares) == SIZE and all(share >= PIECE_BYTES for share in shares), shares
    assert list((tmp_path / "store" / "partial").iterdir()) == []


async def test_a_peer_that_breaks_off_leaves_its_pieces_to_the_others(
    peers: StartPeer, blob: tuple[Path, str], tmp_path: Path
) -> None:
    good = await peers()
    breaks = await peers("breaks")
    store = BlobStore(tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        result = await fetch_from_swarm(store, session, [breaks[0], good[0]], blob[1], SIZE)
    assert result is not None and store.has(blob[1])
    assert breaks[1]["requests"] == 2 and result.by_source == {
        breaks[0]: PIECE_BYTES,
        good[0]: SIZE - PIECE_BYTES,
    }


async def test_a_peer_sending_other_bytes_is_caught_and_nothing_is_kept(
    peers: StartPeer, blob: tuple[Path, str], tmp_path: Path
) -> None:
    good = await peers()
    liar = await peers("lies")
    store = BlobStore(tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        result = await fetch_from_swarm(store, session, [liar[0], good[0]], blob[1], SIZE)
    assert result is None  # the caller fetches it in order, which names the bad source
    assert liar[1]["bytes"] > 0
    assert not store.has(blob[1]) and list((tmp_path / "store" / "partial").iterdir()) == []


async def test_small_blobs_one_source_or_a_partial_go_in_order(
    peers: StartPeer, blob: tuple[Path, str], tmp_path: Path
) -> None:
    one = await peers()
    two = await peers()
    store = BlobStore(tmp_path / "store")
    async with aiohttp.ClientSession() as session:
        assert await fetch_from_swarm(store, session, [one[0]], blob[1], SIZE) is None
        assert await fetch_from_swarm(store, session, [one[0], two[0]], blob[1], 1000) is None
        store.partial_path(blob[1]).write_bytes(blob[0].read_bytes()[:100])
        assert await fetch_from_swarm(store, session, [one[0], two[0]], blob[1], SIZE) is None
    assert one[1]["requests"] == two[1]["requests"] == 0
