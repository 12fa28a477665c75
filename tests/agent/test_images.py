"""The site image store: an image enters once and spreads between hosts, verified."""

import asyncio
import hashlib
import os
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshorch.demo.localsite import LocalSite, wait_ready
from meshorch.images.store import BlobStore, ImageTransferError
from tests.agents_util import peer_headers
from tests.waiting import until


async def catalog(session: aiohttp.ClientSession, url: str) -> dict[str, object]:
    async with session.get(f"{url}/v1/images") as response:
        assert response.status == 200
        return dict(await response.json())


async def test_an_image_added_at_one_host_is_copied_by_the_others(
    ready_site: LocalSite, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    archive = tmp_path / "image.tar"
    archive.write_bytes(os.urandom(3 * 1024 * 1024 + 17))
    digest = "sha256:" + hashlib.sha256(archive.read_bytes()).hexdigest()
    first = ready_site.members[0]
    command = [sys.executable, "-m", "meshorch", "image", "add", str(archive),
               "--ref", "shop/web:1", "--api", first.api]  # fmt: skip
    added = await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=60
    )
    assert added.returncode == 0, added.stderr
    assert digest in added.stdout

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        images = (await catalog(session, first.url))["images"]
        if images and sorted(images[0]["holders"]) == ["h1", "h2", "h3"]:  # type: ignore[index]
            break
        await asyncio.sleep(0.2)
    else:
        raise AssertionError(f"not every host holds the image: {images}")

    uploaded = fetched = 0
    for host in ready_site.members:
        counters = (await catalog(session, host.url))["local"]
        uploaded += counters["uploaded_bytes"]  # type: ignore[index]
        fetched += counters["fetched_bytes"]  # type: ignore[index]
        blob = host.data_dir / "images" / "blobs" / "sha256" / digest.removeprefix("sha256:")
        assert hashlib.sha256(blob.read_bytes()).hexdigest() == digest.removeprefix("sha256:")
    size = archive.stat().st_size
    assert uploaded == size  # the bytes that came from outside the site: one copy
    assert fetched == 2 * size  # the two other hosts copied it inside the site


async def test_bad_image_requests_are_refused(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    url = ready_site.members[0].url
    async with session.post(f"{url}/v1/images?ref=Bad Ref!", data=b"x") as response:
        assert response.status == 400 and (await response.json())["error"]["code"] == "bad_ref"
    # Blobs are a peer route: asked as the other members ask, signed by h2.
    h2 = ready_site.members[1]
    async with aiohttp.ClientSession() as peer:
        for path, status in [
            ("/v1/images/blobs/sha256:nothex", 400),
            (f"/v1/images/blobs/sha256:{'0' * 64}", 404),
        ]:
            headers = peer_headers(h2.data_dir, h2.host_id, "GET", path)
            async with peer.get(url + path, headers=headers) as response:
                assert response.status == status, path
    assert (await catalog(session, url))["images"] == []


async def serve(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, f"http://127.0.0.1:{port}"


async def test_a_corrupt_source_is_rejected_and_a_good_one_used(tmp_path: Path) -> None:
    good = os.urandom(2_500_000)
    digest = "sha256:" + hashlib.sha256(good).hexdigest()
    bad = bytearray(good)
    bad[1000] ^= 0xFF

    async def corrupt(_request: web.Request) -> web.Response:
        return web.Response(body=bytes(bad))

    (tmp_path / "blob").write_bytes(good)

    async def honest(_request: web.Request) -> web.FileResponse:
        return web.FileResponse(tmp_path / "blob")

    app = web.Application()
    app.router.add_get("/corrupt", corrupt)
    app.router.add_get("/honest", honest)
    runner, base = await serve(app)
    try:
        store = BlobStore(tmp_path / "store")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ImageTransferError, match="does not match"):
                await store.fetch(session, [f"{base}/corrupt"], digest, len(good))
            assert not store.has(digest)
            fetched = await store.fetch(
                session, [f"{base}/corrupt", f"{base}/honest"], digest, len(good)
            )
        assert store.has(digest) and fetched == 2 * len(good)
        assert store.path(digest).read_bytes() == good
    finally:
        await runner.cleanup()


async def test_a_broken_transfer_resumes_where_it_stopped(tmp_path: Path) -> None:
    data = os.urandom(3_000_000)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    (tmp_path / "blob").write_bytes(data)
    ranges: list[str | None] = []

    async def flaky(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range"))
        if len(ranges) == 1:  # the first attempt dies half way
            response = web.StreamResponse()
            response.content_length = len(data)
            await response.prepare(request)
            await response.write(data[:1_000_000])
            request.transport.close()  # type: ignore[union-attr]
            return response
        return web.FileResponse(tmp_path / "blob")

    app = web.Application()
    app.router.add_get("/blob", flaky)
    runner, base = await serve(app)
    try:
        store = BlobStore(tmp_path / "store")
        async with aiohttp.ClientSession() as session:
            with pytest.raises(ImageTransferError):
                await store.fetch(session, [f"{base}/blob"], digest, len(data))
            fetched = await store.fetch(session, [f"{base}/blob"], digest, len(data))
        assert store.path(digest).read_bytes() == data
        assert ranges[1] is not None and ranges[1].startswith("bytes=")
        assert fetched < len(data)  # only the missing part came the second time
    finally:
        await runner.cleanup()


async def test_concurrent_fetches_of_one_blob_publish_it_intact(tmp_path: Path) -> None:
    # The agent's image loop and its reconciler may both want an image at once; with one
    # shared partial file the second download used to truncate the first one's file.
    blob = os.urandom(3_000_000)
    digest = "sha256:" + hashlib.sha256(blob).hexdigest()
    served = 0

    async def slow(request: web.Request) -> web.StreamResponse:
        nonlocal served
        served += 1
        response = web.StreamResponse()
        await response.prepare(request)
        for start in range(0, len(blob), 100_000):
            await response.write(blob[start : start + 100_000])
            await asyncio.sleep(0.005)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/blob", slow)
    runner, base = await serve(app)
    try:
        store = BlobStore(tmp_path / "store")
        async with aiohttp.ClientSession() as session:
            fetched = await asyncio.gather(
                *(store.fetch(session, [f"{base}/blob"], digest, len(blob)) for _ in range(4))
            )
        assert store.path(digest).read_bytes() == blob
        assert served == 1 and sorted(fetched) == [0, 0, 0, len(blob)]
    finally:
        await runner.cleanup()


async def test_a_host_back_copies_a_large_blob_in_pieces_from_every_holder(
    ready_site: LocalSite, session: aiohttp.ClientSession
) -> None:
    """h3 is away while h1 adds a 20 MiB image and h2 copies it; back, h3 finds two
    holders and takes pieces from both at once (``swarm_bytes``)."""
    h1, _, h3 = ready_site.members
    ready_site.stop_host(h3)
    data = os.urandom(20 * 1024 * 1024 + 5)
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with session.post(f"{h1.url}/v1/images?ref=shop/big:1", data=data) as response:
        assert response.status == 200, await response.text()

    async def holders() -> list[str]:
        images = (await catalog(session, h1.url))["images"]
        return sorted(images[0]["holders"]) if images else []  # type: ignore[index]

    async def held_by(hosts: list[str]) -> bool:
        return await holders() == hosts

    await until("h1 and h2 hold it", lambda: held_by(["h1", "h2"]), 30)
    ready_site.start_host(h3)
    await wait_ready(session, ready_site.members, 60)
    await until("h3 holds it too", lambda: held_by(["h1", "h2", "h3"]), 60)
    counters: dict[str, int] = (await catalog(session, h3.url))["local"]  # type: ignore[assignment]
    assert counters["swarm_bytes"] == len(data) == counters["fetched_bytes"], counters
    blob = h3.data_dir / "images" / "blobs" / "sha256" / digest.removeprefix("sha256:")
    assert blob.read_bytes() == data
