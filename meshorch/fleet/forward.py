"""Store-and-forward of a site's streams to the hub, run by the leader's link session.

The hub keeps, per site and stream, the last sequence it stored (its position). A
session starts by asking for those positions, then sends what follows them, in
chunks as they are stored in Raft, and takes the positions from each answer. The
hub ignores sequences at or below its position, so resending after a lost answer, a
leader change or a restart duplicates nothing; nothing is skipped either, because
only the hub's answer moves a position. While the hub is unreachable the site keeps
accepting events (its retention policy bounds what it keeps); what retention dropped
before the hub had it is declared with ``dropped_through`` and counted at the hub.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
from collections.abc import Callable
from typing import Any

from meshorch.fleet.client import LinkClient, LinkError
from meshorch.streams.site import SiteStreams

logger = logging.getLogger(__name__)

MAX_PUSH_BYTES = 1024 * 1024  # raw chunk bytes per request (base64 makes it ~1.4 MB)
IDLE_S = 0.5
MARK_EVERY_S = 2.0
REFUSED_RETRY_S = 60.0
MAX_BACKOFF_S = 2.0


class StreamForwarder:
    def __init__(
        self,
        streams: SiteStreams,
        client: LinkClient,
        *,
        max_push_bytes: int = MAX_PUSH_BYTES,
        idle_s: float = IDLE_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.streams = streams
        self.client = client
        self.max_push_bytes = max_push_bytes
        self.idle_s = idle_s
        self.clock = clock
        self.positions: dict[str, int] | None = None
        self.refused: dict[str, tuple[str, float]] = {}  # stream -> (message, when)
        self.forwarded_events = 0
        self._marked: dict[str, float] = {}

    async def run(self) -> None:
        delay = 0.5
        while True:
            try:
                if self.positions is None:
                    self.positions = await self.client.stream_positions()
                if not await self.push_once():
                    await asyncio.sleep(self.idle_s)
                delay = 0.5
            except LinkError as exc:
                logger.info("stream forwarding paused: %s", exc)
                self.positions = None  # ask again: an answer may have been lost
                await asyncio.sleep(delay)
                delay = min(delay * 2, MAX_BACKOFF_S)

    def _batch(self, positions: dict[str, int]) -> list[dict[str, Any]]:
        batch: list[dict[str, Any]] = []
        size = 0
        now = self.clock()
        for name in self.streams.names():
            refused = self.refused.get(name)
            if refused is not None and now - refused[1] < REFUSED_RETRY_S:
                continue
            status = self.streams.status(name)
            position = positions.get(name, 0)
            if status.last_seq <= position:
                continue
            chunks = self.streams.chunks_from(name, position + 1, self.max_push_bytes - size)
            if not chunks:
                continue
            batch.append(
                {
                    "stream": name,
                    # Retention dropped these before the hub had them: say so, never skip silently.
                    "dropped_through": chunks[0][0] - 1 if chunks[0][0] > position + 1 else 0,
                    "chunks": [
                        {"first": first, "data": base64.b64encode(raw).decode()}
                        for first, raw in chunks
                    ],
                }
            )
            size += sum(len(raw) for _, raw in chunks)
            if size >= self.max_push_bytes:
                break
        return batch

    async def push_once(self) -> int:
        """Send one request's worth; returns the number of new events the hub took."""
        positions = self.positions
        assert positions is not None
        batch = self._batch(positions)
        if not batch:
            return 0
        answered, refused = await self.client.push_streams(batch)
        taken = 0
        for entry in batch:
            name = entry["stream"]
            new = answered.get(name, positions.get(name, 0))
            taken += max(0, new - positions.get(name, 0))
            positions[name] = new
        for name, message in refused.items():
            logger.warning("the hub refused stream %s: %s", name, message)
            self.refused[name] = (message, self.clock())
        self.forwarded_events += taken
        await self._mark(positions)
        return taken

    async def _mark(self, positions: dict[str, int]) -> None:
        """Record the hub's positions in Raft now and then (status and retention counts)."""
        now = self.clock()
        for name, position in positions.items():
            if now - self._marked.get(name, -MARK_EVERY_S) >= MARK_EVERY_S:
                self._marked[name] = now
                await self.streams.mark_forwarded(name, position)

    def status_json(self) -> dict[str, Any]:
        return {
            "hub_positions": self.positions,
            "forwarded_events": self.forwarded_events,
            "refused": {name: message for name, (message, _) in self.refused.items()},
        }
