"""A registry that misbehaves: what a real one never sends, served by a small aiohttp app
on loopback (the real registry's tests are in test_registry_pull.py). Each answer is a
clear error and nothing is kept."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import orjson
import pytest
from aiohttp import web

from meshorch.images.oci import OCI_MANIFEST, BadManifest, Platform
from meshorch.images.pull import pull
from meshorch.images.reference import parse_reference
from meshorch.images.registry import (
    Credentials,
    DigestMismatch,
    RegistryAuthError,
    RegistryClient,
    RegistryUnavailable,
)
from meshorch.images.store import BlobStore

HERE = Platform("linux", "amd64")
LAYER = b"layer bytes " * 1000
CONFIG = b'{"architecture": "amd64", "os": "linux"}'


def digest_of(data: bytes) -> str:
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def manifest_bytes(layer_size: int = len(LAYER)) -> bytes:
    return orjson.dumps({
        "schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                   "digest": digest_of(CONFIG), "size": len(CONFIG)},
        "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                    "digest": digest_of(LAYER), "size": layer_size}],
    })  # fmt: skip


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


async def serve(routes: dict[str, Handler]) -> tuple[web.AppRunner, str]:
    app = web.Application()
    for path, handler in routes.items():
        app.router.add_route("*", path, handler)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"127.0.0.1:{runner.addresses[0][1]}"


def fixed(body: bytes, status: int = 200, headers: dict[str, str] | None = None) -> Handler:
    async def handler(_request: web.Request) -> web.Response:
        return web.Response(body=body, status=status, headers=headers or {})

    return handler


def blobs(layer: bytes = LAYER) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        wanted = request.match_info["digest"]
        body = {digest_of(CONFIG): CONFIG, digest_of(LAYER): layer}.get(wanted)
        return web.Response(body=body, status=200 if body is not None else 404)

    return handler


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as http:
        yield http


async def attempt(
    session: aiohttp.ClientSession,
    routes: dict[str, Handler],
    tmp_path: Path,
    ref: str = "x/app:1",
    creds: Credentials | None = None,
) -> BlobStore:
    runner, address = await serve(routes)
    store = BlobStore(tmp_path / "store")
    try:
        client = RegistryClient(session, address, creds, plain_http=True)
        await pull(client, parse_reference(f"{address}/{ref}"), store, HERE)
    finally:
        await runner.cleanup()
    return store


MANIFEST_PATH = "/v2/x/app/manifests/{ref}"
BLOB_PATH = "/v2/x/app/blobs/{digest}"


async def test_an_honest_answer_is_pulled(session: aiohttp.ClientSession, tmp_path: Path) -> None:
    store = await attempt(
        session, {MANIFEST_PATH: fixed(manifest_bytes()), BLOB_PATH: blobs()}, tmp_path
    )
    assert store.has(digest_of(LAYER)) and store.has(digest_of(CONFIG))


@pytest.mark.parametrize(
    ("routes", "error", "message"),
    [
        (
            {MANIFEST_PATH: fixed(manifest_bytes(), headers={
                "Docker-Content-Digest": digest_of(b"other")})},
            DigestMismatch, "announced as",
        ),
        ({MANIFEST_PATH: fixed(b"{" + b" " * (5 << 20) + b"}")}, BadManifest, "larger than"),
        ({MANIFEST_PATH: fixed(b'{"schemaVersion": 1, "fsLayers": []}')}, BadManifest,
         "schemaVersion"),
        ({MANIFEST_PATH: fixed(b"<html>oops</html>")}, BadManifest, "not JSON"),
        ({MANIFEST_PATH: fixed(b"", status=503)}, RegistryUnavailable, "HTTP 503"),
        ({MANIFEST_PATH: fixed(b"", status=429)}, RegistryUnavailable, "HTTP 429"),
        (
            {MANIFEST_PATH: fixed(manifest_bytes()), BLOB_PATH: blobs(LAYER + b"more")},
            DigestMismatch, "other content",
        ),
        (
            {MANIFEST_PATH: fixed(manifest_bytes()), BLOB_PATH: blobs(b"x" * len(LAYER))},
            DigestMismatch, "other content",
        ),
        (
            {MANIFEST_PATH: fixed(b"", status=401, headers={
                "WWW-Authenticate": 'Negotiate realm="x"'})},
            RegistryAuthError, "does not speak",
        ),
    ],
)  # fmt: skip
async def test_misbehaviour_is_a_clear_error_and_nothing_is_kept(
    session: aiohttp.ClientSession,
    tmp_path: Path,
    routes: dict[str, Handler],
    error: type[Exception],
    message: str,
) -> None:
    with pytest.raises(error, match=message):
        await attempt(session, routes, tmp_path)
    store = BlobStore(tmp_path / "store")
    assert not store.has(digest_of(LAYER))
    assert list((tmp_path / "store" / "partial").iterdir()) == []


async def test_a_manifest_fetched_by_digest_must_be_that_digest(
    session: aiohttp.ClientSession, tmp_path: Path
) -> None:
    asked = digest_of(b"something else")
    with pytest.raises(DigestMismatch, match="sent content of"):
        await attempt(session, {MANIFEST_PATH: fixed(manifest_bytes())}, tmp_path,
                      ref=f"x/app@{asked}")  # fmt: skip


@pytest.mark.parametrize(
    "token_answer",
    [fixed(b"not json"), fixed(b'{"token": 5}'), fixed(b"{}"), fixed(b"", status=500),
     fixed(b'{"token": "' + b"t" * (70 << 10) + b'"}')],
)  # fmt: skip
async def test_a_token_service_that_answers_no_token_is_an_auth_error(
    session: aiohttp.ClientSession, tmp_path: Path, token_answer: Handler
) -> None:
    runner, address = await serve({"/token": token_answer})
    challenge = f'Bearer realm="http://{address}/token",service="reg"'
    try:
        with pytest.raises(RegistryAuthError):
            await attempt(
                session,
                {MANIFEST_PATH: fixed(b"", status=401, headers={"WWW-Authenticate": challenge})},
                tmp_path,
                creds=Credentials("u", "p"),
            )
    finally:
        await runner.cleanup()
