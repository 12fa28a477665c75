"""A blob served to a peer while this host is still receiving it (``?follow=SIZE``).

In the chain of a pull (``meshorch.images.chain``) each host copies a blob from its
predecessor while the predecessor's own copy is still arriving: the predecessor
streams its partial file as it grows, from the offset asked for, until the blob's
``SIZE`` bytes are sent. When the partial becomes the blob (a rename: same file) or is
replaced, the stream goes on from the file now there; when nothing arrives for
``IDLE_S`` the response ends short and the follower resumes (HTTP Range) from another
host of the chain.

The cost of a follow is bounded: SIZE is the blob's declared size (checked by the
route), a follow stops at SIZE or after ``IDLE_S`` without growth, the file is polled
every ``POLL_S`` (one ``stat`` when nothing is new), and a peer holds at most
``MAX_FOLLOWS_PER_PEER`` at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
from collections.abc import AsyncIterator
from pathlib import Path

from meshorch.errors import RemoteInputError
from meshorch.images.store import CHUNK_BYTES

IDLE_S = 5.0
POLL_S = 0.025
MAX_FOLLOWS_PER_PEER = 4  # a follower copies one blob at a time; a few for its restarts

_SIZE_RE = re.compile(r"^[0-9]{1,20}$")
_RANGE_RE = re.compile(r"^bytes=([0-9]{1,20})-$")


def parse_follow(raw: str, max_bytes: int) -> int:
    """The ``follow`` parameter: a blob size in bytes, 1 to ``max_bytes``."""
    if not _SIZE_RE.match(raw) or not 0 < int(raw) <= max_bytes:
        raise RemoteInputError("bad_follow", f"follow: a blob's size, 1 to {max_bytes} bytes")
    return int(raw)


def parse_start(header: str | None, size: int) -> int:
    """Where a follow starts: 0, or N from ``Range: bytes=N-`` (N below ``size``)."""
    if header is None:
        return 0
    match = _RANGE_RE.match(header.strip())
    if match is None or int(match.group(1)) >= size:
        raise RemoteInputError("bad_range", f"a follow takes Range: bytes=N- with N < {size}")
    return int(match.group(1))


class FollowSlots:
    """How many follows each peer holds; a peer at its limit is refused, not queued."""

    def __init__(self, per_peer: int = MAX_FOLLOWS_PER_PEER) -> None:
        self.per_peer = per_peer
        self._held: dict[str, int] = {}

    def take(self, peer: str) -> bool:
        held = self._held.get(peer, 0)
        if held >= self.per_peer:
            return False
        self._held[peer] = held + 1
        return True

    def give(self, peer: str) -> None:
        held = self._held.get(peer, 0) - 1
        if held > 0:
            self._held[peer] = held
        else:
            self._held.pop(peer, None)


class Follow:
    """The bytes ``start`` to ``size`` of a blob that is ``blob`` once whole and
    ``partial`` while it arrives. Close it (``with``) to release the file."""

    def __init__(
        self,
        blob: Path,
        partial: Path,
        start: int,
        size: int,
        idle_s: float = IDLE_S,
        poll_s: float = POLL_S,
    ) -> None:
        self.blob = blob
        self.partial = partial
        self.offset = start
        self.size = size
        self.idle_s = idle_s
        self.poll_s = poll_s
        self._fd: int | None = None

    def __enter__(self) -> Follow:
        return self

    def __exit__(self, *exc: object) -> None:
        self._close()

    async def wait_for_file(self, wait_s: float) -> bool:
        """Wait (at most ``wait_s``) for the blob or its partial to be here; False if not:
        a follower may ask before this host has begun receiving."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while not self._reopen():
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(self.poll_s)
        return True

    async def chunks(self) -> AsyncIterator[bytes]:
        """The bytes as they arrive; ends at ``size``, or early after ``idle_s`` without
        growth or when the partial was removed (a failed transfer) with no blob."""
        loop = asyncio.get_running_loop()
        grew_at = loop.time()
        while self.offset < self.size:
            data = await asyncio.to_thread(self._read)
            if data:
                self.offset += len(data)
                grew_at = loop.time()
                yield data
                continue
            if self._stale():
                if not self._reopen():
                    return
                continue
            if loop.time() - grew_at >= self.idle_s:
                return
            await asyncio.sleep(self.poll_s)

    def _read(self) -> bytes:
        assert self._fd is not None  # opened by wait_for_file
        return os.pread(self._fd, min(CHUNK_BYTES, self.size - self.offset), self.offset)

    def _stale(self) -> bool:
        """Whether the file open here is no longer the one to read: the blob is whole
        (renamed from this partial, or stored otherwise), or the partial was replaced."""
        assert self._fd is not None
        own = os.fstat(self._fd)
        for path in (self.blob, self.partial):
            try:
                there = os.stat(path)
            except FileNotFoundError:
                continue
            return (there.st_dev, there.st_ino) != (own.st_dev, own.st_ino)
        return True  # neither: the partial was removed

    def _reopen(self) -> bool:
        """Open the blob, else the partial; False when neither is there."""
        for path in (self.blob, self.partial):
            try:
                fd = os.open(path, os.O_RDONLY)
            except FileNotFoundError:
                continue
            self._close()
            self._fd = fd
            return True
        return False

    def _close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None
