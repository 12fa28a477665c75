"""Durable event streams in LMDB (an I/O adapter over ``meshorch.streams``).

One LMDB environment per host data directory, with named databases:

- ``events``:  ``stream id (u32) || seq (u64)``, big-endian, -> encoded event
- ``streams``: stream name (``tenant/app/name``) -> metadata, a versioned orjson struct
  (id, policy, next/first sequence, count, bytes, dropped counters, forward position)
- ``offsets``: ``stream id (u32) || consumer`` -> committed sequence (u64)
- ``store``:   store-wide values (schema version, next stream id)

Every call is one LMDB transaction: a batch append writes all its events and the
metadata together, which is what makes tens of thousands of events per second
possible. Sequences start at 1, are strictly increasing per stream and are never
reused, also across reopen and after retention drops every event. Retention drops
oldest first and adds what it dropped to the stream's cumulative counters.

Store-and-forward: ``forward_position`` is the last sequence the hub acknowledged;
``pending_forward`` reads what follows it; ``set_forward_position`` only moves forward.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import lmdb
import orjson

from meshorch.streams import (
    MAX_EVENT_BYTES,
    SEGMENT_RE,
    SEGMENT_RULE,
    Event,
    NewEvent,
    OffsetOutOfRange,
    RetentionPolicy,
    StreamError,
    StreamName,
    StreamStoreCorrupt,
    UnknownStream,
    decode_event,
    encode_event,
    event_time,
    plan_retention,
    stream_name,
    validate_batch,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
META_VERSION = 1
DEFAULT_MAP_SIZE = 4 << 30
DEFAULT_READ_LIMIT = 1000
DEFAULT_READ_MAX_BYTES = 4 * 1024 * 1024

_EVENT_KEY = struct.Struct(">IQ")
_STREAM_ID = struct.Struct(">I")
_U64 = struct.Struct(">Q")
_SCHEMA_KEY = b"schema_version"
_NEXT_ID_KEY = b"next_stream_id"

_META_FIELDS = {
    "v": int,
    "id": int,
    "next_seq": int,
    "first_seq": int,
    "count": int,
    "bytes": int,
    "dropped_events": int,
    "dropped_bytes": int,
    "dropped_unforwarded": int,
    "forward_seq": int,
}


@dataclass(slots=True)
class _Meta:
    id: int
    policy: RetentionPolicy
    next_seq: int
    first_seq: int
    count: int
    total_bytes: int
    dropped_events: int = 0
    dropped_bytes: int = 0
    dropped_unforwarded: int = 0
    forward_seq: int = 0

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": META_VERSION,
                "id": self.id,
                "policy": self.policy.to_json(),
                "next_seq": self.next_seq,
                "first_seq": self.first_seq,
                "count": self.count,
                "bytes": self.total_bytes,
                "dropped_events": self.dropped_events,
                "dropped_bytes": self.dropped_bytes,
                "dropped_unforwarded": self.dropped_unforwarded,
                "forward_seq": self.forward_seq,
            }
        )

    @classmethod
    def decode(cls, name: str, raw: bytes) -> _Meta:
        try:
            data = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise StreamStoreCorrupt(f"metadata of stream {name!r} is not JSON: {exc}") from exc
        if not isinstance(data, dict):
            raise StreamStoreCorrupt(f"metadata of stream {name!r} is not an object")
        if data.get("v") != META_VERSION:
            raise StreamStoreCorrupt(
                f"metadata of stream {name!r} has version {data.get('v')!r}; "
                f"this build reads version {META_VERSION}"
            )
        for field, kind in _META_FIELDS.items():
            value = data.get(field)
            if not isinstance(value, kind) or isinstance(value, bool) or value < 0:
                raise StreamStoreCorrupt(
                    f"metadata of stream {name!r}: field {field!r} is {value!r}, "
                    "expected a non-negative integer"
                )
        try:
            policy = RetentionPolicy.from_json(data.get("policy"))
        except Exception as exc:
            raise StreamStoreCorrupt(f"metadata of stream {name!r}: bad policy: {exc}") from exc
        meta = cls(
            id=data["id"],
            policy=policy,
            next_seq=data["next_seq"],
            first_seq=data["first_seq"],
            count=data["count"],
            total_bytes=data["bytes"],
            dropped_events=data["dropped_events"],
            dropped_bytes=data["dropped_bytes"],
            dropped_unforwarded=data["dropped_unforwarded"],
            forward_seq=data["forward_seq"],
        )
        if not (
            1 <= meta.first_seq <= meta.next_seq
            and meta.count == meta.next_seq - meta.first_seq
            and meta.forward_seq < meta.next_seq
        ):
            raise StreamStoreCorrupt(f"metadata of stream {name!r} is inconsistent: {data!r}")
        return meta


@dataclass(frozen=True, slots=True)
class StreamStats:
    stream: str
    first_seq: int
    """Oldest sequence kept (``last_seq + 1`` when the stream is empty)."""
    last_seq: int
    """Newest sequence ever appended (0 before the first append)."""
    count: int
    total_bytes: int
    dropped_events: int
    dropped_bytes: int
    dropped_unforwarded: int
    """Of ``dropped_events``, how many retention dropped before the hub acknowledged them."""
    forward_seq: int
    policy: RetentionPolicy


@dataclass(frozen=True, slots=True)
class RetentionResult:
    dropped_events: int
    dropped_bytes: int
    dropped_unforwarded: int


class StreamStore:
    """Streams of one host, in one LMDB environment under ``path``."""

    def __init__(
        self,
        path: Path,
        *,
        default_policy: RetentionPolicy | None = None,
        max_event_bytes: int = MAX_EVENT_BYTES,
        map_size: int = DEFAULT_MAP_SIZE,
        sync: bool = True,
    ) -> None:
        self.default_policy = (default_policy or RetentionPolicy()).validate()
        self.max_event_bytes = max_event_bytes
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(
            str(path), max_dbs=4, map_size=map_size, sync=sync, metasync=sync, max_readers=256
        )
        self._events = self._env.open_db(b"events")
        self._streams = self._env.open_db(b"streams")
        self._offsets = self._env.open_db(b"offsets")
        self._store = self._env.open_db(b"store")
        with self._env.begin(write=True, db=self._store) as txn:
            raw = txn.get(_SCHEMA_KEY)
            if raw is None:
                txn.put(_SCHEMA_KEY, _U64.pack(SCHEMA_VERSION))
            elif len(raw) != _U64.size or _U64.unpack(raw)[0] != SCHEMA_VERSION:
                schema = bytes(raw)
                txn.abort()
                self._env.close()
                raise StreamStoreCorrupt(
                    f"stream store at {path} has schema {schema!r}; "
                    f"this build reads schema {SCHEMA_VERSION}"
                )

    # -- lifecycle ----------------------------------------------------------------------

    def close(self) -> None:
        self._env.sync(True)
        self._env.close()

    def __enter__(self) -> StreamStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- metadata -----------------------------------------------------------------------

    def _get_meta(self, txn: Any, name: StreamName) -> _Meta | None:
        raw = txn.get(str(name).encode(), db=self._streams)
        return None if raw is None else _Meta.decode(str(name), bytes(raw))

    def _require_meta(self, txn: Any, name: StreamName) -> _Meta:
        meta = self._get_meta(txn, name)
        if meta is None:
            raise UnknownStream(f"stream {str(name)!r} does not exist")
        return meta

    def _put_meta(self, txn: Any, name: StreamName, meta: _Meta) -> None:
        txn.put(str(name).encode(), meta.encode(), db=self._streams)

    def _create(self, txn: Any, name: StreamName, policy: RetentionPolicy) -> _Meta:
        raw = txn.get(_NEXT_ID_KEY, db=self._store)
        if raw is not None and len(raw) != _U64.size:
            raise StreamStoreCorrupt(f"next stream id is {bytes(raw)!r}, not a u64")
        stream_id = 1 if raw is None else int(_U64.unpack(raw)[0])
        if stream_id > 0xFFFFFFFF:
            raise StreamStoreCorrupt("stream ids exhausted")
        txn.put(_NEXT_ID_KEY, _U64.pack(stream_id + 1), db=self._store)
        meta = _Meta(id=stream_id, policy=policy, next_seq=1, first_seq=1, count=0, total_bytes=0)
        self._put_meta(txn, name, meta)
        logger.info("created stream %s (id %d)", name, stream_id)
        return meta

    def create_stream(
        self, stream: StreamName | str, policy: RetentionPolicy | None = None
    ) -> StreamStats:
        """Create ``stream`` if missing; set its policy when one is given."""
        name = stream_name(stream)
        policy = None if policy is None else policy.validate()
        with self._env.begin(write=True) as txn:
            meta = self._get_meta(txn, name)
            if meta is None:
                meta = self._create(txn, name, policy or self.default_policy)
            elif policy is not None and policy != meta.policy:
                meta.policy = policy
                self._put_meta(txn, name, meta)
            return _stats(name, meta)

    def streams(self) -> list[str]:
        with self._env.begin(db=self._streams) as txn:
            return [bytes(k).decode() for k in txn.cursor().iternext(keys=True, values=False)]

    def stats(self, stream: StreamName | str) -> StreamStats:
        name = stream_name(stream)
        with self._env.begin() as txn:
            return _stats(name, self._require_meta(txn, name))

    # -- produce / consume --------------------------------------------------------------

    def append_batch(self, stream: StreamName | str, events: Sequence[NewEvent]) -> tuple[int, int]:
        """Append ``events`` in one transaction; return their (first_seq, last_seq).

        The stream is created with the default policy if it does not exist. The whole
        batch is validated first: one bad event refuses the batch. An empty batch
        returns ``(next_seq, next_seq - 1)``.
        """
        name = stream_name(stream)
        batch = validate_batch(events, self.max_event_bytes)
        with self._env.begin(write=True) as txn:
            meta = self._get_meta(txn, name) or self._create(txn, name, self.default_policy)
            first = meta.next_seq
            sid = meta.id
            pack_key = _EVENT_KEY.pack
            items = [
                (pack_key(sid, first + i), encode_event(first + i, e)) for i, e in enumerate(batch)
            ]
            if items:
                cursor = txn.cursor(db=self._events)
                cursor.putmulti(items, dupdata=False, overwrite=True, append=_is_last(cursor, sid))
                meta.total_bytes += sum(len(v) for _, v in items)
                meta.next_seq += len(items)
                meta.count += len(items)
                self._put_meta(txn, name, meta)
        return first, first + len(batch) - 1

    def read(
        self,
        stream: StreamName | str,
        after_seq: int = 0,
        limit: int = DEFAULT_READ_LIMIT,
        max_bytes: int = DEFAULT_READ_MAX_BYTES,
    ) -> list[Event]:
        """Events with sequence > ``after_seq``, oldest first: at most ``limit`` events and
        about ``max_bytes`` encoded bytes (at least one event when any follows). A gap
        between ``after_seq`` and the first event returned means retention dropped it."""
        name = stream_name(stream)
        _check_seq("after_seq", after_seq)
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
            raise StreamError("invalid_read", f"read limit must be an integer >= 1, got {limit!r}")
        if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
            raise StreamError("invalid_read", f"read max_bytes must be >= 1, got {max_bytes!r}")
        with self._env.begin() as txn:
            meta = self._require_meta(txn, name)
            return list(self._scan(txn, meta, after_seq, limit, max_bytes))

    def _scan(
        self, txn: Any, meta: _Meta, after_seq: int, limit: int, max_bytes: int
    ) -> Iterator[Event]:
        start = max(after_seq + 1, meta.first_seq)
        if start >= meta.next_seq:
            return
        cursor = txn.cursor(db=self._events)
        if not cursor.set_key(_EVENT_KEY.pack(meta.id, start)):
            raise StreamStoreCorrupt(f"event {start} of stream id {meta.id} is missing")
        size = 0
        for n, (key, raw) in enumerate(cursor):
            sid, seq = _EVENT_KEY.unpack(key)
            if sid != meta.id:
                break
            size += len(raw)
            if n >= limit or (n > 0 and size > max_bytes):
                break
            event = decode_event(raw)
            if event.seq != seq:
                raise StreamStoreCorrupt(f"event under sequence {seq} says {event.seq}")
            yield event

    # -- consumer offsets ---------------------------------------------------------------

    def commit_offset(self, stream: StreamName | str, consumer: str, seq: int) -> None:
        """Record that ``consumer`` has processed ``stream`` up to ``seq`` (may rewind)."""
        name = stream_name(stream)
        key_tail = _consumer_key(consumer)
        _check_seq("seq", seq)
        with self._env.begin(write=True) as txn:
            meta = self._require_meta(txn, name)
            if seq >= meta.next_seq:
                raise OffsetOutOfRange(
                    f"offset {seq} is beyond the last sequence {meta.next_seq - 1} of {name}"
                )
            txn.put(_STREAM_ID.pack(meta.id) + key_tail, _U64.pack(seq), db=self._offsets)

    def offset(self, stream: StreamName | str, consumer: str) -> int:
        """The committed offset of ``consumer`` (0 when it never committed)."""
        name = stream_name(stream)
        key_tail = _consumer_key(consumer)
        with self._env.begin() as txn:
            meta = self._require_meta(txn, name)
            raw = txn.get(_STREAM_ID.pack(meta.id) + key_tail, db=self._offsets)
        if raw is None:
            return 0
        if len(raw) != _U64.size:
            raise StreamStoreCorrupt(f"offset of {consumer!r} on {name} is not a u64")
        return int(_U64.unpack(raw)[0])

    # -- retention ----------------------------------------------------------------------

    def apply_retention(self, stream: StreamName | str, now: float) -> RetentionResult:
        """Drop the oldest events beyond the stream's policy at ``now``; count them."""
        name = stream_name(stream)
        with self._env.begin(write=True) as txn:
            meta = self._require_meta(txn, name)
            if meta.count == 0:
                return RetentionResult(0, 0, 0)
            cursor = txn.cursor(db=self._events)

            def oldest() -> Iterator[tuple[float, int]]:
                if not cursor.set_key(_EVENT_KEY.pack(meta.id, meta.first_seq)):
                    raise StreamStoreCorrupt(f"first event of {name} is missing")
                for key, raw in cursor:
                    if _EVENT_KEY.unpack(key)[0] != meta.id:
                        return
                    yield event_time(raw), len(raw)

            plan = plan_retention(meta.policy, meta.total_bytes, oldest(), now)
            if plan.drop_events == 0:
                return RetentionResult(0, 0, 0)
            cursor.set_key(_EVENT_KEY.pack(meta.id, meta.first_seq))
            for _ in range(plan.drop_events):
                cursor.delete()
            last_dropped = meta.first_seq + plan.drop_events - 1
            unforwarded = max(0, last_dropped - max(meta.forward_seq, meta.first_seq - 1))
            meta.first_seq += plan.drop_events
            meta.count -= plan.drop_events
            meta.total_bytes -= plan.drop_bytes
            meta.dropped_events += plan.drop_events
            meta.dropped_bytes += plan.drop_bytes
            meta.dropped_unforwarded += unforwarded
            self._put_meta(txn, name, meta)
        logger.warning(
            "retention dropped %d events (%d bytes, %d not yet forwarded) from %s",
            plan.drop_events,
            plan.drop_bytes,
            unforwarded,
            name,
        )
        return RetentionResult(plan.drop_events, plan.drop_bytes, unforwarded)

    # -- store and forward --------------------------------------------------------------

    def forward_position(self, stream: StreamName | str) -> int:
        """The last sequence the hub acknowledged (0 when none)."""
        return self.stats(stream).forward_seq

    def set_forward_position(self, stream: StreamName | str, seq: int) -> int:
        """Advance the forward position to ``seq``; a stale (lower) ack is ignored.
        Returns the position now stored."""
        name = stream_name(stream)
        _check_seq("seq", seq)
        with self._env.begin(write=True) as txn:
            meta = self._require_meta(txn, name)
            if seq >= meta.next_seq:
                raise OffsetOutOfRange(
                    f"forward position {seq} is beyond the last sequence "
                    f"{meta.next_seq - 1} of {name}"
                )
            if seq > meta.forward_seq:
                meta.forward_seq = seq
                self._put_meta(txn, name, meta)
            return meta.forward_seq

    def pending_forward(
        self,
        stream: StreamName | str,
        limit: int = DEFAULT_READ_LIMIT,
        max_bytes: int = DEFAULT_READ_MAX_BYTES,
    ) -> list[Event]:
        """The next events the hub has not acknowledged, oldest first."""
        name = stream_name(stream)
        with self._env.begin() as txn:
            meta = self._require_meta(txn, name)
            return list(self._scan(txn, meta, meta.forward_seq, limit, max_bytes))


def _stats(name: StreamName, meta: _Meta) -> StreamStats:
    return StreamStats(
        stream=str(name),
        first_seq=meta.first_seq,
        last_seq=meta.next_seq - 1,
        count=meta.count,
        total_bytes=meta.total_bytes,
        dropped_events=meta.dropped_events,
        dropped_bytes=meta.dropped_bytes,
        dropped_unforwarded=meta.dropped_unforwarded,
        forward_seq=meta.forward_seq,
        policy=meta.policy,
    )


def _is_last(cursor: Any, stream_id: int) -> bool:
    """Whether the stream's keys sort after every key in the events db (append mode)."""
    if not cursor.last():
        return True
    return bool(_EVENT_KEY.unpack(cursor.key())[0] <= stream_id)


def _check_seq(label: str, seq: object) -> None:
    if isinstance(seq, bool) or not isinstance(seq, int) or not 0 <= seq < 1 << 64:
        raise StreamError("invalid_sequence", f"{label} must be an integer >= 0, got {seq!r}")


def _consumer_key(consumer: object) -> bytes:
    if not isinstance(consumer, str) or SEGMENT_RE.fullmatch(consumer) is None:
        raise StreamError(
            "invalid_consumer", f"consumer name {consumer!r} is invalid: it must be {SEGMENT_RULE}"
        )
    return consumer.encode()
