"""A site's event streams, replicated by its Raft cluster (an I/O adapter).

Every producer batch becomes one or more chunks (``meshorch.streams.model.encode_chunk``)
appended through Raft with an ``Append`` operation: the log order numbers them, so
any host accepts events without asking another one first, and a produce call returns
only once the entry is committed by a majority of the site's hosts (two of two or
three, one of one) and applied here. Losing any single host therefore loses no
acknowledged event, and every host holds the streams in its LMDB view.

Layout in the ``streams`` table (``name`` is ``tenant/app/name``)::

    d/<name>\\0             append counter: next sequence, bytes appended
    d/<name>\\0<u64 first>  a chunk: events first .. first + count - 1
    m/<name>               metadata (JSON): retention policy, dropped counters,
                           the position the hub acknowledged
    o/<name>\\0<consumer>   a consumer's committed position (u64)

Retention runs on the leader: whole chunks, oldest first, are deleted together with
the update of the dropped counters in one guarded proposal, so a drop is counted
exactly once even across a leader change.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass

import orjson

from meshorch.errors import ServiceError
from meshorch.state.ports import SiteState
from meshorch.state.protocol import require
from meshorch.state.tables import STREAMS_TABLE
from meshorch.streams.model import (
    SEGMENT_RE,
    SEGMENT_RULE,
    Event,
    MalformedEvent,
    NewEvent,
    OffsetOutOfRange,
    RetentionPolicy,
    StreamName,
    StreamStoreCorrupt,
    UnknownStream,
    chunk_info,
    decode_chunk,
    encode_chunk,
    plan_retention,
    split_chunks,
    stream_name,
    validate_batch,
)
from raft import Append, Delete, Guard, Put
from raft.state_machine import decode_counter, item_key

logger = logging.getLogger(__name__)

DEFAULT_READ_LIMIT = 1000
MAX_READ_LIMIT = 10_000
DEFAULT_READ_BYTES = 4 * 1024 * 1024
RETENTION_INTERVAL_S = 5.0
MAX_DROPS_PER_PROPOSAL = 1000
_U64 = struct.Struct(">Q")
_SCAN_PAGE = 64


def data_prefix(name: StreamName) -> bytes:
    return b"d/" + str(name).encode() + b"\0"


def meta_key(name: StreamName) -> bytes:
    return b"m/" + str(name).encode()


def offset_key(name: StreamName, consumer: str) -> bytes:
    return b"o/" + str(name).encode() + b"\0" + consumer.encode()


def check_consumer(consumer: object) -> str:
    if not isinstance(consumer, str) or SEGMENT_RE.fullmatch(consumer) is None:
        raise MalformedEvent(f"consumer name {consumer!r} is invalid: it must be {SEGMENT_RULE}")
    return consumer


@dataclass(frozen=True, slots=True)
class StreamMeta:
    policy: RetentionPolicy
    dropped_events: int = 0
    dropped_bytes: int = 0
    dropped_unforwarded: int = 0
    forwarded_seq: int = 0

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "policy": self.policy.to_json(),
                "dropped_events": self.dropped_events,
                "dropped_bytes": self.dropped_bytes,
                "dropped_unforwarded": self.dropped_unforwarded,
                "forwarded_seq": self.forwarded_seq,
            }
        )

    @classmethod
    def decode(cls, raw: bytes) -> StreamMeta:
        try:
            data = orjson.loads(raw)
            return cls(
                RetentionPolicy.from_json(data["policy"]),
                int(data["dropped_events"]),
                int(data["dropped_bytes"]),
                int(data["dropped_unforwarded"]),
                int(data["forwarded_seq"]),
            )
        except Exception as exc:  # any shape error in stored data is corruption
            raise StreamStoreCorrupt(f"stream metadata cannot be decoded: {exc}") from exc


@dataclass(frozen=True, slots=True)
class StreamStatus:
    name: str
    first_seq: int  # the oldest event kept (last_seq + 1 when none is kept)
    last_seq: int  # 0 before the first event
    stored_bytes: int
    meta: StreamMeta

    @property
    def count(self) -> int:
        return self.last_seq - self.first_seq + 1

    def to_json(self) -> dict[str, object]:
        return {
            "stream": self.name,
            "first_seq": self.first_seq,
            "last_seq": self.last_seq,
            "count": self.count,
            "stored_bytes": self.stored_bytes,
            "retention": self.meta.policy.to_json(),
            "dropped_events": self.meta.dropped_events,
            "dropped_bytes": self.meta.dropped_bytes,
            "dropped_unforwarded": self.meta.dropped_unforwarded,
            "forwarded_seq": self.meta.forwarded_seq,
        }


@dataclass(frozen=True, slots=True)
class StoredEvent:
    host: str
    event: Event


@dataclass(frozen=True, slots=True)
class RetentionDrop:
    stream: str
    events: int
    bytes: int
    unforwarded: int


class SiteStreams:
    """Produce, read and administer the site's streams through the agent's Raft node."""

    def __init__(
        self,
        site: SiteState,
        host_id: str,
        host_protocols: Callable[[], Mapping[str, int]],
        *,
        default_policy: RetentionPolicy | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.host_id = host_id
        # The site protocol each registered host speaks (``meshorch.state.protocol``):
        # streams wait until every host can decode them.
        self.host_protocols = host_protocols
        self.default_policy = (default_policy or RetentionPolicy()).validate()
        self.clock = clock

    # -- reads (this host's view) -------------------------------------------------------

    def _get(self, key: bytes) -> tuple[int, bytes] | None:
        record = self.site.view.get(STREAMS_TABLE, key)
        return None if record is None else (record.mod_index, record.value)

    def meta(self, name: StreamName) -> StreamMeta | None:
        found = self._get(meta_key(name))
        return None if found is None else StreamMeta.decode(found[1])

    def names(self) -> list[str]:
        view = self.site.view
        names: list[str] = []
        start = b"m/"
        while True:
            page, more = view.scan(STREAMS_TABLE, b"m/", 1000, start=start)
            names.extend(key[2:].decode() for key, _ in page)
            if not more or not page:
                return names
            start = page[-1][0] + b"\0"

    def status(self, stream: StreamName | str) -> StreamStatus:
        name = stream_name(stream)
        meta = self.meta(name)
        if meta is None:
            raise UnknownStream(f"stream {name} does not exist at this site")
        prefix = data_prefix(name)
        counter = self._get(prefix)
        next_seq, appended = decode_counter(None if counter is None else counter[1])
        first = next_seq
        for first_seq, _raw in self._chunks(name, 0, 1):
            first = first_seq
        return StreamStatus(str(name), first, next_seq - 1, appended - meta.dropped_bytes, meta)

    def _chunks(
        self, name: StreamName, from_seq: int, limit: int | None
    ) -> Iterator[tuple[int, bytes]]:
        """Chunks in order from the one holding ``from_seq`` (or the oldest)."""
        view = self.site.view
        prefix = data_prefix(name)
        start = item_key(prefix, max(from_seq, 0))
        preceding = from_seq > 0
        given = 0
        while limit is None or given < limit:
            page, more = view.scan(
                STREAMS_TABLE, prefix, _SCAN_PAGE, start=start, preceding=preceding
            )
            for key, record in page:
                if len(key) != len(prefix) + _U64.size:
                    continue  # the counter
                yield _U64.unpack_from(key, len(prefix))[0], record.value
                given += 1
                if limit is not None and given >= limit:
                    return
            if not more or not page:
                return
            start, preceding = page[-1][0] + b"\0", False

    def read(
        self,
        stream: StreamName | str,
        from_seq: int,
        *,
        limit: int = DEFAULT_READ_LIMIT,
        max_bytes: int = DEFAULT_READ_BYTES,
    ) -> list[StoredEvent]:
        """Events with ``seq >= from_seq`` in order, at most ``limit`` and about
        ``max_bytes`` (always at least one when there is one)."""
        name = stream_name(stream)
        if self.meta(name) is None:
            raise UnknownStream(f"stream {name} does not exist at this site")
        if isinstance(from_seq, bool) or not isinstance(from_seq, int) or from_seq < 0:
            raise OffsetOutOfRange(f"from must be an integer >= 0, got {from_seq!r}")
        limit = max(1, min(limit, MAX_READ_LIMIT))
        found: list[StoredEvent] = []
        size = 0
        for first, raw in self._chunks(name, max(from_seq, 1), None):
            info, events = decode_chunk(first, raw)
            for event in events:
                if event.seq < from_seq:
                    continue
                if len(found) >= limit or (found and size + event.encoded_size() > max_bytes):
                    return found
                found.append(StoredEvent(info.host, event))
                size += event.encoded_size()
        return found

    def chunks_from(
        self, stream: StreamName | str, from_seq: int, max_bytes: int
    ) -> list[tuple[int, bytes]]:
        """Raw chunks from the one holding ``from_seq``, about ``max_bytes`` (forwarding)."""
        name = stream_name(stream)
        chunks: list[tuple[int, bytes]] = []
        size = 0
        for first, raw in self._chunks(name, max(from_seq, 1), None):
            if chunks and size + len(raw) > max_bytes:
                break
            chunks.append((first, raw))
            size += len(raw)
        return chunks

    def offset(self, stream: StreamName | str, consumer: str) -> int:
        name = stream_name(stream)
        found = self._get(offset_key(name, check_consumer(consumer)))
        return 0 if found is None else int(_U64.unpack(found[1])[0])

    # -- writes (through Raft) -------------------------------------------------------

    async def produce(
        self, stream: StreamName | str, events: Sequence[NewEvent]
    ) -> tuple[int, int]:
        """Append a batch; returns (first, last) sequence once a majority stored it."""
        name = stream_name(stream)
        batch = validate_batch(list(events))
        if not batch:
            raise MalformedEvent("a batch holds at least one event")
        ops = self.append_ops(name, batch)
        meta_ops = len(ops) - sum(isinstance(op, Append) for op in ops)
        results = await self.site.propose(ops)
        first_result = results[meta_ops]
        if not all(r.ok for r in results[meta_ops:]):
            raise ServiceError(f"append to {name} was not applied: {first_result.error}")
        # One entry: its appends took consecutive numbers.
        return first_result.current_index, first_result.current_index + len(batch) - 1

    def append_ops(self, name: StreamName, batch: Sequence[NewEvent]) -> list[Put | Append]:
        """The Raft operations that append a validated, non-empty ``batch`` to ``name``
        (creating the stream on first use), for a caller that proposes them, possibly with
        operations of its own in the same entry. Raises ``FeatureUnavailable`` while a host
        of the site runs a release without streams."""
        require("streams", self.host_protocols())
        ops: list[Put | Append] = []
        if self.meta(name) is None:
            # Created on first use; a concurrent creation elsewhere makes this put fail
            # harmlessly (expect absent), the appends still apply.
            ops.append(
                Put(
                    STREAMS_TABLE,
                    meta_key(name),
                    StreamMeta(self.default_policy).encode(),
                    expect_index=0,
                )
            )
        prefix = data_prefix(name)
        ops += [
            Append(STREAMS_TABLE, prefix, encode_chunk(self.host_id, run), len(run))
            for run in split_chunks(batch)
        ]
        return ops

    async def configure(self, stream: StreamName | str, policy: RetentionPolicy) -> StreamStatus:
        """Create a stream or change its retention policy."""
        name = stream_name(stream)
        policy.validate()
        for _attempt in range(5):
            found = self._get(meta_key(name))
            current = (
                StreamMeta(self.default_policy) if found is None else StreamMeta.decode(found[1])
            )
            updated = StreamMeta(
                policy,
                current.dropped_events,
                current.dropped_bytes,
                current.dropped_unforwarded,
                current.forwarded_seq,
            )
            expect = 0 if found is None else found[0]
            (result,) = await self.site.propose(
                [Put(STREAMS_TABLE, meta_key(name), updated.encode(), expect_index=expect)]
            )
            if result.ok:
                return self.status(name)
        raise ServiceError(f"stream {name} changed concurrently; retry")

    async def commit_offset(self, stream: StreamName | str, consumer: str, seq: int) -> None:
        name = stream_name(stream)
        status = self.status(name)
        if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq <= status.last_seq:
            raise OffsetOutOfRange(
                f"offset must be an integer between 0 and the last sequence "
                f"{status.last_seq}, got {seq!r}"
            )
        await self.site.propose(
            [Put(STREAMS_TABLE, offset_key(name, check_consumer(consumer)), _U64.pack(seq))],
            idempotent=True,
        )

    async def mark_forwarded(self, stream: StreamName | str, seq: int) -> None:
        """Record the position the hub acknowledged (only moves forward)."""
        name = stream_name(stream)
        for _attempt in range(5):
            found = self._get(meta_key(name))
            if found is None:
                return
            meta = StreamMeta.decode(found[1])
            if seq <= meta.forwarded_seq:
                return
            updated = StreamMeta(
                meta.policy, meta.dropped_events, meta.dropped_bytes, meta.dropped_unforwarded, seq
            )
            (result,) = await self.site.propose(
                [Put(STREAMS_TABLE, meta_key(name), updated.encode(), expect_index=found[0])]
            )
            if result.ok:
                return

    async def apply_retention(self, now: float | None = None) -> list[RetentionDrop]:
        """Drop what each stream's policy no longer keeps (run by the leader)."""
        now = self.clock() if now is None else now
        drops: list[RetentionDrop] = []
        for text in self.names():
            drop = await self._retain(StreamName.parse(text), now)
            if drop is not None:
                drops.append(drop)
        return drops

    async def _retain(self, name: StreamName, now: float) -> RetentionDrop | None:
        found = self._get(meta_key(name))
        if found is None:
            return None
        meta_index, meta = found[0], StreamMeta.decode(found[1])
        status = self.status(name)
        chunks: list[tuple[int, int, int]] = []  # first, count, size

        def oldest() -> Iterator[tuple[float, int]]:
            for first, raw in self._chunks(name, 0, MAX_DROPS_PER_PROPOSAL):
                info = chunk_info(raw)
                chunks.append((first, info.count, info.size))
                yield info.newest_time_s, info.size

        plan = plan_retention(meta.policy, status.stored_bytes, oldest(), now)
        if plan.drop_events == 0:
            return None
        dropped = chunks[: plan.drop_events]
        events = sum(count for _, count, _ in dropped)
        unforwarded = sum(
            max(0, first + count - 1 - max(meta.forwarded_seq, first - 1))
            for first, count, _ in dropped
        )
        updated = StreamMeta(
            meta.policy,
            meta.dropped_events + events,
            meta.dropped_bytes + plan.drop_bytes,
            meta.dropped_unforwarded + unforwarded,
            meta.forwarded_seq,
        )
        prefix = data_prefix(name)
        ops: list[Guard | Put | Delete] = [
            Guard(STREAMS_TABLE, meta_key(name), meta_index, 1 + len(dropped)),
            Put(STREAMS_TABLE, meta_key(name), updated.encode()),
            *(Delete(STREAMS_TABLE, item_key(prefix, first)) for first, _, _ in dropped),
        ]
        results = await self.site.propose(ops)
        if not results[0].ok:
            return None  # the metadata changed meanwhile: the next pass plans again
        if unforwarded:
            logger.warning(
                "stream %s: retention dropped %d events the hub has not received", name, unforwarded
            )
        return RetentionDrop(str(name), events, plan.drop_bytes, unforwarded)

    async def run_retention(
        self, is_leader: Callable[[], bool], interval_s: float = RETENTION_INTERVAL_S
    ) -> None:
        while True:
            await asyncio.sleep(interval_s)
            if not is_leader():
                continue
            try:
                await self.apply_retention()
            except Exception as exc:  # a failed pass is retried at the next interval
                logger.warning("stream retention pass failed: %s", exc)

    async def wait_beyond(
        self, stream: StreamName | str, seq: int, timeout_s: float, poll_s: float = 0.05
    ) -> bool:
        """Wait until the stream holds an event after ``seq`` (or the timeout)."""
        name = stream_name(stream)
        prefix = data_prefix(name)
        deadline = time.monotonic() + timeout_s
        while True:
            counter = self._get(prefix)
            if decode_counter(None if counter is None else counter[1])[0] - 1 > seq:
                return True
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(poll_s)
