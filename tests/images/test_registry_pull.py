"""Pulling from a real registry (Debian's docker-registry, htpasswd auth) into the blob
store, and running the pulled image with podman (lab test: root, podman, runc,
docker-registry, htpasswd)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from meshorch.apps.settings import podman_dirs
from meshorch.images.oci import NoMatchingPlatform
from meshorch.images.pull import ImageTooLarge, pull, write_oci_layout
from meshorch.images.reference import parse_reference
from meshorch.images.registry import (
    Credentials,
    DigestMismatch,
    NotFound,
    RegistryAuthError,
    RegistryClient,
    RegistryUnavailable,
)
from meshorch.images.store import BlobStore
from meshorch.lab.registry import LabRegistry, TokenAuth
from meshorch.runtime import InstanceSpec, PodmanRuntime
from tests.images.registry_fixtures import (
    HOST_PLATFORM,
    OTHER_PLATFORM,
    PASSWORD,
    USER,
    PushedImages,
    registry_with_images,
)
from tests.images.token_service import ISSUER, SERVICE, TokenService
from tests.labutil import require_lab
from tests.runtime.helpers import free_port, wait_exited

pytestmark = [pytest.mark.lab, pytest.mark.timeout(600)]

GOOD = Credentials(USER, PASSWORD)


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PushedImages]:
    require_lab("podman", "runc", "docker-registry", "htpasswd")
    with registry_with_images(tmp_path_factory.mktemp("registry")) as pushed:
        yield pushed


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
        yield http


def client(
    session: aiohttp.ClientSession, images: PushedImages, creds: Credentials | None = GOOD
) -> RegistryClient:
    return RegistryClient(session, images.host, creds, plain_http=True)


def stored(store: BlobStore) -> set[str]:
    return set(store.digests())


async def test_pull_by_tag_pins_the_pushed_digest_and_podman_runs_it(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{images.host}/lab/app:1")
    pulled = await pull(client(session, images), ref, store, HOST_PLATFORM)

    assert pulled.reference.digest == images.digests["app"]  # the tag, resolved once
    assert pulled.reference.tag == "1"
    assert len(pulled.manifest.layers) == 2
    wanted = {pulled.manifest_digest, *(b.digest for b in pulled.manifest.blobs())}
    assert stored(store) == wanted
    assert pulled.fetched_bytes == sum(b.size for b in pulled.manifest.blobs())

    runtime = PodmanRuntime(*podman_dirs(tmp_path / "host"))
    try:
        layout = await write_oci_layout(
            store, pulled.manifest_digest, pulled.local_name(), tmp_path / "layout"
        )
        await runtime.load_image(layout, pulled.local_name())
        assert await runtime.has_image(pulled.local_name())
        await runtime.start(InstanceSpec("hello", pulled.local_name(), ()))
        await wait_exited(runtime, "hello", 60)
        assert "hello from the registry" in await runtime.logs("hello", 10)
    finally:
        await runtime.purge()


async def test_pull_by_digest_and_again_downloads_nothing(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    digest = images.digests["app"]
    ref = parse_reference(f"{images.host}/lab/app@{digest}")
    first = await pull(client(session, images), ref, store, HOST_PLATFORM)
    assert first.reference.digest == digest and first.manifest_digest == digest
    assert first.fetched_bytes > 0
    again = await pull(client(session, images), ref, store, HOST_PLATFORM)
    assert again.fetched_bytes == 0
    assert again.reused_bytes == first.fetched_bytes


async def test_shared_base_layer_is_stored_once(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    registry = client(session, images)
    base = await pull(registry, parse_reference(f"{images.host}/lab/base:1"), store, HOST_PLATFORM)
    app = await pull(registry, parse_reference(f"{images.host}/lab/app:1"), store, HOST_PLATFORM)

    (base_layer,) = base.manifest.layers
    assert app.manifest.layers[0] == base_layer  # the registry serves one layer to both
    assert app.reused_bytes == base_layer.size  # ... and this host fetched it once
    assert app.fetched_bytes == app.manifest.config.size + app.manifest.layers[1].size
    every = {d for image in (base, app) for d in (image.manifest_digest,)}
    every |= {b.digest for image in (base, app) for b in image.manifest.blobs()}
    assert stored(store) == every  # one file per distinct blob, nothing else
    assert store.path(base_layer.digest).stat().st_nlink == 1


async def test_unknown_digest_is_not_found(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{images.host}/lab/app@sha256:{'0' * 64}")
    with pytest.raises(NotFound, match="MANIFEST_UNKNOWN"):
        await pull(client(session, images), ref, store, HOST_PLATFORM)
    with pytest.raises(NotFound):
        await pull(
            client(session, images),
            parse_reference(f"{images.host}/lab/nothing:1"),
            store,
            HOST_PLATFORM,
        )
    assert stored(store) == set()


async def test_corrupted_layer_is_refused_and_not_kept(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    registry = client(session, images)
    ref = parse_reference(f"{images.host}/lab/victim:1")
    resolved = await registry.resolve(ref, HOST_PLATFORM)
    own_layer = resolved.manifest.layers[-1]  # victim's alone: the others share the rest
    data = images.storage_blob(own_layer.digest)
    original = data.read_bytes()
    # Same size, other bytes: the registry serves them under the layer's digest.
    data.write_bytes(bytes(b ^ 0xFF for b in original))
    try:
        with pytest.raises(DigestMismatch, match=own_layer.digest):
            await pull(registry, ref, store, HOST_PLATFORM)
    finally:
        data.write_bytes(original)
    assert not store.has(own_layer.digest)
    assert list((tmp_path / "store" / "partial").iterdir()) == []
    pulled = await pull(registry, ref, store, HOST_PLATFORM)  # intact again: accepted
    assert store.has(own_layer.digest) and pulled.reused_bytes > 0


async def test_bad_or_missing_credentials_are_a_clear_error(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{images.host}/lab/app:1")
    with pytest.raises(RegistryAuthError, match="refused the credentials") as wrong:
        await pull(client(session, images, Credentials(USER, "wrong")), ref, store, HOST_PLATFORM)
    assert wrong.value.code == "registry_auth"
    with pytest.raises(RegistryAuthError, match="needs credentials"):
        await pull(client(session, images, None), ref, store, HOST_PLATFORM)
    assert "wrong" not in repr(Credentials(USER, "wrong"))
    assert stored(store) == set()
    await client(session, images).ping()  # and the right ones are accepted


async def test_manifest_list_gives_this_hosts_platform(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    registry = client(session, images)
    ref = parse_reference(f"{images.host}/lab/multi:1")
    app = await registry.resolve(parse_reference(f"{images.host}/lab/app:1"), HOST_PLATFORM)
    base = await registry.resolve(parse_reference(f"{images.host}/lab/base:1"), HOST_PLATFORM)

    here = await pull(registry, ref, store, HOST_PLATFORM)
    assert here.reference.digest == images.digests["multi"]  # pinned to the list
    assert here.manifest_digest != here.reference.digest
    assert here.manifest.config == app.manifest.config
    elsewhere = await pull(registry, ref, store, OTHER_PLATFORM)
    assert elsewhere.reference.digest == images.digests["multi"]
    assert elsewhere.manifest.config == base.manifest.config
    with pytest.raises(NoMatchingPlatform, match="windows/amd64"):
        await registry.resolve(ref, type(HOST_PLATFORM)("windows", "amd64"))


async def test_concurrent_pulls_of_one_image_agree(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{images.host}/lab/app:1")
    results = await asyncio.gather(
        *(pull(client(session, images), ref, store, HOST_PLATFORM) for _ in range(3))
    )
    assert {r.reference.digest for r in results} == {images.digests["app"]}
    assert list((tmp_path / "store" / "partial").iterdir()) == []


@pytest.fixture
async def token_registry(
    images: PushedImages, tmp_path: Path
) -> AsyncIterator[tuple[str, TokenService]]:
    """A second registry on the same storage, with Bearer token auth from a token service."""
    tokens = TokenService(USER, PASSWORD)
    runner = web.AppRunner(tokens.app())
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    auth = TokenAuth(
        f"http://127.0.0.1:{port}/token", SERVICE, ISSUER, tokens.write_cert(tmp_path / "ca.pem")
    )
    storage = images.registry.storage
    registry = LabRegistry(
        tmp_path / "token-registry", f"127.0.0.1:{free_port()}", {}, token=auth, storage=storage
    )
    try:
        await asyncio.to_thread(registry.start)
        yield registry.host, tokens
    finally:
        await asyncio.to_thread(registry.stop)
        await runner.cleanup()


async def test_bearer_token_flow_against_a_token_registry(
    token_registry: tuple[str, TokenService], session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    host, tokens = token_registry
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{host}/lab/app:1")
    registry = RegistryClient(session, host, GOOD, plain_http=True)
    pulled = await pull(registry, ref, store, HOST_PLATFORM)
    assert store.has(pulled.manifest.layers[-1].digest)
    # One token for the repository, asked with the credentials, reused for every blob.
    assert tokens.requests == [
        {"scope": "repository:lab/app:pull", "service": SERVICE, "authorization": "Basic "}
    ]

    for creds, message in ((Credentials(USER, "wrong"), "refused"), (None, "refused")):
        with pytest.raises(RegistryAuthError, match=message):
            await RegistryClient(session, host, creds, plain_http=True).resolve(ref, HOST_PLATFORM)
    # A token service reached over plain HTTP is refused unless the registry is plain HTTP too.
    with pytest.raises(RegistryAuthError, match="over HTTP"):
        await RegistryClient(session, host, GOOD)._fetch_token(
            {"realm": "http://127.0.0.1:1/token"}, "lab/app"
        )


class CuttingProxy:
    """A TCP proxy to the registry that breaks the first connection whose answers pass
    ``cut_after`` bytes: a flaky uplink, once."""

    def __init__(self, target: str, cut_after: int) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.cut_after = cut_after
        self.cuts = 0
        self.ranges: list[bytes] = []
        self._server: asyncio.Server | None = None

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        upstream_r, upstream_w = await asyncio.open_connection(*self.target)

        async def up() -> None:
            while data := await client_r.read(65536):
                self.ranges += [line for line in data.split(b"\r\n") if line.startswith(b"Range")]
                upstream_w.write(data)
                await upstream_w.drain()

        async def down() -> None:
            sent = 0
            while data := await upstream_r.read(65536):
                if self.cuts == 0 and sent + len(data) > self.cut_after:
                    self.cuts += 1
                    client_w.write(data[: self.cut_after - sent])
                    await client_w.drain()
                    return
                sent += len(data)
                client_w.write(data)
                await client_w.drain()

        tasks = [asyncio.ensure_future(up()), asyncio.ensure_future(down())]
        try:
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in tasks:
                task.cancel()
            for writer in (client_w, upstream_w):
                writer.close()


async def test_a_broken_layer_download_resumes_where_it_stopped(
    images: PushedImages, tmp_path: Path
) -> None:
    proxy = CuttingProxy(images.host, cut_after=300_000)
    address = await proxy.start()
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{address}/lab/base:1")
    try:
        # A session of its own: a broken connection is not reused.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as http:
            registry = RegistryClient(http, address, GOOD, plain_http=True)
            with pytest.raises(RegistryUnavailable):
                await pull(registry, ref, store, HOST_PLATFORM)
            (layer,) = (await registry.resolve(ref, HOST_PLATFORM)).manifest.layers
            assert not store.has(layer.digest)
            kept = (tmp_path / "store" / "partial" / layer.digest.removeprefix("sha256:")).stat()
            assert 0 < kept.st_size < layer.size
            pulled = await pull(registry, ref, store, HOST_PLATFORM)
    finally:
        await proxy.stop()
    assert proxy.cuts == 1 and store.has(layer.digest)
    assert proxy.ranges == [f"Range: bytes={kept.st_size}-".encode()]
    assert pulled.fetched_bytes == layer.size - kept.st_size  # the config came the first time


async def test_an_image_over_the_size_limit_is_refused_before_any_blob(
    images: PushedImages, session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    store = BlobStore(tmp_path / "store")
    ref = parse_reference(f"{images.host}/lab/app:1")
    with pytest.raises(ImageTooLarge, match="limited to 100000 B") as caught:
        await pull(client(session, images), ref, store, HOST_PLATFORM, max_bytes=100_000)
    assert caught.value.code == "too_large"
    assert stored(store) == set()
