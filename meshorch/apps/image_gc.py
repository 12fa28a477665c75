"""Garbage collection of images at a site: the adapter of ``meshorch.images.gc``.

On every host, every ``TICK_S``: the Raft leader marks images no app names as idle and
drops those idle past the grace period from the catalogue (with their holder records);
every host then deletes the blobs no catalogued image lists, the runtime's images of
pulls no longer catalogued, and, over its limit (the image store's ``max_bytes``, or the
data dir's disk above ``evict_at_pct``), its copies of images it does not need.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import orjson

from meshorch.apps.records import (
    APP_PREFIX,
    INST_PREFIX,
    AppRecord,
    app_key,
    decode_app,
    decode_placement,
)
from meshorch.errors import MeshorchError
from meshorch.images.gc import LocalBlob, plan_catalogue, plan_host
from meshorch.images.service import SiteImages
from meshorch.images.store import (
    HOLDER_PREFIX,
    IDLE_PREFIX,
    OCI,
    ImageManifest,
    holder_key,
    idle_key,
)
from meshorch.runtime.base import Runtime
from meshorch.state.ports import SiteState
from meshorch.state.tables import APPS_TABLE
from raft import Delete, Put
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

TICK_S = 5.0
DEFAULT_GRACE_S = 3600.0
SCAN_LIMIT = 1_000_000


@dataclass(frozen=True)
class GcSettings:
    grace_s: float = DEFAULT_GRACE_S
    max_bytes: int | None = None  # the image store's limit on this host (None: disk only)
    evict_at_pct: float = 95.0  # of the data dir's file system


def _disk_bytes_over(path: Path, pct: float) -> int:
    usage = shutil.disk_usage(path)
    return max(0, int(usage.used - usage.total * pct / 100))


class ImageCollector:
    """One per host; the catalogue part only while this host leads."""

    def __init__(
        self,
        site: SiteState,
        host_id: str,
        images: SiteImages,
        runtime: Runtime,
        settings: GcSettings,
        *,
        clock: Callable[[], float] = time.time,
        tick_s: float = TICK_S,
    ) -> None:
        self.site = site
        self.host_id = host_id
        self.images = images
        self.runtime = runtime
        self.settings = settings
        self.clock = clock
        self.tick_s = tick_s

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                await self.tick()
            except ProposalError as exc:
                logger.debug("image collection not committed: %s", exc)
            except Exception:
                logger.exception("image collection failed")

    async def tick(self) -> None:
        if self.site.status().is_leader:
            await self.collect_catalogue()
        await self.collect_host()

    def _idle_since(self) -> dict[str, float]:
        records, _ = self.site.view.scan(APPS_TABLE, IDLE_PREFIX, SCAN_LIMIT)
        return {
            key[len(IDLE_PREFIX) :].decode(): float(orjson.loads(r.value)) for key, r in records
        }

    def _used_refs(self) -> frozenset[str]:
        records, _ = self.site.view.scan(APPS_TABLE, APP_PREFIX, SCAN_LIMIT)
        return frozenset(_container_images(decode_app(r.value) for _, r in records))

    def _needed_here(self) -> frozenset[str]:
        """The images of the instances placed on this host."""
        placed = set()
        records, _ = self.site.view.scan(APPS_TABLE, INST_PREFIX, SCAN_LIMIT)
        for _, record in records:
            placement = decode_placement(record.value)
            if placement.host_id == self.host_id:
                placed.add(placement.app)
        apps = []
        for app in placed:
            found = self.site.view.get(APPS_TABLE, app_key(app))
            if found is not None:
                apps.append(decode_app(found.value))
        return frozenset(_container_images(apps))

    async def collect_catalogue(self) -> None:
        now = self.clock()
        used = self._used_refs()
        plan = plan_catalogue(
            self.images.manifests(),
            used,
            self._idle_since(),
            now,
            self.settings.grace_s,
        )
        writes: list[Put | Delete] = [
            Put(APPS_TABLE, idle_key(ref), orjson.dumps(now)) for ref in plan.mark_idle
        ]
        writes += [Delete(APPS_TABLE, idle_key(ref)) for ref in plan.clear_idle]
        # A pull whose host is gone and that no app asks for: nobody will finish it.
        reachable = self.images.members.reachable_hosts()
        for pull in self.images.pulls_in_progress().values():
            if pull.host not in reachable and pull.ref not in used:
                writes.append(Delete(APPS_TABLE, pull.key()))
        for image in plan.drop:
            logger.info("image %s: idle past the grace period, removed", image.ref)
            writes.append(Delete(APPS_TABLE, image.key()))
            prefix = HOLDER_PREFIX + f"{image.digest}/".encode()
            holders, _ = self.site.view.scan(APPS_TABLE, prefix, SCAN_LIMIT)
            writes += [Delete(APPS_TABLE, key) for key, _ in holders]
        if writes:
            await self.site.propose(writes, idempotent=True)

    async def collect_host(self) -> None:
        images = self.images
        settings = self.settings
        catalogue = images.manifests()
        local = {d: LocalBlob(n, m) for d, (n, m) in images.blobs.local_blobs().items()}
        over = _disk_bytes_over(images.blobs.root, settings.evict_at_pct)
        if settings.max_bytes is not None:
            over = max(over, sum(b.size for b in local.values()) - settings.max_bytes)
        busy = images.pulls_running > 0 or images.blobs.fetching()
        pulling = frozenset(d for p in images.pulls_in_progress().values() for d, _ in p.blobs)
        if not busy:
            listed = {d for i in catalogue for d, _ in i.blob_sizes()} | pulling
            for path in images.blobs.stale_partials(listed, self.clock() - settings.grace_s):
                path.unlink(missing_ok=True)
        plan = plan_host(
            {} if busy else local,  # nothing deleted under a transfer
            catalogue,
            self._used_refs(),
            self._idle_since(),
            self._needed_here(),
            self.clock(),
            settings.grace_s,
            0 if busy else over,
            pulling,
        )
        for image in plan.evict:
            images.evicted.add(image.digest)
            if self.host_id in images.holders(image.digest):
                await self.site.propose(
                    [Delete(APPS_TABLE, holder_key(image.digest, self.host_id))], idempotent=True
                )
        for digest in plan.remove_blobs:
            images.removed_bytes += images.blobs.remove(digest)
        if plan.evict:
            images.evicted_images += len(plan.evict)
            logger.warning(
                "disk pressure: gave up %s (%d B freed, %d B still over)",
                ", ".join(i.ref for i in plan.evict),
                plan.freed_bytes,
                plan.short_bytes,
            )
        elif plan.remove_blobs:
            logger.info("removed %d unused blobs (%d B)", len(plan.remove_blobs), plan.freed_bytes)
        catalogued = {i.digest for i in catalogue}
        images.evicted &= catalogued
        await self._remove_runtime_images(catalogue, plan.evict)

    async def _remove_runtime_images(
        self, catalogue: list[ImageManifest], evicted: Iterable[ImageManifest]
    ) -> None:
        """The runtime's copies of pulled images: those no longer catalogued (their name
        carries the digest, ``:sha256-…``), and those evicted here."""
        keep = {i.runtime_name() for i in catalogue if i.digest not in self.images.evicted}
        gone = {i.runtime_name() for i in evicted if i.kind == OCI}
        gone |= {name for name in await self.runtime.image_names() if ":sha256-" in name}
        for name in sorted(gone - keep):
            try:
                if await self.runtime.remove_image(name):
                    logger.info("runtime image %s removed", name)
            except MeshorchError as exc:
                logger.warning("runtime image %s not removed: %s", name, exc)


def _container_images(apps: Iterable[AppRecord]) -> set[str]:
    refs = set()
    for record in apps:
        for service in record.spec.services:
            for container in service.containers:
                refs.add(container.image)
    return refs
