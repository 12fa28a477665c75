"""The site image store: content-addressed image archives, copied between hosts.

Each host keeps archives under ``blobs/sha256/<hex>``; the replicated state
names them (``image/<ref>`` -> digest, size) and records which hosts hold
each blob (``holder/<digest>/<host>``). An image enters the site once, at
one host (``meshorch image add``); every other host copies it from a host
that holds it, over the site's network, in chunks, resuming where a broken
transfer stopped and verifying the sha256 before the blob becomes visible.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import re
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

import aiohttp
import orjson

from meshorch.errors import MeshorchError, RemoteInputError

# Headers proving this host to a peer, for a method and path with its query
# (``PeerSigner.headers``).
Signer = Callable[[str, str], Mapping[str, str]]


def signed_target(url: str) -> str:
    """What a peer request's signature covers of ``url``: the path and the query, as the
    receiving host reads them (``request.path_qs``), so neither can be altered on the way."""
    parts = urlsplit(url)
    return f"{parts.path}?{parts.query}" if parts.query else parts.path


logger = logging.getLogger(__name__)

CHUNK_BYTES = 1 << 20
IMAGE_PREFIX = b"image/"
HOLDER_PREFIX = b"holder/"
_DIGEST_RE = re.compile(r"^sha256:[0-9a-f]{64}$")
_REF_RE = re.compile(r"^[a-z0-9][a-z0-9._/-]{0,127}(:[A-Za-z0-9._-]{1,64})?$")


class ImageTransferError(MeshorchError):
    """A blob could not be fetched from any holder, or did not match its digest.
    ``corrupt``: some source sent content that is not the blob (not merely broke off)."""

    def __init__(self, message: str, corrupt: bool = False, fetched: int = 0) -> None:
        super().__init__(message)
        self.corrupt = corrupt
        self.fetched = fetched  # bytes received (and kept, to resume) before it failed


class BlobDigestMismatch(RemoteInputError):
    """Content whose sha256 is not the digest it was asked for, or announced as."""

    def __init__(self, expected: str, actual: str) -> None:
        super().__init__("digest_mismatch", f"content is {actual}, expected {expected}")
        self.expected = expected
        self.actual = actual


def validate_digest(digest: str) -> str:
    if not _DIGEST_RE.match(digest):
        raise RemoteInputError("bad_digest", f"{digest!r} is not sha256:<64 hex>")
    return digest


def validate_ref(ref: str) -> str:
    if not _REF_RE.match(ref):
        raise RemoteInputError("bad_ref", f"image reference {ref!r} is not like name[:tag]")
    return ref


ARCHIVE = "archive"  # one blob: an archive ``podman load`` reads, or a rootfs tarball
OCI = "oci"  # pulled from a registry: a manifest (and an index) and its blobs


@dataclass(frozen=True)
class ImageManifest:
    """An image of the site's catalogue, under the reference users name it by.

    An archive is the one blob ``digest``. A pulled image (``kind`` ``oci``) is pinned:
    ``digest`` is what its tag resolved to, once, at the host that pulled it (``source``
    is ``registry/repository@digest``); ``blobs`` are (digest, size) of its index and
    manifest documents, config and layers, each copied to the other hosts from peers,
    so every host runs the same bytes. ``size`` is the sum of the blobs.
    """

    ref: str
    digest: str
    size: int
    added_by: str
    added_at: float
    kind: str = ARCHIVE
    source: str = ""
    manifest_digest: str = ""
    blobs: tuple[tuple[str, int], ...] = ()
    # Pulled with a tenant's credentials: that tenant's apps alone run it ("": any app).
    tenant: str = ""
    # Kept whether or not an app names it (garbage collection never removes it).
    pinned: bool = False

    def usable_by(self, tenant: str) -> bool:
        return self.tenant in ("", tenant)

    def key(self) -> bytes:
        return IMAGE_PREFIX + self.ref.encode()

    def encode(self) -> bytes:
        return orjson.dumps({"v": 2, **self.to_json()})

    def runtime_name(self) -> str:
        """The name the runtime knows this image by. A pulled image's names its digest, so a
        host that loaded an earlier digest of the same tag does not take it for this one."""
        if self.kind != OCI:
            return self.ref
        name = self.source.partition("@")[0] or self.ref
        return f"{name}:{self.digest.replace(':', '-')}"

    def blob_sizes(self) -> tuple[tuple[str, int], ...]:
        """Every blob a host needs for this image."""
        return self.blobs if self.kind == OCI else ((self.digest, self.size),)

    def to_json(self) -> dict[str, object]:
        data: dict[str, object] = {
            "ref": self.ref,
            "digest": self.digest,
            "size": self.size,
            "added_by": self.added_by,
            "added_at": self.added_at,
            "kind": self.kind,
        }
        if self.kind == OCI:
            data["source"] = self.source
            data["manifest_digest"] = self.manifest_digest
            data["blobs"] = [list(b) for b in self.blobs]
        if self.tenant:
            data["tenant"] = self.tenant
        if self.pinned:
            data["pinned"] = True
        return data

    @staticmethod
    def decode(raw: bytes) -> ImageManifest:
        data = orjson.loads(raw)
        return ImageManifest(
            str(data["ref"]),
            str(data["digest"]),
            int(data["size"]),
            str(data["added_by"]),
            float(data["added_at"]),
            str(data.get("kind", ARCHIVE)),  # version 1 records are archives
            str(data.get("source", "")),
            str(data.get("manifest_digest", "")),
            tuple((str(d), int(n)) for d, n in data.get("blobs", ())),
            str(data.get("tenant", "")),
            data.get("pinned") is True,
        )


PULLING_PREFIX = b"imagepull/"  # imagepull/<ref> -> PullInProgress: who pulls it, what


@dataclass(frozen=True)
class PullInProgress:
    """A registry pull under way at ``host``: ``source`` pins what it resolved
    (``registry/repository@digest``), ``blobs`` what it fetches. The other hosts copy what
    it has fetched so far; if it dies, the leader resumes the pull from that digest."""

    ref: str
    host: str
    source: str
    blobs: tuple[tuple[str, int], ...]
    tenant: str = ""
    pinned: bool = False

    def key(self) -> bytes:
        return PULLING_PREFIX + self.ref.encode()

    def encode(self) -> bytes:
        return orjson.dumps(
            {"v": 1, "ref": self.ref, "host": self.host, "source": self.source,
             "blobs": [list(b) for b in self.blobs], "tenant": self.tenant,
             "pinned": self.pinned}
        )  # fmt: skip

    @staticmethod
    def decode(raw: bytes) -> PullInProgress:
        data = orjson.loads(raw)
        return PullInProgress(
            str(data["ref"]),
            str(data["host"]),
            str(data["source"]),
            tuple((str(d), int(n)) for d, n in data["blobs"]),
            str(data.get("tenant", "")),
            data.get("pinned") is True,
        )


def pulling_key(ref: str) -> bytes:
    return PULLING_PREFIX + ref.encode()


IDLE_PREFIX = b"imageidle/"  # imageidle/<ref> -> since when no app names it (wall clock)


def idle_key(ref: str) -> bytes:
    return IDLE_PREFIX + ref.encode()


def holder_key(digest: str, host_id: str) -> bytes:
    return HOLDER_PREFIX + f"{digest}/{host_id}".encode()


class BlobStore:
    """Content-addressed files of one host. Writes go through a temp file and a rename."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._blobs = root / "blobs" / "sha256"
        self._partial = root / "partial"
        self._blobs.mkdir(parents=True, exist_ok=True)
        self._partial.mkdir(parents=True, exist_ok=True)
        # One download per digest at a time: two would share the partial file, the second
        # truncating or overwriting it under the first, which verifies what it received
        # (not the file) and could publish a corrupt blob.
        self._fetching: dict[str, asyncio.Lock] = {}

    def path(self, digest: str) -> Path:
        return self._blobs / validate_digest(digest).removeprefix("sha256:")

    def has(self, digest: str) -> bool:
        return self.path(digest).exists()

    def partial_path(self, digest: str) -> Path:
        """Where ``digest`` is being fetched (its bytes so far)."""
        return self._partial / validate_digest(digest).removeprefix("sha256:")

    def digests(self) -> list[str]:
        return sorted(f"sha256:{p.name}" for p in self._blobs.iterdir())

    async def add_stream(self, chunks: AsyncIterator[bytes], limit_bytes: int) -> tuple[str, int]:
        """Store a stream; return (digest, size). Refuses more than ``limit_bytes``."""
        hasher = hashlib.sha256()
        size = 0
        temp = self._partial / f"upload-{os.getpid()}-{id(chunks)}"
        try:
            with open(temp, "wb") as handle:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit_bytes:
                        raise RemoteInputError(
                            "too_large", f"images are limited to {limit_bytes} B"
                        )
                    hasher.update(chunk)
                    await asyncio.to_thread(handle.write, chunk)
            digest = f"sha256:{hasher.hexdigest()}"
            os.replace(temp, self.path(digest))
            return digest, size
        finally:
            temp.unlink(missing_ok=True)

    async def add_bytes(self, data: bytes, expected_digest: str | None = None) -> str:
        """Store a small blob (a manifest, an index) held in memory; return its digest."""
        digest = f"sha256:{hashlib.sha256(data).hexdigest()}"
        if expected_digest is not None and digest != expected_digest:
            raise BlobDigestMismatch(expected_digest, digest)
        if not self.has(digest):
            temp = self._partial / f"bytes-{os.getpid()}-{id(data)}"
            await asyncio.to_thread(temp.write_bytes, data)
            os.replace(temp, self.path(digest))
        return digest

    async def add_file(self, source: Path) -> tuple[str, int]:
        async def read() -> AsyncIterator[bytes]:
            with open(source, "rb") as handle:
                while chunk := await asyncio.to_thread(handle.read, CHUNK_BYTES):
                    yield chunk

        return await self.add_stream(read(), limit_bytes=1 << 40)

    async def fetch(
        self,
        session: aiohttp.ClientSession,
        sources: Sequence[str],
        digest: str,
        size: int,
        sign: Signer | None = None,
    ) -> int:
        """Copy ``digest`` from the first source URL that serves it; return bytes fetched.
        ``sign(method, path)`` gives the headers that prove this host to its peers.

        A partial download is kept and resumed (HTTP Range) from the next source.
        Concurrent calls for one digest run one after the other (the later find it there).
        """
        async with self.lock(digest):
            return await self._fetch(session, sources, digest, size, sign)

    def lock(self, digest: str) -> asyncio.Lock:
        """Held while ``digest`` is fetched (kept after use: one small lock per blob)."""
        return self._fetching.setdefault(digest, asyncio.Lock())

    async def publish(self, path: Path, digest: str) -> None:
        """Make ``path`` the blob ``digest`` if its content is that; else delete it and
        raise :class:`ImageTransferError` (corrupt)."""
        actual = await asyncio.to_thread(_sha256_of, path)
        if actual != digest:
            path.unlink(missing_ok=True)
            raise ImageTransferError(f"content is {actual}, expected {digest}", True)
        os.replace(path, self.path(digest))

    async def _fetch(
        self,
        session: aiohttp.ClientSession,
        sources: Sequence[str],
        digest: str,
        size: int,
        sign: Signer | None,
    ) -> int:
        if self.has(digest):
            return 0
        partial = self.partial_path(digest)
        fetched = 0
        problems = []
        corrupt = False
        for url in sources:
            try:
                got, actual = await self._fetch_from(session, url, partial, size, sign)
                fetched += got
            except (aiohttp.ClientError, TimeoutError, OSError, ImageTransferError) as exc:
                problems.append(f"{url}: {exc}")
                if isinstance(exc, ImageTransferError):
                    corrupt = corrupt or exc.corrupt
                    fetched += exc.fetched
                continue
            if actual != digest:
                partial.unlink(missing_ok=True)
                problems.append(f"{url}: content does not match {digest}")
                corrupt = True
                continue
            os.replace(partial, self.path(digest))
            return fetched
        raise ImageTransferError(
            f"could not fetch {digest}: " + "; ".join(problems or ["no source"]), corrupt, fetched
        )

    async def _fetch_from(
        self,
        session: aiohttp.ClientSession,
        url: str,
        partial: Path,
        size: int,
        sign: Signer | None,
    ) -> tuple[int, str]:
        """Fetch what ``partial`` lacks; return (bytes fetched, sha256 of the whole)."""
        have = partial.stat().st_size if partial.exists() else 0
        if have > size:
            partial.unlink()
            have = 0
        headers = {"Range": f"bytes={have}-"} if 0 < have < size else {}
        if sign is not None:
            headers.update(sign("GET", signed_target(url)))
        hasher = hashlib.sha256()
        fetched = 0
        if have == size:
            return 0, await asyncio.to_thread(_sha256_of, partial)
        async with session.get(url, headers=headers) as response:
            if response.status not in (200, 206):
                raise ImageTransferError(f"HTTP {response.status}")
            if response.status == 200:
                have = 0  # the source ignored the range: start over
            elif have:
                # Hash the kept prefix once; the rest is hashed as it arrives.
                await asyncio.to_thread(_hash_prefix, hasher, partial, have)
            with open(partial, "r+b" if have else "wb") as handle:
                handle.seek(have)
                handle.truncate()
                async for chunk in response.content.iter_chunked(CHUNK_BYTES):
                    if have + fetched + len(chunk) > size:
                        partial.unlink(missing_ok=True)
                        raise ImageTransferError("more bytes than the manifest says", True)
                    hasher.update(chunk)
                    await asyncio.to_thread(_write_through, handle, chunk)
                    fetched += len(chunk)
        if have + fetched != size:
            raise ImageTransferError(
                f"transfer ended at {have + fetched} of {size} bytes", fetched=fetched
            )
        return fetched, f"sha256:{hasher.hexdigest()}"

    def local_blobs(self) -> dict[str, tuple[int, float]]:
        """Every blob here: digest -> (size, mtime)."""
        found = {}
        for path in self._blobs.iterdir():
            with contextlib.suppress(FileNotFoundError):
                stat = path.stat()
                found[f"sha256:{path.name}"] = (stat.st_size, stat.st_mtime)
        return found

    def remove(self, digest: str) -> int:
        """Delete a blob (if here); return the bytes freed. Not while it is being fetched:
        the caller checks ``fetching``."""
        path = self.path(digest)
        try:
            size = path.stat().st_size
            path.unlink()
        except FileNotFoundError:
            return 0
        return size

    def stale_partials(self, listed: set[str], older_than: float) -> list[Path]:
        """Partial files (``partial/<hex>``, ``<hex>.pieces``, uploads) of no ``listed``
        digest, last written before ``older_than``: transfers nobody will finish."""
        stale = []
        for path in self._partial.iterdir():
            digest = "sha256:" + path.name.split(".")[0]
            with contextlib.suppress(FileNotFoundError):
                if digest not in listed and path.stat().st_mtime < older_than:
                    stale.append(path)
        return stale

    def fetching(self) -> bool:
        return any(lock.locked() for lock in self._fetching.values())

    def remove_partials(self) -> None:
        for path in self._partial.iterdir():
            with contextlib.suppress(OSError):
                path.unlink()


def _write_through(handle: BinaryIO, chunk: bytes) -> None:
    """Write and flush: a peer may be following the file as it grows."""
    handle.write(chunk)
    handle.flush()


def _hash_prefix(hasher: Any, path: Path, length: int) -> None:
    with open(path, "rb") as handle:
        while length > 0 and (chunk := handle.read(min(CHUNK_BYTES, length))):
            hasher.update(chunk)
            length -= len(chunk)


def _sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(CHUNK_BYTES):
            hasher.update(chunk)
    return f"sha256:{hasher.hexdigest()}"
