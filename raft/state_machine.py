"""The pure state machine: a committed command in, the writes it makes out.

No disk, no clock, no threads: ``apply_command`` reads the current state
through a callable and returns the writes for the adapter to store (the LMDB
view) plus one result per operation for the proposer. The same committed log
therefore gives the same state on every host, and this module is tested
without pysyncobj.

The state budget. The state has a *logical size*: the sum of ``record_cost``
(key and value bytes plus ``RECORD_OVERHEAD``) over every stored record. It is a
function of the state alone, so every member computes the same number at the
same log index whatever its disk, page size or map size (the view keeps it up
to date with each entry and recounts it from the records when it has none).
Given ``max_bytes``, writes that would take the state past it are refused with
the result ``"no_space"``:

* the unit refused is an unguarded operation, or a ``Guard`` together with the
  operations it counts (which must all happen or none): every operation of a
  refused unit reports ``"no_space"`` and none of its writes is made;
* a unit is refused only if it grows the state (its writes add more bytes than
  they free) and the size after it, counting the units of the entry before it,
  exceeds ``max_bytes``; deletes and shrinking writes therefore always apply,
  even over budget, which is how space is made again;
* a ``Session`` and the operations it counts are one unit too; the session records
  (``raft.sessions``) count in the size but never make a unit refused (they are
  bounded by ``MAX_SESSIONS``), and are undone with a refused unit;
* the entry itself is applied like any other: its index advances and its
  results are recorded.

An entry that could not reach ``max_bytes`` even if each of its writes added a new
record (``growth_bound``) refuses nothing, and skips the accounting.

The outcome depends only on the log (the state before the entry, the entry)
and ``max_bytes``, which like ``tables`` must be the same on every member. The
physical size of the LMDB view never decides a result: the view grows its map
well ahead of the budget, and a member whose map still cannot hold an entry
stops (``ViewFullError``) rather than answer differently from the others.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from raft.commands import Append, Barrier, Delete, Guard, Put, Session, decode_batch
from raft.errors import CommandDecodeError
from raft.sessions import BAD_SESSION, SESSIONS_TABLE, SessionRecord, Sessions, StoredResult

logger = logging.getLogger(__name__)

_RECORD_HEAD = struct.Struct(">Q")
RECORD_HEAD_BYTES = _RECORD_HEAD.size
# An append counter: the next number of the sequence and the bytes appended so far.
_COUNTER = struct.Struct(">QQ")
_ITEM_NUMBER = struct.Struct(">Q")

# What a record costs against the state budget besides its key and value: its log
# index and the storage engine's bookkeeping (about what LMDB spends per record).
RECORD_OVERHEAD = 64
NO_SPACE = "no_space"


@dataclass(frozen=True, slots=True)
class Record:
    """A stored value and the log index that last modified it."""

    mod_index: int
    value: bytes

    def encode(self) -> bytes:
        return _RECORD_HEAD.pack(self.mod_index) + self.value

    @staticmethod
    def decode(raw: bytes) -> Record:
        (mod_index,) = _RECORD_HEAD.unpack_from(raw)
        return Record(mod_index, bytes(raw[_RECORD_HEAD.size :]))


@dataclass(frozen=True, slots=True)
class Write:
    """Store ``record`` under (table, key); ``None`` deletes the key."""

    table: str
    key: bytes
    record: Record | None


@dataclass(frozen=True, slots=True)
class OpResult:
    ok: bool
    index: int
    existed: bool = False
    error: str | None = None
    current_index: int = 0


@dataclass(frozen=True, slots=True)
class Applied:
    writes: tuple[Write, ...]
    results: tuple[OpResult, ...]


Reader = Callable[[str, bytes], Record | None]
# (the log index that last modified (table, key), the length of its value), or None
# if the key is absent.
StoredReader = Callable[[str, bytes], tuple[int, int] | None]
ValueReader = Callable[[str, bytes], bytes | None]
# The value stored at (table, key) without its index, or None if absent.


def record_cost(key_len: int, value_len: int) -> int:
    """What one record counts towards the logical size of the state."""
    return key_len + value_len + RECORD_OVERHEAD


# The most one operation adds besides its encoded key and value: an append stores two
# records (its item, under key + 8 bytes, and a 16-byte counter under key).
_MOST_PER_OP = 2 * RECORD_OVERHEAD + _ITEM_NUMBER.size + _COUNTER.size


def growth_bound(encoded_bytes: int, ops: int) -> int:
    """An upper bound of what ``ops`` operations encoded in ``encoded_bytes`` add to the
    logical size of the state: each key and value is in the encoding, an append's key
    counts twice."""
    return 2 * encoded_bytes + ops * _MOST_PER_OP


def decode_counter(value: bytes | None) -> tuple[int, int]:
    """(next number, bytes appended) of an append counter's stored value."""
    if value is None:
        return 1, 0
    next_number, appended = _COUNTER.unpack(value)
    return int(next_number), int(appended)


def item_key(key: bytes, number: int) -> bytes:
    """Where an APPEND to the sequence at ``key`` stored item ``number``."""
    return key + _ITEM_NUMBER.pack(number)


def apply_command(
    payload: bytes,
    index: int,
    read: Reader,
    tables: Iterable[str],
    *,
    used_bytes: int = 0,
    max_bytes: int | None = None,
) -> Applied:
    """Apply the command committed at ``index``.

    Operations in one batch see the writes of the operations before them. A
    payload that does not decode changes nothing (it can only come from a newer
    or broken peer) and yields no results. ``used_bytes`` is the logical size of
    the state before the entry; with ``max_bytes`` the state budget applies (see
    the module's docstring).
    """

    def read_stored(table: str, key: bytes) -> tuple[int, int] | None:
        record = read(table, key)
        return None if record is None else (record.mod_index, len(record.value))

    def read_value(table: str, key: bytes) -> bytes | None:
        record = read(table, key)
        return None if record is None else record.value

    return apply_command_indexed(
        payload,
        index,
        read_stored,
        tables,
        read_value,
        used_bytes=used_bytes,
        max_bytes=max_bytes,
    )


def apply_command_indexed(
    payload: bytes,
    index: int,
    read_stored: StoredReader,
    tables: Iterable[str],
    read_value: ValueReader | None = None,
    *,
    used_bytes: int = 0,
    max_bytes: int | None = None,
) -> Applied:
    """``apply_command`` for adapters that can look up a key's index and value length
    without copying its value."""
    try:
        batch = decode_batch(payload)
    except CommandDecodeError as exc:
        logger.error("entry %d is not a valid command, skipped: %s", index, exc)
        return Applied((), ())
    known = frozenset(tables)
    # Far from the budget no unit can be refused: the accounting below is skipped.
    budgeted = max_bytes is not None and (
        used_bytes + growth_bound(len(payload), len(batch.ops)) > max_bytes
    )
    # Writes of this entry so far: the new value, or None for a deletion.
    pending: dict[tuple[str, bytes], bytes | None] = {}
    # (slot, whether it had a pending write, that write) for each write of the current
    # unit, to undo it.
    undo: list[tuple[tuple[str, bytes], bool, bytes | None]] = []
    # Results are immutable: the common ones are shared within the entry.
    created = OpResult(ok=True, index=index)
    replaced = OpResult(ok=True, index=index, existed=True)
    results: list[OpResult] = []
    append = results.append
    skip = 0  # operations left to skip after a failed guard
    grown = 0  # logical bytes added by the entry so far (negative: freed)
    # The current unit (see the module's docstring): operations [start, end).
    unit_start = unit_end = unit_grown = 0
    # Results replayed for the operations of a duplicate or refused session request, last first.
    replay: list[OpResult] = []
    # The session request being applied: (first position of its operations, end position,
    # client, seq, its record before).
    open_session: tuple[int, int, bytes, int, SessionRecord | None] | None = None

    def current(slot: tuple[str, bytes]) -> tuple[int | None, int | None]:
        """(index that last modified slot, length of its value): None, None if absent."""
        if slot in pending:
            value = pending[slot]
            return (None, None) if value is None else (index, len(value))
        found = read_stored(*slot)
        return (None, None) if found is None else found

    def budgeted_write(slot: tuple[str, bytes], value: bytes | None, old_len: int | None) -> None:
        nonlocal grown
        undo.append((slot, slot in pending, pending.get(slot)))
        pending[slot] = value
        if old_len is not None:
            grown -= record_cost(len(slot[1]), old_len)
        if value is not None:
            grown += record_cost(len(slot[1]), len(value))

    def plain_write(slot: tuple[str, bytes], value: bytes | None, _old_len: int | None) -> None:
        pending[slot] = value

    write = budgeted_write if budgeted else plain_write

    def session_get(key: bytes) -> bytes | None:
        slot = (SESSIONS_TABLE, key)
        if slot in pending:
            return pending[slot]
        return None if read_value is None else read_value(SESSIONS_TABLE, key)

    def session_put(key: bytes, value: bytes | None) -> None:
        slot = (SESSIONS_TABLE, key)
        if budgeted:  # undone with a refused unit, never counted towards refusing it
            undo.append((slot, slot in pending, pending.get(slot)))
        pending[slot] = value

    def close_session() -> None:
        """Record the results of the session request just applied (results and operations
        share positions)."""
        nonlocal open_session
        assert open_session is not None
        start, end, client, seq, record = open_session
        open_session = None
        stored = [
            StoredResult(r.ok, r.index, r.existed, r.error, r.current_index)
            for r in results[start:end]
        ]
        Sessions(index, session_get, session_put).store(client, seq, record, stored)

    def close_unit() -> None:
        """Refuse the unit just completed if it takes the state past the budget."""
        nonlocal grown
        if max_bytes is None or grown <= unit_grown or used_bytes + grown <= max_bytes:
            return
        while undo:
            slot, had, before = undo.pop()
            if had:
                pending[slot] = before
            else:
                del pending[slot]
        grown = unit_grown
        refused = OpResult(ok=False, index=index, error=NO_SPACE)
        results[unit_start:] = [refused] * (len(results) - unit_start)

    for position, op in enumerate(batch.ops):
        if open_session is not None and position >= open_session[1]:
            close_session()
        if budgeted and position >= unit_end:
            if position:
                close_unit()
            unit_start, unit_end, unit_grown = position, position + 1, grown
            undo.clear()
        if budgeted and isinstance(op, Guard | Session):
            unit_end = max(unit_end, position + 1 + op.count)
        if replay:
            append(replay.pop())
            continue
        if skip:
            skip -= 1
            append(OpResult(ok=False, index=index, error="guarded"))
            continue
        if isinstance(op, Barrier):
            append(created)
            continue
        if isinstance(op, Session):
            count = min(op.count, len(batch.ops) - position - 1)
            if read_value is None or open_session is not None:
                error = "unsupported" if read_value is None else BAD_SESSION
                refused = OpResult(ok=False, index=index, error=error)
                append(refused)
                replay = [refused] * count
                continue
            sessions = Sessions(index, session_get, session_put)
            found = sessions.lookup(op.client, op.seq, op.floor)
            if found.error is not None:
                refused = OpResult(ok=False, index=index, error=found.error)
                append(refused)
                replay = [refused] * count
            elif found.duplicate is not None:
                earlier = [
                    OpResult(r.ok, r.index, r.existed, r.error, r.current_index)
                    for r in found.duplicate
                ]
                if len(earlier) != count:  # the same number for another request
                    refused = OpResult(ok=False, index=index, error=BAD_SESSION)
                    append(refused)
                    replay = [refused] * count
                    continue
                append(OpResult(ok=True, index=index, existed=True))
                replay = earlier[::-1]
                sessions.store(op.client, op.seq, found.record, found.duplicate)
            else:
                append(created)
                open_session = (position + 1, position + 1 + count, op.client, op.seq, found.record)
            continue
        if op.table not in known:
            append(OpResult(ok=False, index=index, error="unknown_table"))
            if isinstance(op, Guard):
                skip = op.count
            continue
        slot = (op.table, op.key)
        before, old_len = current(slot)
        if isinstance(op, Append):
            if read_value is None:
                append(OpResult(ok=False, index=index, error="unsupported"))
                continue
            stored = pending[slot] if slot in pending else read_value(op.table, op.key)
            first, appended = decode_counter(stored)
            write(slot, _COUNTER.pack(first + op.count, appended + len(op.value)), old_len)
            item = (op.table, item_key(op.key, first))
            write(item, op.value, current(item)[1])
            append(OpResult(ok=True, index=index, existed=before is not None, current_index=first))
            continue
        if isinstance(op, Guard):
            if op.expect_index != (before or 0):
                skip = op.count
                append(
                    OpResult(
                        ok=False,
                        index=index,
                        existed=before is not None,
                        error="conflict",
                        current_index=before or 0,
                    )
                )
            else:
                append(OpResult(ok=True, index=index, existed=before is not None))
            continue
        if isinstance(op, Put):
            if op.expect_index is not None and op.expect_index != (before or 0):
                append(
                    OpResult(
                        ok=False,
                        index=index,
                        existed=before is not None,
                        error="conflict",
                        current_index=before or 0,
                    )
                )
                continue
            write(slot, op.value, old_len)
            append(created if before is None else replaced)
        elif isinstance(op, Delete):
            if before is not None:
                write(slot, None, old_len)
            append(created if before is None else replaced)
    if open_session is not None:
        close_session()
    if budgeted and results:
        close_unit()
    writes = tuple(
        Write(table, key, None if value is None else Record(index, value))
        for (table, key), value in pending.items()
    )
    return Applied(writes, tuple(results))
