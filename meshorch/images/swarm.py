"""A blob fetched in pieces from several site peers at once (a small swarm).

A site has 3 to 20 hosts; when a new host (or one taking over instances) needs a large
layer that several peers hold, asking one peer for all of it leaves the others idle. Here
the blob is cut into ``PIECE_BYTES`` pieces; one worker per source (at most
``MAX_SOURCES``) takes the next missing piece, asks its peer for that byte range and
writes it at its offset in a sparse partial file. A source that fails or sends a wrong
length is dropped and its piece goes back to the queue for the others. The whole is
checked against its sha256 before it becomes visible: a peer sending other bytes of the
right length is caught there (the blob is then fetched again, in order, by
``BlobStore.fetch``, which tells the bad source).

Pure planning (:func:`pieces`) apart from the transfer (:func:`fetch_pieces`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from meshorch.images.store import (
    CHUNK_BYTES,
    BlobStore,
    ImageTransferError,
    Signer,
    signed_target,
)

logger = logging.getLogger(__name__)

PIECE_BYTES = 4 << 20
MAX_SOURCES = 4  # enough to fill a LAN link; more only adds requests
SWARM_MIN_BYTES = 2 * PIECE_BYTES  # smaller blobs come whole from one peer


def pieces(size: int, piece_bytes: int = PIECE_BYTES) -> list[tuple[int, int]]:
    """(start, end exclusive) of each piece of a blob of ``size`` bytes (pure)."""
    return [(start, min(start + piece_bytes, size)) for start in range(0, size, piece_bytes)]


@dataclass
class SwarmResult:
    fetched: int = 0
    by_source: dict[str, int] = field(default_factory=dict)


async def fetch_pieces(
    session: aiohttp.ClientSession,
    sources: Sequence[str],
    target: Path,
    size: int,
    sign: Signer | None = None,
    piece_bytes: int = PIECE_BYTES,
) -> SwarmResult:
    """Fill ``target`` (created sparse, ``size`` bytes) with the blob, each piece from
    whichever source is free; raise :class:`ImageTransferError` when every source failed
    before the last piece. The caller checks the digest."""
    queue: asyncio.Queue[tuple[int, int]] = asyncio.Queue()
    for piece in pieces(size, piece_bytes):
        queue.put_nowait(piece)
    result = SwarmResult()
    problems: list[str] = []
    done = 0
    total = queue.qsize()
    with open(target, "wb") as handle:
        handle.truncate(size)
    fd = os.open(target, os.O_WRONLY)

    async def worker(url: str) -> None:
        nonlocal done
        while done < total:
            try:
                start, end = queue.get_nowait()
            except asyncio.QueueEmpty:
                await asyncio.sleep(0.05)  # a piece may come back from a failed source
                continue
            try:
                got = await _fetch_range(session, url, fd, start, end, sign)
            except (aiohttp.ClientError, TimeoutError, OSError, ImageTransferError) as exc:
                queue.put_nowait((start, end))
                problems.append(f"{url}: {exc}")
                return
            result.fetched += got
            result.by_source[url] = result.by_source.get(url, 0) + got
            done += 1

    try:
        workers = [asyncio.create_task(worker(url)) for url in sources[:MAX_SOURCES]]
        await asyncio.gather(*workers)
    finally:
        os.close(fd)
    if done < total:
        with contextlib.suppress(OSError):
            target.unlink()
        raise ImageTransferError("no source finished the blob: " + "; ".join(problems))
    return result


async def fetch_from_swarm(
    store: BlobStore,
    session: aiohttp.ClientSession,
    sources: Sequence[str],
    digest: str,
    size: int,
    sign: Signer | None = None,
) -> SwarmResult | None:
    """``digest`` into ``store`` in pieces from ``sources`` at once; None when a swarm
    does not fit (small blob, one source, a partial to resume in order, or the swarm
    failed: the caller then fetches it in order, ``BlobStore.fetch``)."""
    if size < SWARM_MIN_BYTES or len(sources) < 2:
        return None
    async with store.lock(digest):
        if store.has(digest):
            return SwarmResult()
        partial = store.partial_path(digest)
        if partial.exists():
            return None  # resumed from where it stopped, in order
        target = partial.with_name(partial.name + ".pieces")
        try:
            result = await fetch_pieces(session, sources, target, size, sign)
            await store.publish(target, digest)
        except ImageTransferError as exc:
            logger.warning("swarm fetch of %s failed, fetching it in order: %s", digest, exc)
            target.unlink(missing_ok=True)
            return None
        except BaseException:
            target.unlink(missing_ok=True)
            raise
    logger.info("fetched %s in pieces from %d peers", digest, len(result.by_source))
    return result


async def _fetch_range(
    session: aiohttp.ClientSession,
    url: str,
    fd: int,
    start: int,
    end: int,
    sign: Signer | None,
) -> int:
    headers = {"Range": f"bytes={start}-{end - 1}"}
    if sign is not None:
        headers.update(sign("GET", signed_target(url)))
    offset = start
    async with session.get(url, headers=headers) as response:
        if response.status != 206:
            raise ImageTransferError(f"HTTP {response.status} for a range")
        async for chunk in response.content.iter_chunked(CHUNK_BYTES):
            if offset + len(chunk) > end:
                raise ImageTransferError("more bytes than the range asked for")
            await asyncio.to_thread(os.pwrite, fd, chunk, offset)
            offset += len(chunk)
    if offset != end:
        raise ImageTransferError(f"range ended at {offset} of {end}")
    return end - start
