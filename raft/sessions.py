"""Client sessions: a write proposed twice is applied once (Raft dissertation, 6.3).

A ``Session`` operation makes the operations after it request ``seq`` of a client. The
state machine keeps, per client, the last request's number and results in the reserved
table ``SESSIONS_TABLE``; a request proposed again (the proposer lost its answer in a
leader change and resent it) gets those results and changes nothing. Only the last
result is kept: a client has one request outstanding at a time.

Sessions expire through the log alone, identically on every member: one not used for
``SESSION_TTL_ENTRIES`` log entries, or the least recently used once more than
``MAX_SESSIONS`` exist, is dropped. Whether a session without a record is new or
expired is told by its ``floor`` (an applied index its client saw before its first
request, so every record it ever had is later) against the ``watermark``, the latest
index of any dropped record: a floor below it may have lost its record, and its request
is refused (``SESSION_EXPIRED``) rather than risk applying it twice.

The table (keys):
    ``c`` client -> seq:u64 last_index:u64 position:u64 results   (results: ``encode_results``)
    ``q`` position:u64 -> client          sessions by last use (positions left behind are holes)
    ``m``          -> head:u64 tail:u64 count:u64 watermark:u64

Its records count in the logical size of the state, but never make a write refused
(a delete must still make room when the state is full): ``MAX_SESSIONS`` bounds them.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Sequence
from dataclasses import dataclass

SESSIONS_TABLE = "__sessions__"
MAX_SESSIONS = 32768
SESSION_TTL_ENTRIES = 1_000_000
# Dropped by age per request at most: the work of one entry stays bounded.
_MAX_AGE_DROPS = 4

SESSION_EXPIRED = "session_expired"
SESSION_STALE = "session_stale"
BAD_SESSION = "bad_session"
SESSION_REFUSALS = frozenset({SESSION_EXPIRED, SESSION_STALE, BAD_SESSION})

_RECORD = struct.Struct(">QQQ")
_META = struct.Struct(">QQQQ")
_POSITION = struct.Struct(">Q")
_RESULT = struct.Struct(">BQQB")
_OK = 1
_EXISTED = 2
_META_KEY = b"m"


@dataclass(frozen=True, slots=True)
class StoredResult:
    """An ``OpResult``'s fields as a session record keeps them."""

    ok: bool
    index: int
    existed: bool
    error: str | None
    current_index: int


@dataclass(frozen=True, slots=True)
class SessionRecord:
    seq: int
    last_index: int
    position: int
    encoded_results: bytes  # ``encode_results``: decoded only for a duplicate

    @property
    def results(self) -> tuple[StoredResult, ...]:
        return decode_results(self.encoded_results)


def encode_results(results: Sequence[StoredResult]) -> bytes:
    parts = []
    for r in results:
        error = (r.error or "").encode()[:255]
        flags = (_OK if r.ok else 0) | (_EXISTED if r.existed else 0)
        parts.append(_RESULT.pack(flags, r.index, r.current_index, len(error)) + error)
    return b"".join(parts)


def decode_results(raw: bytes) -> tuple[StoredResult, ...]:
    results = []
    pos = 0
    while pos < len(raw):
        flags, index, current, error_len = _RESULT.unpack_from(raw, pos)
        pos += _RESULT.size
        error = raw[pos : pos + error_len].decode() if error_len else None
        pos += error_len
        ok, existed = bool(flags & _OK), bool(flags & _EXISTED)
        results.append(StoredResult(ok, index, existed, error, current))
    return tuple(results)


def encode_record(record: SessionRecord) -> bytes:
    return _RECORD.pack(record.seq, record.last_index, record.position) + record.encoded_results


def decode_record(raw: bytes) -> SessionRecord:
    seq, last_index, position = _RECORD.unpack_from(raw)
    return SessionRecord(seq, last_index, position, bytes(raw[_RECORD.size :]))


def client_key(client: bytes) -> bytes:
    return b"c" + client


def _queue_key(position: int) -> bytes:
    return b"q" + _POSITION.pack(position)


@dataclass(frozen=True, slots=True)
class ClientRequest:
    """Who proposes: request ``seq`` of the session ``client``, begun at ``floor``."""

    client: bytes
    seq: int
    floor: int


# The session table as the state machine sees it within an entry: read a key (its
# pending writes included) and write one (None deletes).
Get = Callable[[bytes], bytes | None]
Set = Callable[[bytes, bytes | None], None]


@dataclass(frozen=True, slots=True)
class Lookup:
    """What the state holds for a request: its client's record (None: no live session)
    and, for a request that is not to be applied, the error or the earlier results."""

    record: SessionRecord | None
    error: str | None = None
    duplicate: tuple[StoredResult, ...] | None = None


class Sessions:
    """The session table's bookkeeping for one entry at log index ``index``."""

    def __init__(self, index: int, get: Get, put: Set) -> None:
        self.index = index
        self._get = get
        self._put = put
        raw = get(_META_KEY)
        head, tail, count, watermark = _META.unpack(raw) if raw else (0, 0, 0, 0)
        self.head, self.tail, self.count, self.watermark = head, tail, count, watermark

    def lookup(self, client: bytes, seq: int, floor: int) -> Lookup:
        """Decide request ``seq`` of ``client`` (applied first, if neither error nor
        duplicate is set)."""
        if floor >= self.index:
            return Lookup(None, BAD_SESSION)
        raw = self._get(client_key(client))
        record = None if raw is None else decode_record(raw)
        if record is not None and self.index - record.last_index > SESSION_TTL_ENTRIES:
            self._drop(client, record)
            record = None
        if record is None:
            if floor < self.watermark:
                return Lookup(None, SESSION_EXPIRED)
            return Lookup(None)
        if seq == record.seq:
            return Lookup(record, duplicate=record.results)
        if seq < record.seq:
            return Lookup(record, SESSION_STALE)
        return Lookup(record)

    def store(
        self, client: bytes, seq: int, record: SessionRecord | None, results: Sequence[StoredResult]
    ) -> None:
        """Record ``results`` as the answer to request ``seq`` (or refresh the record of a
        duplicate), make it the most recently used, then drop what is too old or too many."""
        if record is not None:
            self._put(_queue_key(record.position), None)
        else:
            self.count += 1
        position = self.tail
        self.tail += 1
        self._put(_queue_key(position), client)
        new = SessionRecord(seq, self.index, position, encode_results(results))
        self._put(client_key(client), encode_record(new))
        self._evict(client)
        self._save_meta()

    def _save_meta(self) -> None:
        self._put(_META_KEY, _META.pack(self.head, self.tail, self.count, self.watermark))

    def _evict(self, keep: bytes) -> None:
        aged = 0
        while self.head < self.tail:
            client = self._get(_queue_key(self.head))
            if client is None:  # a hole: that session was used again since
                self.head += 1
                continue
            if client == keep:
                return
            raw = self._get(client_key(client))
            record = None if raw is None else decode_record(raw)
            if record is None or record.position != self.head:
                self._put(_queue_key(self.head), None)
                self.head += 1
                continue
            too_many = self.count > MAX_SESSIONS
            too_old = self.index - record.last_index > SESSION_TTL_ENTRIES
            if not too_many and not (too_old and aged < _MAX_AGE_DROPS):
                return
            aged += not too_many
            self._drop(client, record)

    def _drop(self, client: bytes, record: SessionRecord) -> None:
        self._put(client_key(client), None)
        self._put(_queue_key(record.position), None)
        if record.position == self.head:
            self.head += 1
        self.count -= 1
        self.watermark = max(self.watermark, record.last_index)
        self._save_meta()


class SessionPool:
    """Sessions for a proposer's own anonymous requests, reused one request at a time.

    A request nobody named still goes through a session, so that resending it is safe;
    a new session per request would add a session record per write and make the table
    turn over every ``MAX_SESSIONS`` writes (each turn dropping the least recently used,
    a named client's too). A pooled session takes the next number for each request;
    ``give_back`` once its request is answered, whatever the answer (a late copy of an
    answered request is then refused as stale), except when the state refused it as
    expired: take a ``fresh`` one instead. ``new_client`` makes a client id, ``floor`` a
    new session's floor (the commit index the proposer knows)."""

    def __init__(
        self, new_client: Callable[[], bytes], floor: Callable[[], int], max_idle: int = 256
    ) -> None:
        self._new_client = new_client
        self._floor = floor
        self._max_idle = max_idle
        self._idle: list[ClientRequest] = []  # the last request of each idle session

    def take(self) -> ClientRequest:
        if self._idle:
            last = self._idle.pop()
            return ClientRequest(last.client, last.seq + 1, last.floor)
        return self.fresh()

    def give_back(self, request: ClientRequest) -> None:
        if len(self._idle) < self._max_idle:
            self._idle.append(request)

    def fresh(self) -> ClientRequest:
        """The first request of a new session (the one taken was refused as expired: it is
        not given back)."""
        return ClientRequest(self._new_client(), 1, self._floor())

    @property
    def idle(self) -> int:
        return len(self._idle)
