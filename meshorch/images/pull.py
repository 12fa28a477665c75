"""Pulling an image from a registry into the host's blob store, and handing it to podman.

Every blob (manifest, config, each layer) is kept once per host in the
content-addressed :class:`BlobStore`, whatever image it came with: an image sharing
a base layer with one already here downloads only what it adds. To run it, the
image is laid out as an OCI image layout directory whose blobs are hard links into
the store (no copy) and loaded by the runtime (``podman load``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import orjson

from meshorch.images.oci import (
    OCI_INDEX,
    BadManifest,
    Descriptor,
    Manifest,
    Platform,
    parse_document,
)
from meshorch.images.reference import ImageReference
from meshorch.images.registry import RegistryClient, RegistryError, ResolvedImage
from meshorch.images.store import BlobStore

logger = logging.getLogger(__name__)

REF_NAME_ANNOTATION = "org.opencontainers.image.ref.name"
MAX_IMAGE_BYTES = 8 << 30  # all of an image's blobs, as for an uploaded archive


class ImageTooLarge(RegistryError):
    def __init__(self, message: str) -> None:
        super().__init__(message, "too_large")


@dataclass(frozen=True)
class PulledImage:
    reference: ImageReference  # pinned: ``reference.digest`` is what was resolved
    manifest_digest: str  # this platform's manifest
    manifest: Manifest
    documents: tuple[tuple[str, int], ...]  # (digest, size) of the index and the manifest
    fetched_bytes: int  # downloaded now
    reused_bytes: int  # already in the store (shared layers, an earlier pull)

    def local_name(self) -> str:
        """The name podman knows the image by: the tag as written, else the digest."""
        ref = self.reference
        digest = ref.digest or self.manifest_digest
        return f"{ref.name}:{ref.tag or digest.replace(':', '-')}"

    def blob_sizes(self) -> tuple[tuple[str, int], ...]:
        """(digest, size) of every blob of the image: documents, config, layers."""
        return (*self.documents, *((b.digest, b.size) for b in self.manifest.blobs()))

    def to_json(self) -> dict[str, object]:
        return {
            "reference": self.reference.canonical(),
            "digest": self.reference.digest,
            "manifest_digest": self.manifest_digest,
            "layers": [layer.digest for layer in self.manifest.layers],
            "size": sum(b.size for b in self.manifest.blobs()),
            "fetched_bytes": self.fetched_bytes,
            "reused_bytes": self.reused_bytes,
        }


async def pull(
    client: RegistryClient,
    ref: ImageReference,
    store: BlobStore,
    platform: Platform,
    max_bytes: int = MAX_IMAGE_BYTES,
    *,
    on_resolved: Callable[[ResolvedImage], Awaitable[None]] | None = None,
    before_blob: Callable[[Descriptor], Awaitable[None]] | None = None,
) -> PulledImage:
    """Resolve ``ref`` (a tag once, to a digest) and fetch the blobs ``store`` lacks.
    An image whose blobs add up to more than ``max_bytes`` is refused before any is
    fetched (each blob is then held to the size its manifest declares).
    ``on_resolved`` is awaited once the manifest is known, before any blob is fetched;
    ``before_blob`` before each blob is asked of the registry (to get it, or its start,
    from elsewhere: the registry is then asked for the rest only)."""
    resolved: ResolvedImage = await client.resolve(ref, platform)
    total = sum(blob.size for blob in resolved.manifest.blobs())
    if total > max_bytes:
        raise ImageTooLarge(f"{ref.canonical()} is {total} B; images are limited to {max_bytes} B")
    for digest, raw in resolved.documents:
        await store.add_bytes(raw, expected_digest=digest)
    if on_resolved is not None:
        await on_resolved(resolved)
    fetched = reused = 0
    for blob in resolved.manifest.blobs():
        if before_blob is not None and not store.has(blob.digest):
            await before_blob(blob)
        got = await client.fetch_blob(ref.repository, blob, store)
        fetched += got
        reused += blob.size if got == 0 else 0
    logger.info(
        "pulled %s: %d B fetched, %d B already here",
        resolved.reference.canonical(),
        fetched,
        reused,
    )
    return PulledImage(
        resolved.reference,
        resolved.manifest_digest,
        resolved.manifest,
        tuple((digest, len(raw)) for digest, raw in resolved.documents),
        fetched,
        reused,
    )


async def write_oci_layout(
    store: BlobStore, manifest_digest: str, name: str, directory: Path
) -> Path:
    """An OCI image layout in ``directory`` (replaced) of the image whose manifest is
    ``manifest_digest`` in ``store``, named ``name``; its blobs are hard links into the store."""
    await asyncio.to_thread(_write_layout, store, manifest_digest, name, directory)
    return directory


def _write_layout(store: BlobStore, manifest_digest: str, name: str, directory: Path) -> None:
    raw = store.path(manifest_digest).read_bytes()
    manifest = parse_document(raw, "")
    if not isinstance(manifest, Manifest):
        raise BadManifest(f"{manifest_digest} is an index, not a manifest")
    shutil.rmtree(directory, ignore_errors=True)
    blobs = directory / "blobs" / "sha256"
    blobs.mkdir(parents=True)
    for digest in (manifest_digest, *(b.digest for b in manifest.blobs())):
        target = blobs / digest.removeprefix("sha256:")
        if target.exists():
            continue
        try:
            os.link(store.path(digest), target)
        except OSError:  # another file system: a copy, removed with the layout
            shutil.copyfile(store.path(digest), target)
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            {
                "mediaType": manifest.media_type,
                "digest": manifest_digest,
                "size": len(raw),
                "annotations": {REF_NAME_ANNOTATION: name},
            }
        ],
    }
    (directory / "oci-layout").write_bytes(orjson.dumps({"imageLayoutVersion": "1.0.0"}))
    (directory / "index.json").write_bytes(orjson.dumps(index))
