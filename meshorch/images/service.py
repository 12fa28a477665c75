"""The agent's side of the site image store: uploads, the catalogue, peer copies."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import platform
import random
import time
from collections.abc import AsyncIterator, Mapping
from pathlib import Path

import aiohttp
import orjson

from meshorch.images import chain
from meshorch.images.follow import FollowSlots
from meshorch.images.oci import Descriptor, platform_of_machine
from meshorch.images.pull import PulledImage, write_oci_layout
from meshorch.images.pull import pull as pull_image
from meshorch.images.reference import parse_reference
from meshorch.images.registry import Credentials, RegistryClient, ResolvedImage
from meshorch.images.store import (
    HOLDER_PREFIX,
    IMAGE_PREFIX,
    OCI,
    PULLING_PREFIX,
    BlobStore,
    ImageManifest,
    ImageTransferError,
    PullInProgress,
    Signer,
    holder_key,
    idle_key,
    pulling_key,
)
from meshorch.images.swarm import fetch_from_swarm
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import APPS_TABLE, MemberRecord
from raft import Delete, Put
from raft.errors import OutcomeUnknownError, ProposalError

logger = logging.getLogger(__name__)

MAX_IMAGE_BYTES = 8 << 30
SYNC_INTERVAL_S = 0.5


class SiteImages:
    """Keeps every image of the site's catalogue on this host, copied from site peers.

    The counters are added to after a copy returns, never with ``+= await``: that reads
    the counter before the await, and a copy finishing meanwhile (the reconciler's, the
    sync loop's) would be overwritten."""

    def __init__(
        self,
        root: Path,
        host_id: str,
        site: SiteState,
        members: Members,
        sign: Signer | None = None,
    ) -> None:
        self.blobs = BlobStore(root)
        self.host_id = host_id
        self.site = site
        self.members = members
        self.sign = sign  # proves this host to the peers it copies from
        self.uploaded_bytes = 0
        self.fetched_bytes = 0
        self.pulled_bytes = 0  # from registries
        self.swarm_bytes = 0  # of fetched_bytes, those fetched in pieces from several peers
        self.followed_bytes = 0  # sent to peers following a blob as it arrived here
        self.removed_bytes = 0  # by garbage collection (meshorch.apps.image_gc)
        self.evicted_images = 0  # copies given up under disk pressure
        self.platform = platform_of_machine(platform.machine())
        self._wake = asyncio.Event()
        # Images this host gave up under disk pressure: the sync loop does not copy them
        # back (an instance placed here still has them copied, by ``ensure``).
        self.evicted: set[str] = set()
        self.pulls_running = 0  # a pull's blobs are stored before its record: not orphans
        self.follows = FollowSlots()  # peers following a blob here (``?follow=``)

    def counters(self) -> dict[str, int]:
        return {
            "uploaded_bytes": self.uploaded_bytes,
            "fetched_bytes": self.fetched_bytes,
            "pulled_bytes": self.pulled_bytes,
            "swarm_bytes": self.swarm_bytes,
            "followed_bytes": self.followed_bytes,
            "removed_bytes": self.removed_bytes,
            "evicted_images": self.evicted_images,
        }

    async def add_upload(self, ref: str, chunks: AsyncIterator[bytes]) -> ImageManifest:
        """An image entering the site from outside: store it, then name it in the state."""
        digest, size = await self.blobs.add_stream(chunks, MAX_IMAGE_BYTES)
        self.uploaded_bytes += size
        manifest = ImageManifest(ref, digest, size, self.host_id, time.time())
        ops = [
            Put(APPS_TABLE, manifest.key(), manifest.encode()),
            Put(APPS_TABLE, holder_key(digest, self.host_id), b""),
        ]
        try:
            await self.site.propose(ops, idempotent=True)
        except OutcomeUnknownError as exc:
            # The leader changed while the record was in flight. Once a barrier of the
            # new leader is applied here, the state says whether it was committed; if
            # not it never will be, and sending it again gives the uploader an answer.
            logger.info("image %s: record of unknown outcome (%s); checking", ref, exc)
            await self.site.barrier()
            if self._recorded(manifest) is None:
                await self.site.propose(ops, idempotent=True)
        logger.info("image %s (%s, %d bytes) added", ref, digest, size)
        self._wake.set()
        return manifest

    def _recorded(self, manifest: ImageManifest) -> ImageManifest | None:
        """``manifest`` as the state holds it, with this host a holder; None if not."""
        record = self.site.view.get(APPS_TABLE, manifest.key())
        if record is None or self.host_id not in self.holders(manifest.digest):
            return None
        held = ImageManifest.decode(record.value)
        return held if held == manifest else None

    def manifests(self) -> list[ImageManifest]:
        records, _ = self.site.view.scan(APPS_TABLE, IMAGE_PREFIX, 100_000)
        return [ImageManifest.decode(r.value) for _, r in records]

    def find(self, ref: str, tenant: str | None = None) -> ImageManifest | None:
        """The catalogue's image named ``ref`` (one read, not a scan); with ``tenant``,
        only if that tenant's apps may run it (not pulled with another tenant's secret)."""
        record = self.site.view.get(APPS_TABLE, IMAGE_PREFIX + ref.encode())
        manifest = None if record is None else ImageManifest.decode(record.value)
        if manifest is not None and tenant is not None and not manifest.usable_by(tenant):
            return None
        return manifest

    def holders(self, digest: str) -> list[str]:
        prefix = HOLDER_PREFIX + f"{digest}/".encode()
        records, _ = self.site.view.scan(APPS_TABLE, prefix, 100_000)
        return [key[len(prefix) :].decode() for key, _ in records]

    def catalog(self) -> list[dict[str, object]]:
        """The catalogue, with each image's holders and, when no app names it, since when
        (``idle_since``: garbage collection removes it after the grace period)."""
        answer = []
        for m in self.manifests():
            entry = {**m.to_json(), "holders": self.holders(m.digest)}
            idle = self.site.view.get(APPS_TABLE, idle_key(m.ref))
            if idle is not None:
                entry["idle_since"] = orjson.loads(idle.value)
            answer.append(entry)
        return answer

    def blob_url(self, member: MemberRecord, digest: str) -> str:
        # Over the overlay when there is one: encrypted and inside the site.
        host = member.overlay_ip or (member.api or "").rpartition(":")[0]
        port = (member.api or "").rpartition(":")[2]
        return f"http://{host}:{port}/v1/images/blobs/{digest}"

    async def pull(
        self,
        session: aiohttp.ClientSession,
        text: str,
        credentials: Credentials | None = None,
        *,
        plain_http: bool = False,
        tenant: str = "",
        pinned: bool = False,
        resolve: str | None = None,
    ) -> tuple[ImageManifest, PulledImage]:
        """Pull ``text`` (a reference as users write it) from its registry into this host's
        store and name it in the catalogue, pinned to the digest its tag has now: the other
        hosts copy that digest from their peers, never the tag from the registry.
        ``tenant``: pulled with that tenant's credentials, for its apps only; ``pinned``:
        kept by garbage collection even when no app names it; ``resolve``: the reference
        to resolve instead of ``text`` (a pull taken over: the digest the first puller
        resolved).

        Once the manifest is known the pull is recorded in the state (``PullInProgress``):
        the other hosts copy each blob as it arrives, so a host taking the pull over gets
        from them what was fetched and asks the registry for the rest only."""
        ref = parse_reference(resolve or text)
        client = RegistryClient(session, ref.api_host, credentials, plain_http=plain_http)

        async def announce(resolved: ResolvedImage) -> None:
            blobs = (
                *((d, len(raw)) for d, raw in resolved.documents),
                *((b.digest, b.size) for b in resolved.manifest.blobs()),
            )
            record = PullInProgress(
                text, self.host_id, resolved.reference.pinned(), blobs, tenant, pinned
            )
            await self.site.propose([Put(APPS_TABLE, record.key(), record.encode())])
            self._wake.set()

        async def from_peers(blob: Descriptor) -> None:
            copied = await self._copy_partial(session, blob.digest, blob.size)
            self.fetched_bytes += copied

        self.pulls_running += 1
        try:
            pulled = await pull_image(
                client,
                ref,
                self.blobs,
                self.platform,
                on_resolved=announce,
                before_blob=None if resolve is None else from_peers,
            )
            self.pulled_bytes += pulled.fetched_bytes
            return await self._record_pull(text, pulled, tenant, pinned)
        except Exception:
            # Failed here, not dead: say so, or the leader would wait for this host forever.
            try:
                await self._forget_pull(text)
            except Exception as exc:  # the pull's own error is the one to report
                logger.warning("the record of the failed pull of %s stays: %s", text, exc)
            raise
        finally:
            self.pulls_running -= 1

    async def _forget_own_pulls(self) -> None:
        """At start: pulls recorded as this host's were cut short by its stop (a pull
        does not outlive the agent); left recorded, no other host would take them over."""
        for _ in range(60):
            try:
                for ref, record in self.pulls_in_progress().items():
                    if record.host == self.host_id:
                        await self._forget_pull(ref)
                return
            except ProposalError as exc:  # no leader yet
                logger.debug("stale pulls not forgotten yet: %s", exc)
                await asyncio.sleep(1.0)

    async def _forget_pull(self, ref: str) -> None:
        record = self.pulls_in_progress().get(ref)
        if record is None or record.host != self.host_id:
            return
        await self.site.propose([Delete(APPS_TABLE, pulling_key(ref))], idempotent=True)

    def partial_url(self, member: MemberRecord, digest: str) -> str:
        return self.blob_url(member, digest).replace("/v1/images/blobs/", "/v1/images/partials/")

    def follow_url(self, member: MemberRecord, digest: str, size: int) -> str:
        """The blob as ``member`` receives it (served while it arrives, up to ``size``)."""
        return f"{self.partial_url(member, digest)}?follow={size}"

    def _chain_urls(
        self, origin: str, digest: str, size: int, members: Mapping[str, MemberRecord]
    ) -> list[str]:
        """Where this host follows ``digest`` in the chain of the live hosts that starts at
        ``origin`` (where it entered the site): its predecessor, then the hosts before it.
        Empty for the origin itself, or when the origin is not live."""
        live = self.members.reachable_hosts() & members.keys()
        order = chain.sources(origin, live, self.host_id)
        if order is None or origin not in live:
            return []
        return [self.follow_url(members[h], digest, size) for h in order.in_order()]

    def declared_size(self, digest: str) -> tuple[int, bool] | None:
        """The size the site's records give ``digest`` (a pull under way, else the
        catalogue), and whether this host is getting it (not only in images it gave up);
        None when none names it."""
        for record in self.pulls_in_progress().values():
            for named, size in record.blobs:
                if named == digest:
                    return size, True
        found = None
        for manifest in self.manifests():
            for named, size in manifest.blob_sizes():
                if named == digest:
                    if manifest.digest not in self.evicted:
                        return size, True
                    found = size, False
        return found

    def pulls_in_progress(self) -> dict[str, PullInProgress]:
        records, _ = self.site.view.scan(APPS_TABLE, PULLING_PREFIX, 100_000)
        return {r.ref: r for r in (PullInProgress.decode(v.value) for _, v in records)}

    async def _copy_partial(self, session: aiohttp.ClientSession, digest: str, size: int) -> int:
        """Copy what peers have of ``digest`` (whole or in part, kept as a partial file).
        Returns the bytes copied; never raises for a peer that has less, or nothing."""
        copied = 0
        for member in self.members.members():
            if member.host_id == self.host_id:
                continue
            url = self.partial_url(member, digest)
            try:
                copied += await self.blobs.fetch(session, [url], digest, size, self.sign)
            except ImageTransferError as exc:
                copied += exc.fetched
            if self.blobs.has(digest):
                break
        return copied

    async def follow_pulls(self, session: aiohttp.ClientSession) -> None:
        """Copy the blobs of the pulls under way as they arrive, each from this host's
        predecessor in the pull's chain (``meshorch.images.chain``) while the predecessor
        still receives it; from the hosts before it when it breaks off or stalls. What
        arrives is kept as a partial file, which this host's successor follows."""
        members = {m.host_id: m for m in self.members.members()}
        for record in self.pulls_in_progress().values():
            # In the order the puller fetches them: the chain is busy with the first blob
            # not whole here; the next ones are followed once it is.
            for digest, size in record.blobs:
                if not self.blobs.has(digest):
                    urls = self._chain_urls(record.host, digest, size, members)
                    if not urls:
                        break  # this host pulls it, or the puller is gone
                    try:
                        copied = await self.blobs.fetch(session, urls, digest, size, self.sign)
                    except ImageTransferError as exc:
                        copied = exc.fetched
                        logger.info("%s not followed yet: %s", digest, exc)
                    self.fetched_bytes += copied
                    if not self.blobs.has(digest):
                        break

    async def _record_pull(
        self, text: str, pulled: PulledImage, tenant: str, pinned: bool
    ) -> tuple[ImageManifest, PulledImage]:
        blobs = pulled.blob_sizes()
        source = pulled.reference.pinned()
        manifest = ImageManifest(
            text,
            pulled.reference.digest or pulled.manifest_digest,
            sum(size for _, size in blobs),
            self.host_id,
            time.time(),
            OCI,
            source,
            pulled.manifest_digest,
            blobs,
            tenant,
            pinned,
        )
        await self.site.propose(
            [
                Put(APPS_TABLE, manifest.key(), manifest.encode()),
                Put(APPS_TABLE, holder_key(manifest.digest, self.host_id), b""),
                Delete(APPS_TABLE, pulling_key(text)),
            ],
            idempotent=True,
        )
        logger.info("image %s pulled as %s", text, source)
        self._wake.set()
        return manifest, pulled

    async def oci_layout(self, manifest: ImageManifest) -> Path:
        """A pulled image as an OCI layout the runtime loads (blobs linked, not copied)."""
        directory = self.blobs.root / "layouts" / manifest.digest.removeprefix("sha256:")
        return await write_oci_layout(
            self.blobs, manifest.manifest_digest, manifest.runtime_name(), directory
        )

    async def ensure(self, session: aiohttp.ClientSession, manifest: ImageManifest) -> None:
        """Have ``manifest``'s blobs here (copied from peers) and say so in the state."""
        missing = [(d, n) for d, n in manifest.blob_sizes() if not self.blobs.has(d)]
        if missing:
            members = {m.host_id: m for m in self.members.members()}
            holders = [h for h in self.holders(manifest.digest) if h in members]
            random.shuffle(holders)  # spread the load over every host that has it
            for digest, size in missing:
                urls = [self.blob_url(members[h], digest) for h in holders if h != self.host_id]
                swarm = await fetch_from_swarm(self.blobs, session, urls, digest, size, self.sign)
                if swarm is not None:
                    self.fetched_bytes += swarm.fetched
                    self.swarm_bytes += swarm.fetched
                    continue
                if len(urls) < 2:
                    # Still spreading from the host it entered at: along the chain, as
                    # during the pull (a registry faster than the overlay ends it first).
                    chained = self._chain_urls(manifest.added_by, digest, size, members)
                    urls = [*chained, *urls]
                copied = await self.blobs.fetch(session, urls, digest, size, self.sign)
                self.fetched_bytes += copied
            logger.info("copied image %s from a site peer", manifest.ref)
        if self.host_id not in self.holders(manifest.digest):
            await self.site.propose(
                [Put(APPS_TABLE, holder_key(manifest.digest, self.host_id), b"")], idempotent=True
            )

    async def run(self) -> None:
        """Background loop: copy every catalogued image this host does not have yet."""
        # A peer that does not answer its connection is given up on (the next is asked).
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=30)
        await self._forget_own_pulls()
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                try:
                    await self.follow_pulls(session)
                except Exception:
                    logger.exception("following image pulls failed")
                for manifest in self.manifests():
                    if manifest.digest in self.evicted:
                        continue
                    try:
                        await self.ensure(session, manifest)
                    except (ImageTransferError, OSError) as exc:
                        logger.warning("image %s not copied yet: %s", manifest.ref, exc)
                    except Exception:
                        logger.exception("image sync of %s failed", manifest.ref)
                self._wake.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(SYNC_INTERVAL_S):
                        await self._wake.wait()
