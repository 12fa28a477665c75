"""Event streams: names, the event record, retention policy and planner (pure).

A stream is a durable, append-only sequence of events scoped to a tenant and an
application, named ``tenant/app/name``. Every host keeps the site's streams in LMDB
(replicated by Raft: ``meshorch.streams.site``), so applications at a site have a local
event bus that keeps accepting events while the site is cut off from the hub; a per-stream
retention policy (size and age) bounds what is kept, and whatever retention drops
is counted and reported, never silent.

Nothing here does I/O or reads a clock: times are passed in (``now``, ``time_s``).

Exceptions::

    MeshorchError
    ├── RemoteInputError
    │   └── StreamError                 a bad stream request; ``code`` is a stable tag
    │       ├── InvalidStreamName       invalid_stream_name
    │       ├── MalformedEvent          malformed_event / batch_too_large
    │       ├── EventTooLarge           event_too_large
    │       ├── UnknownStream           unknown_stream
    │       └── OffsetOutOfRange        offset_out_of_range
    └── ServiceError
        └── StreamStoreCorrupt          corrupt_store: stored data that cannot be decoded
"""

from __future__ import annotations

import math
import re
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from meshorch.errors import ConfigurationError, RemoteInputError, ServiceError

# -- errors -------------------------------------------------------------------------------


class StreamError(RemoteInputError):
    """A stream request that cannot be served; ``code`` says why."""


class InvalidStreamName(StreamError):
    def __init__(self, message: str) -> None:
        super().__init__("invalid_stream_name", message)


class MalformedEvent(StreamError):
    def __init__(self, message: str, code: str = "malformed_event") -> None:
        super().__init__(code, message)


class EventTooLarge(StreamError):
    def __init__(self, message: str) -> None:
        super().__init__("event_too_large", message)


class UnknownStream(StreamError):
    def __init__(self, message: str) -> None:
        super().__init__("unknown_stream", message)


class OffsetOutOfRange(StreamError):
    def __init__(self, message: str) -> None:
        super().__init__("offset_out_of_range", message)


class StreamStoreCorrupt(ServiceError):
    """Data in the stream store that cannot be decoded (never silently ignored)."""

    code = "corrupt_store"


# -- names --------------------------------------------------------------------------------

SEGMENT_RE = re.compile(r"[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?")
SEGMENT_RULE = "1-63 of a-z, 0-9, '-', no '-' at either end"


@dataclass(frozen=True, slots=True)
class StreamName:
    """``tenant/app/name``; every segment follows ``SEGMENT_RULE``."""

    tenant: str
    app: str
    name: str

    def __post_init__(self) -> None:
        for label, value in (("tenant", self.tenant), ("app", self.app), ("name", self.name)):
            if not isinstance(value, str) or SEGMENT_RE.fullmatch(value) is None:
                raise InvalidStreamName(
                    f"stream {label} {value!r} is invalid: it must be {SEGMENT_RULE}"
                )

    @classmethod
    def parse(cls, text: object) -> StreamName:
        if not isinstance(text, str):
            raise InvalidStreamName(
                f"a stream name must be a string 'tenant/app/name', got {type(text).__name__}"
            )
        parts = text.split("/")
        if len(parts) != 3:
            raise InvalidStreamName(
                f"stream name {text!r} must have exactly three parts: 'tenant/app/name'"
            )
        return cls(parts[0], parts[1], parts[2])

    def __str__(self) -> str:
        return f"{self.tenant}/{self.app}/{self.name}"


def stream_name(value: StreamName | str) -> StreamName:
    return value if isinstance(value, StreamName) else StreamName.parse(value)


# -- events -------------------------------------------------------------------------------

MAX_EVENT_BYTES = 256 * 1024
"""Largest encoded event (header, key and payload) a stream accepts."""
MAX_KEY_BYTES = 1024
MAX_BATCH_EVENTS = 10_000
MAX_LEVEL = 255

EVENT_VERSION = 1
# version u8, flags u8, seq u64, time_s f64, level u8, key length u16, payload length u32
_HEADER = struct.Struct(">BBQdBHI")
HEADER_BYTES = _HEADER.size
_FLAG_KEY = 1
_FLAG_LEVEL = 2


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event as a producer sends it (no sequence yet)."""

    payload: bytes
    time_s: float
    key: bytes | None = None
    level: int | None = None

    def encoded_size(self) -> int:
        return HEADER_BYTES + len(self.payload) + (0 if self.key is None else len(self.key))


@dataclass(frozen=True, slots=True)
class Event:
    """A stored event: its sequence in the stream, producer time, optional key/level."""

    seq: int
    time_s: float
    payload: bytes
    key: bytes | None = None
    level: int | None = None

    def encoded_size(self) -> int:
        return HEADER_BYTES + len(self.payload) + (0 if self.key is None else len(self.key))


def validate_event(event: object, max_event_bytes: int = MAX_EVENT_BYTES) -> NewEvent:
    """Check a produced event; raise ``MalformedEvent`` or ``EventTooLarge``."""
    if not isinstance(event, NewEvent):
        raise MalformedEvent(f"an event must be a NewEvent, got {type(event).__name__}")
    if not isinstance(event.payload, bytes):
        raise MalformedEvent(f"event payload must be bytes, got {type(event.payload).__name__}")
    t = event.time_s
    if isinstance(t, bool) or not isinstance(t, int | float) or not math.isfinite(t) or t < 0:
        raise MalformedEvent(f"event time_s must be a finite number >= 0, got {t!r}")
    if event.key is not None:
        if not isinstance(event.key, bytes):
            raise MalformedEvent(f"event key must be bytes, got {type(event.key).__name__}")
        if len(event.key) > MAX_KEY_BYTES:
            raise MalformedEvent(
                f"event key is {len(event.key)} bytes; the limit is {MAX_KEY_BYTES}"
            )
    lv = event.level
    if lv is not None and (isinstance(lv, bool) or not isinstance(lv, int) or not 0 <= lv <= 255):
        raise MalformedEvent(f"event level must be an integer 0-{MAX_LEVEL}, got {lv!r}")
    size = event.encoded_size()
    if size > max_event_bytes:
        raise EventTooLarge(f"event is {size} bytes encoded; the limit is {max_event_bytes} bytes")
    return event


def validate_batch(events: object, max_event_bytes: int = MAX_EVENT_BYTES) -> list[NewEvent]:
    if not isinstance(events, list | tuple):
        raise MalformedEvent(f"a batch must be a list of events, got {type(events).__name__}")
    if len(events) > MAX_BATCH_EVENTS:
        raise MalformedEvent(
            f"a batch holds at most {MAX_BATCH_EVENTS} events, got {len(events)}",
            code="batch_too_large",
        )
    return [validate_event(e, max_event_bytes) for e in events]


def encode_event(seq: int, event: NewEvent) -> bytes:
    """The storage form of an event (validated beforehand by ``validate_event``)."""
    key = event.key
    flags = (0 if key is None else _FLAG_KEY) | (0 if event.level is None else _FLAG_LEVEL)
    header = _HEADER.pack(
        EVENT_VERSION,
        flags,
        seq,
        float(event.time_s),
        0 if event.level is None else event.level,
        0 if key is None else len(key),
        len(event.payload),
    )
    if key is None:
        return header + event.payload
    return header + key + event.payload


def decode_event(raw: bytes) -> Event:
    """Parse a stored event; raise ``StreamStoreCorrupt`` on anything unexpected."""
    if len(raw) < HEADER_BYTES:
        raise StreamStoreCorrupt(f"stored event is {len(raw)} bytes, shorter than its header")
    version, flags, seq, time_s, level, key_len, payload_len = _HEADER.unpack_from(raw)
    if version != EVENT_VERSION:
        raise StreamStoreCorrupt(f"stored event has unknown version {version}")
    if HEADER_BYTES + key_len + payload_len != len(raw):
        raise StreamStoreCorrupt(f"stored event {seq} has inconsistent lengths")
    key = bytes(raw[HEADER_BYTES : HEADER_BYTES + key_len]) if flags & _FLAG_KEY else None
    payload = bytes(raw[HEADER_BYTES + key_len :])
    return Event(seq, time_s, payload, key, level if flags & _FLAG_LEVEL else None)


def event_time(raw: bytes) -> float:
    """The producer time of a stored event without decoding the rest."""
    if len(raw) < HEADER_BYTES:
        raise StreamStoreCorrupt(f"stored event is {len(raw)} bytes, shorter than its header")
    return float(_HEADER.unpack_from(raw)[3])


# -- retention ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RetentionPolicy:
    """Bounds on what a stream keeps. ``None`` means no bound on that axis."""

    max_bytes: int | None = 256 * 1024 * 1024
    max_age_s: float | None = 7 * 24 * 3600.0

    def validate(self) -> RetentionPolicy:
        if self.max_bytes is not None and (
            isinstance(self.max_bytes, bool)
            or not isinstance(self.max_bytes, int)
            or self.max_bytes < MAX_EVENT_BYTES
        ):
            raise ConfigurationError(
                f"retention max_bytes must be an integer >= {MAX_EVENT_BYTES} (one largest "
                f"event) or None, got {self.max_bytes!r}"
            )
        if self.max_age_s is not None and (
            isinstance(self.max_age_s, bool)
            or not isinstance(self.max_age_s, int | float)
            or not math.isfinite(self.max_age_s)
            or self.max_age_s <= 0
        ):
            raise ConfigurationError(
                f"retention max_age_s must be a positive number of seconds or None, "
                f"got {self.max_age_s!r}"
            )
        return self

    def to_json(self) -> dict[str, object]:
        return {"max_bytes": self.max_bytes, "max_age_s": self.max_age_s}

    @classmethod
    def from_json(cls, data: object) -> RetentionPolicy:
        if not isinstance(data, dict) or set(data) != {"max_bytes", "max_age_s"}:
            raise ConfigurationError(f"retention policy must be {{max_bytes, max_age_s}}: {data!r}")
        max_bytes, max_age_s = data["max_bytes"], data["max_age_s"]
        if max_bytes is not None and not isinstance(max_bytes, int):
            raise ConfigurationError(f"retention max_bytes must be an integer: {max_bytes!r}")
        if max_age_s is not None and not isinstance(max_age_s, int | float):
            raise ConfigurationError(f"retention max_age_s must be a number: {max_age_s!r}")
        return cls(max_bytes, None if max_age_s is None else float(max_age_s)).validate()


@dataclass(frozen=True, slots=True)
class RetentionPlan:
    drop_events: int
    drop_bytes: int


def plan_retention(
    policy: RetentionPolicy,
    total_bytes: int,
    oldest_first: Iterable[tuple[float, int]],
    now: float,
) -> RetentionPlan:
    """How many of the oldest events to drop so the stream fits ``policy`` at ``now``.

    ``oldest_first`` yields ``(time_s, encoded_size)`` of the stream's events from the
    oldest; it is consumed lazily and only as far as needed. Events are dropped oldest
    first while the stream is over ``max_bytes`` or the event is older than
    ``max_age_s``; the first event that is within both bounds stops the plan (events are
    dropped in sequence order, so a late-stamped old event shields newer ones).
    """
    cutoff = None if policy.max_age_s is None else now - policy.max_age_s
    remaining = total_bytes
    drop_events = 0
    drop_bytes = 0
    for time_s, size in oldest_first:
        over_size = policy.max_bytes is not None and remaining > policy.max_bytes
        too_old = cutoff is not None and time_s < cutoff
        if not (over_size or too_old):
            break
        drop_events += 1
        drop_bytes += size
        remaining -= size
    return RetentionPlan(drop_events, drop_bytes)


# -- chunks -------------------------------------------------------------------------------
# A chunk is one producer batch as replicated and forwarded: the host it was produced
# on, then its events back to back in the storage form (their header seq is the
# position in the chunk; the stream sequence is the chunk's first number + position).

CHUNK_VERSION = 1
# version u8, host length u8, event count u32, newest event time f64
_CHUNK_HEADER = struct.Struct(">BBId")
CHUNK_HEADER_BYTES = _CHUNK_HEADER.size
MAX_CHUNK_BYTES = 768 * 1024
"""Producer batches are cut into chunks of at most this size (one Raft value each)."""
MAX_HOST_BYTES = 255


@dataclass(frozen=True, slots=True)
class ChunkInfo:
    host: str
    count: int
    newest_time_s: float
    size: int


def split_chunks(
    events: Sequence[NewEvent], max_bytes: int = MAX_CHUNK_BYTES
) -> list[list[NewEvent]]:
    """Cut a validated batch into runs whose chunk stays within ``max_bytes``."""
    runs: list[list[NewEvent]] = []
    run: list[NewEvent] = []
    size = CHUNK_HEADER_BYTES + MAX_HOST_BYTES
    for event in events:
        event_size = event.encoded_size()
        if run and size + event_size > max_bytes:
            runs.append(run)
            run, size = [], CHUNK_HEADER_BYTES + MAX_HOST_BYTES
        run.append(event)
        size += event_size
    if run:
        runs.append(run)
    return runs


def encode_chunk(host: str, events: Sequence[NewEvent]) -> bytes:
    host_raw = host.encode()
    if not host_raw or len(host_raw) > MAX_HOST_BYTES:
        raise MalformedEvent(f"a chunk's host must be 1-{MAX_HOST_BYTES} bytes, got {host!r}")
    if not events:
        raise MalformedEvent("a chunk holds at least one event")
    newest = max(float(e.time_s) for e in events)
    parts = [_CHUNK_HEADER.pack(CHUNK_VERSION, len(host_raw), len(events), newest), host_raw]
    parts.extend(encode_event(i, e) for i, e in enumerate(events))
    return b"".join(parts)


def chunk_info(raw: bytes) -> ChunkInfo:
    """The header of a chunk; ``StreamStoreCorrupt`` if it is not one."""
    if len(raw) < CHUNK_HEADER_BYTES:
        raise StreamStoreCorrupt(f"chunk is {len(raw)} bytes, shorter than its header")
    version, host_len, count, newest = _CHUNK_HEADER.unpack_from(raw)
    if version != CHUNK_VERSION or count < 1 or not math.isfinite(newest):
        raise StreamStoreCorrupt(f"chunk header is invalid (version {version}, {count} events)")
    host_raw = raw[CHUNK_HEADER_BYTES : CHUNK_HEADER_BYTES + host_len]
    try:
        host = bytes(host_raw).decode()
    except UnicodeDecodeError as exc:
        raise StreamStoreCorrupt("chunk host is not UTF-8") from exc
    if len(host_raw) != host_len or not host:
        raise StreamStoreCorrupt("chunk host is truncated or empty")
    return ChunkInfo(host, int(count), float(newest), len(raw))


def decode_chunk(first_seq: int, raw: bytes) -> tuple[ChunkInfo, list[Event]]:
    """The events of a chunk stored at ``first_seq``; ``StreamStoreCorrupt`` on garbage."""
    info = chunk_info(raw)
    pos = CHUNK_HEADER_BYTES + len(info.host.encode())
    events: list[Event] = []
    for position in range(info.count):
        if len(raw) - pos < HEADER_BYTES:
            raise StreamStoreCorrupt(f"chunk at {first_seq} is truncated at event {position}")
        key_len, payload_len = _HEADER.unpack_from(raw, pos)[5:7]
        end = pos + HEADER_BYTES + key_len + payload_len
        if end > len(raw):
            raise StreamStoreCorrupt(f"chunk at {first_seq} is truncated at event {position}")
        event = decode_event(bytes(raw[pos:end]))
        if event.seq != position:
            raise StreamStoreCorrupt(f"chunk at {first_seq} has event {event.seq} at {position}")
        events.append(
            Event(first_seq + position, event.time_s, event.payload, event.key, event.level)
        )
        pos = end
    if pos != len(raw):
        raise StreamStoreCorrupt(f"chunk at {first_seq} has trailing bytes")
    return info, events
