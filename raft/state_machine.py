"""The pure state machine: a committed command in, the writes it makes out.

No disk, no clock, no threads: ``apply_command`` reads the current state
through a callable and returns the writes for the adapter to store (the LMDB
view) plus one result per operation for the proposer. The same committed log
therefore gives the same state on every host, and this module is tested
without pysyncobj.
"""

from __future__ import annotations

import logging
import struct
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from raft.commands import Append, Barrier, Delete, Guard, Put, decode_batch
from raft.errors import CommandDecodeError

logger = logging.getLogger(__name__)

_RECORD_HEAD = struct.Struct(">Q")
# An append counter: the next number of the sequence and the bytes appended so far.
_COUNTER = struct.Struct(">QQ")
_ITEM_NUMBER = struct.Struct(">Q")


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
# The log index that last modified (table, key), or None if the key is absent.
IndexReader = Callable[[str, bytes], int | None]
ValueReader = Callable[[str, bytes], bytes | None]
# The value stored at (table, key) without its index, or None if absent.


def decode_counter(value: bytes | None) -> tuple[int, int]:
    """(next number, bytes appended) of an append counter's stored value."""
    if value is None:
        return 1, 0
    next_number, appended = _COUNTER.unpack(value)
    return int(next_number), int(appended)


def item_key(key: bytes, number: int) -> bytes:
    """Where an APPEND to the sequence at ``key`` stored item ``number``."""
    return key + _ITEM_NUMBER.pack(number)


def apply_command(payload: bytes, index: int, read: Reader, tables: Iterable[str]) -> Applied:
    """Apply the command committed at ``index``.

    Operations in one batch see the writes of the operations before them. A
    payload that does not decode changes nothing (it can only come from a newer
    or broken peer) and yields no results.
    """

    def read_index(table: str, key: bytes) -> int | None:
        record = read(table, key)
        return None if record is None else record.mod_index

    def read_value(table: str, key: bytes) -> bytes | None:
        record = read(table, key)
        return None if record is None else record.value

    return apply_command_indexed(payload, index, read_index, tables, read_value)


def apply_command_indexed(
    payload: bytes,
    index: int,
    read_index: IndexReader,
    tables: Iterable[str],
    read_value: ValueReader | None = None,
) -> Applied:
    """``apply_command`` for adapters that can look up a key's index without its value."""
    try:
        batch = decode_batch(payload)
    except CommandDecodeError as exc:
        logger.error("entry %d is not a valid command, skipped: %s", index, exc)
        return Applied((), ())
    known = frozenset(tables)
    # Writes of this entry so far: the new value, or None for a deletion.
    pending: dict[tuple[str, bytes], bytes | None] = {}
    # Results are immutable: the common ones are shared within the entry.
    created = OpResult(ok=True, index=index)
    replaced = OpResult(ok=True, index=index, existed=True)
    results: list[OpResult] = []
    append = results.append
    skip = 0  # operations left to skip after a failed guard
    for op in batch.ops:
        if skip:
            skip -= 1
            append(OpResult(ok=False, index=index, error="guarded"))
            continue
        if isinstance(op, Barrier):
            append(created)
            continue
        if op.table not in known:
            append(OpResult(ok=False, index=index, error="unknown_table"))
            if isinstance(op, Guard):
                skip = op.count
            continue
        slot = (op.table, op.key)
        if slot in pending:
            before = None if pending[slot] is None else index
        else:
            before = read_index(op.table, op.key)
        if isinstance(op, Append):
            if read_value is None:
                append(OpResult(ok=False, index=index, error="unsupported"))
                continue
            stored = pending[slot] if slot in pending else read_value(op.table, op.key)
            first, appended = decode_counter(stored)
            pending[slot] = _COUNTER.pack(first + op.count, appended + len(op.value))
            pending[(op.table, item_key(op.key, first))] = op.value
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
            pending[slot] = op.value
            append(created if before is None else replaced)
        elif isinstance(op, Delete):
            if before is not None:
                pending[slot] = None
            append(created if before is None else replaced)
    writes = tuple(
        Write(table, key, None if value is None else Record(index, value))
        for (table, key), value in pending.items()
    )
    return Applied(writes, tuple(results))
