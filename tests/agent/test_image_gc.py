"""Image garbage collection on sites of three real agents, with images pulled from a real
registry (lab test: root, podman, docker-registry, htpasswd; the process runtime runs the
apps): an image no app names leaves the site after the grace period, a layer shared with
an image still in use stays, a pinned image stays; a host over its image store limit gives
up the image no app names before the one an app runs on another host."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from meshorch.demo.localsite import LocalHost, LocalSite, wait_ready
from meshorch.images.reference import parse_reference
from meshorch.images.registry import Credentials, RegistryClient
from tests.images.registry_fixtures import (
    HOST_PLATFORM,
    PASSWORD,
    USER,
    PushedImages,
    registry_with_images,
)
from tests.labutil import require_lab
from tests.waiting import until

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

GRACE_S = 4.0
APP = """
api_version: meshorch/v1
name: {name}
version: "1"
services:
  - name: main
    replicas: 1
    {constraints}
    containers:
      - name: main
        image: {image}
        command: ["sleep", "1000"]
        resources: {{memory_limit: 16Mi, cpu_request: 0.05}}
"""


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


@pytest.fixture
async def make_site(tmp_path: Path) -> AsyncIterator[Any]:
    started: list[LocalSite] = []

    async def make(**options: Any) -> LocalSite:
        site = LocalSite(hosts=3, site="gc", root=tmp_path / f"site{len(started)}", **options)
        started.append(site)
        site.start()
        async with site.session() as session:
            await wait_ready(session, site.members)
        return site

    yield make
    for site in started:
        site.stop()
        print(site.logs())


async def registry_blobs(images: PushedImages, name: str) -> dict[str, int]:
    """Every blob of ``name`` (documents, config, layers) and its size, from the registry."""
    async with aiohttp.ClientSession() as session:
        client = RegistryClient(session, images.host, Credentials(USER, PASSWORD), plain_http=True)
        resolved = await client.resolve(parse_reference(f"{images.host}/{name}"), HOST_PLATFORM)
    blobs = {digest: len(raw) for digest, raw in resolved.documents}
    blobs.update({b.digest: b.size for b in resolved.manifest.blobs()})
    return blobs


def stored(host: LocalHost, digest: str) -> bool:
    return (host.data_dir / "images" / "blobs" / "sha256" / digest.removeprefix("sha256:")).exists()


async def call(
    session: aiohttp.ClientSession, method: str, url: str, **body: Any
) -> dict[str, Any]:
    async with session.request(method, url, **body) as response:
        answer = dict(await response.json())
        assert response.status == 200, answer
        return answer


async def pull(
    session: aiohttp.ClientSession, host: LocalHost, ref: str, pin: bool = False
) -> dict[str, Any]:
    body = {"ref": ref, "username": USER, "password": PASSWORD, "plain_http": True, "pin": pin}
    return await call(session, "POST", f"{host.url}/v1/images/pull", json=body)


async def catalogue(session: aiohttp.ClientSession, host: LocalHost) -> dict[str, Any]:
    answer = await call(session, "GET", f"{host.url}/v1/images")
    return {image["ref"]: image for image in answer["images"]}


async def deploy(
    session: aiohttp.ClientSession, host: LocalHost, name: str, image: str, on: str = ""
) -> None:
    constraints = f"constraints: [{{label: role, op: equals, values: [{on}]}}]" if on else ""
    text = APP.format(name=name, image=image, constraints=constraints)
    await call(session, "POST", f"{host.url}/v1/apps", data=text.encode())


async def test_unused_images_leave_after_the_grace_shared_and_pinned_stay(
    make_site: Any, images: PushedImages
) -> None:
    site: LocalSite = await make_site(extra_args=["--image-grace", str(GRACE_S)])
    h1 = site.members[0]
    web, pos, base = (f"{images.host}/lab/{n}:1" for n in ("app", "victim", "base"))
    web_blobs = await registry_blobs(images, "lab/app:1")
    pos_blobs = await registry_blobs(images, "lab/victim:1")
    base_blobs = await registry_blobs(images, "lab/base:1")
    (base_layer,) = set(web_blobs) & set(pos_blobs) & set(base_blobs)  # busybox's rootfs
    web_only = set(web_blobs) - set(pos_blobs) - set(base_blobs)
    pos_only = set(pos_blobs) - set(web_blobs) - set(base_blobs)
    async with site.session() as session:
        for ref, pin in ((web, False), (pos, False), (base, True)):
            await pull(session, h1, ref, pin)
        await deploy(session, h1, "web", web)
        await deploy(session, h1, "pos", pos)

        async def everywhere() -> bool:
            images = await catalogue(session, h1)
            return all(len(images[ref]["holders"]) == 3 for ref in (web, pos, base))

        await until("every host holds the three images", everywhere, 60)
        # A transfer nobody will finish (of a blob no image lists), written long ago.
        stale = site.members[1].data_dir / "images" / "partial" / ("9" * 64)
        stale.write_bytes(b"half a blob")
        os.utime(stale, (time.time() - 3600, time.time() - 3600))
        # Past the grace period, nothing goes: two images run, the third is pinned.
        await asyncio.sleep(GRACE_S + 6)
        kept = await catalogue(session, h1)
        assert set(kept) == {web, pos, base}
        assert not any("idle_since" in image for image in kept.values()), kept
        assert all(stored(h, d) for h in site.members for d in (*web_blobs, *pos_blobs))
        assert not stale.exists()

        removed_at = time.time()
        await call(session, "DELETE", f"{h1.url}/v1/apps/web")
        await until("web's image idle", lambda: idle(session, h1, web), 15)

        async def web_gone() -> bool:
            return web not in await catalogue(session, h1) and not any(
                stored(h, d) for h in site.members for d in web_only
            )

        await until("web's own blobs removed on every host", web_gone, 60)
        assert time.time() - removed_at >= GRACE_S
        # The base layer stays: pos runs it, and the pinned base image lists it.
        after = await catalogue(session, h1)
        assert set(after) == {pos, base}
        assert all(stored(h, d) for h in site.members for d in (*pos_blobs, *base_blobs))
        assert base_layer not in web_only

        # pos goes too: its own blobs go, the pinned image's (with the base layer) stay.
        await call(session, "DELETE", f"{h1.url}/v1/apps/pos")

        async def pos_gone() -> bool:
            return pos not in await catalogue(session, h1) and not any(
                stored(h, d) for h in site.members for d in pos_only
            )

        await until("pos's own blobs removed on every host", pos_gone, 60)
        assert set(await catalogue(session, h1)) == {base}
        assert all(stored(h, d) for h in site.members for d in base_blobs)
        removed = [
            (await call(session, "GET", f"{h.url}/v1/images"))["local"]["removed_bytes"]
            for h in site.members
        ]
        own = sum(web_blobs[d] for d in web_only) + sum(pos_blobs[d] for d in pos_only)
        assert removed == [own] * 3, (removed, own)


async def idle(session: aiohttp.ClientSession, host: LocalHost, ref: str) -> bool:
    image = (await catalogue(session, host)).get(ref)
    return image is not None and "idle_since" in image


async def test_a_host_over_its_limit_gives_up_the_unused_image_first(
    make_site: Any, images: PushedImages
) -> None:
    web_blobs = await registry_blobs(images, "lab/app:1")
    pos_blobs = await registry_blobs(images, "lab/victim:1")
    web_only = set(web_blobs) - set(pos_blobs)
    own = sum(web_blobs[d] for d in web_only)
    # h3 holds pos whole and half of what web adds: it must give up one of the two images.
    limit = sum(pos_blobs.values()) + own // 2
    site: LocalSite = await make_site(
        extra_args=["--image-grace", "600"],
        host_args={"h1": ["--label", "role=pos"], "h3": ["--image-store-max", str(limit)]},
    )
    h1, h3 = site.members[0], site.members[2]
    web, pos = f"{images.host}/lab/app:1", f"{images.host}/lab/victim:1"
    async with site.session() as session:
        await pull(session, h1, pos)
        await deploy(session, h1, "pos", pos, on="pos")  # runs on h1 only

        async def h3_holds_pos() -> bool:
            return "h3" in (await catalogue(session, h1))[pos]["holders"]

        await until("h3 holds pos", h3_holds_pos, 60)
        await pull(session, h1, web)  # no app names it: idle, within the grace

        async def h3_gave_up_web() -> dict[str, Any] | None:
            local = (await call(session, "GET", f"{h3.url}/v1/images"))["local"]
            return local if local["evicted_images"] >= 1 else None

        local = await until("h3 gives up an image", h3_gave_up_web, 60)
        await asyncio.sleep(6)  # a tick or more: the sync loop does not copy it back
        kept = await catalogue(session, h1)
        assert set(kept) == {web, pos}  # the catalogue keeps both (the grace runs)
        assert sorted(kept[web]["holders"]) == ["h1", "h2"]
        assert "h3" in kept[pos]["holders"]
        assert all(stored(h3, d) for d in pos_blobs)  # needed elsewhere, kept
        assert not any(stored(h3, d) for d in web_only)  # unused, given up
        local = (await call(session, "GET", f"{h3.url}/v1/images"))["local"]
        assert local["evicted_images"] == 1 and local["removed_bytes"] == own, local
        assert local["fetched_bytes"] >= own  # h3 had copied web before giving it up
        for host in site.members[:2]:  # the others are under no limit
            assert all(stored(host, d) for d in (*web_blobs, *pos_blobs)), host.host_id


async def test_only_an_image_writer_pulls_and_pins(make_site: Any, images: PushedImages) -> None:
    """A pull with ``pin`` is refused to a viewer, another tenant's operator and a caller
    with no token, before any registry is contacted; a ``pin`` that is not a boolean is a
    bad request. The catalogue stays empty and the registry serves nothing."""
    site: LocalSite = await make_site()
    h1 = site.members[0]
    body = {"ref": f"{images.host}/lab/base:1", "username": USER, "password": PASSWORD,
            "plain_http": True, "pin": True}  # fmt: skip
    url = f"{h1.url}/v1/images/pull"
    async with site.session() as admin, aiohttp.ClientSession() as stranger:
        tokens = {}
        for name, grant in (("viewer", {"role": "viewer"}),
                            ("tenant", {"role": "operator", "tenant": "other"})):  # fmt: skip
            async with admin.post(f"{h1.url}/v1/access-tokens", json=grant) as response:
                made = await response.json()
                assert response.status == 201, made
                tokens[name] = {"Authorization": f"Bearer {made['token']}"}
        for headers, status in ((tokens["viewer"], 403), (tokens["tenant"], 403), ({}, 401)):
            async with stranger.post(url, json=body, headers=headers) as response:
                assert response.status == status, await response.text()
        async with admin.post(url, json={**body, "pin": "yes"}) as response:
            answer = await response.json()
            assert (response.status, answer["error"]["code"]) == (400, "bad_request"), answer
        assert await catalogue(admin, h1) == {}
        local = (await call(admin, "GET", f"{h1.url}/v1/images"))["local"]
        assert local["pulled_bytes"] == 0, local
