"""Garbage collection of the site's images: what to forget and what to delete (pure).

Two decisions, both from plain data and ``now`` (wall-clock seconds, shared by hosts):

- The site's (on the Raft leader), :func:`plan_catalogue`: an image of the catalogue
  that no application names and that is not pinned becomes *idle* (the time is recorded
  in the state, so a new leader keeps counting); named again, it is busy again; idle
  for longer than the grace period, it leaves the catalogue.
- Each host's, :func:`plan_host`: a blob that no image of the catalogue lists is an
  orphan, deleted once older than the grace period (a pull writes blobs before its
  record is committed; the adapter also waits while a pull runs). A host under disk
  pressure evicts its copies of images it does not need, unused ones first: images no
  app names (idle longest first), then images apps use elsewhere but no instance here (oldest
  first), until it is under its limit. Pinned images and images an instance of this host
  runs are never evicted; a blob shared with a kept image stays.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from meshorch.images.store import ImageManifest


@dataclass(frozen=True)
class LocalBlob:
    size: int
    mtime: float


@dataclass(frozen=True)
class CataloguePlan:
    mark_idle: tuple[str, ...] = ()  # refs idle from now on
    clear_idle: tuple[str, ...] = ()  # refs named again, or gone
    drop: tuple[ImageManifest, ...] = ()  # idle past the grace period: out of the catalogue


@dataclass(frozen=True)
class HostPlan:
    remove_blobs: tuple[str, ...] = ()
    evict: tuple[ImageManifest, ...] = ()  # this host's copies given up under pressure
    freed_bytes: int = 0
    short_bytes: int = 0  # still over the limit after every eviction allowed


def plan_catalogue(
    catalogue: Iterable[ImageManifest],
    used_refs: frozenset[str],
    idle_since: Mapping[str, float],
    now: float,
    grace_s: float,
) -> CataloguePlan:
    mark: list[str] = []
    clear: list[str] = []
    drop: list[ImageManifest] = []
    refs = set()
    for image in catalogue:
        refs.add(image.ref)
        unused = image.ref not in used_refs and not image.pinned
        since = idle_since.get(image.ref)
        if not unused:
            if since is not None:
                clear.append(image.ref)
        elif since is None:
            mark.append(image.ref)
        elif now - since >= grace_s:
            drop.append(image)
            clear.append(image.ref)
    clear += [ref for ref in idle_since if ref not in refs]  # removed some other way
    return CataloguePlan(tuple(mark), tuple(clear), tuple(drop))


def plan_host(
    local: Mapping[str, LocalBlob],
    catalogue: Iterable[ImageManifest],
    used_refs: frozenset[str],
    idle_since: Mapping[str, float],
    needed_here: frozenset[str],
    now: float,
    grace_s: float,
    bytes_over: int,
    pulling: frozenset[str] = frozenset(),
) -> HostPlan:
    """``local``: this host's blobs by digest; ``used_refs``: the images apps name;
    ``needed_here``: those the instances placed on this host run; ``bytes_over``: how far
    the host is over its limit (0: no pressure); ``pulling``: blobs of pulls under way
    (not orphans yet). An image no app names is unused even before the leader records
    it idle."""
    images = list(catalogue)
    owners: dict[str, list[str]] = {}  # blob digest -> refs of the images listing it
    for image in images:
        for digest, _ in image.blob_sizes():
            owners.setdefault(digest, []).append(image.ref)
    remove: list[str] = []
    freed = 0
    for digest, blob in sorted(local.items()):
        if digest not in owners and digest not in pulling and now - blob.mtime >= grace_s:
            remove.append(digest)
            freed += blob.size
    if freed >= bytes_over:
        return HostPlan(tuple(remove), (), freed)

    def evictable(image: ImageManifest) -> bool:
        return not image.pinned and image.ref not in needed_here

    idle = sorted(
        (i for i in images if i.ref not in used_refs and evictable(i)),
        key=lambda i: (idle_since.get(i.ref, now), i.ref),
    )
    elsewhere = sorted(
        (i for i in images if i.ref in used_refs and evictable(i)),
        key=lambda i: (i.added_at, i.ref),
    )
    evicted: list[ImageManifest] = []
    gone: set[str] = set()
    for image in (*idle, *elsewhere):
        if freed >= bytes_over:
            break
        if not any(d in local for d, _ in image.blob_sizes()):
            continue  # nothing of it here
        evicted.append(image)
        gone.add(image.ref)
        for digest, _ in image.blob_sizes():
            if digest in local and digest not in remove and set(owners[digest]) <= gone:
                remove.append(digest)
                freed += local[digest].size
    return HostPlan(tuple(remove), tuple(evicted), freed, max(0, bytes_over - freed))
