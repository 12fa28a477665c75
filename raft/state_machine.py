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

from raft.commands import Barrier, Delete, Put, decode_batch
from raft.errors import CommandDecodeError

logger = logging.getLogger(__name__)

_RECORD_HEAD = struct.Struct(">Q")


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


def apply_command(payload: bytes, index: int, read: Reader, tables: Iterable[str]) -> Applied:
    """Apply the command committed at ``index``.

    Operations in one batch see the writes of the operations before them. A
    payload that does not decode changes nothing (it can only come from a newer
    or broken peer) and yields no results.
    """
    try:
        batch = decode_batch(payload)
    except CommandDecodeError as exc:
        logger.error("entry %d is not a valid command, skipped: %s", index, exc)
        return Applied((), ())
    known = frozenset(tables)
    pending: dict[tuple[str, bytes], Record | None] = {}

    def current(table: str, key: bytes) -> Record | None:
        slot = (table, key)
        if slot in pending:
            return pending[slot]
        return read(table, key)

    results: list[OpResult] = []
    for op in batch.ops:
        if isinstance(op, Barrier):
            results.append(OpResult(ok=True, index=index))
            continue
        if op.table not in known:
            results.append(OpResult(ok=False, index=index, error="unknown_table"))
            continue
        before = current(op.table, op.key)
        before_index = before.mod_index if before is not None else 0
        if isinstance(op, Put):
            if op.expect_index is not None and op.expect_index != before_index:
                results.append(
                    OpResult(
                        ok=False,
                        index=index,
                        existed=before is not None,
                        error="conflict",
                        current_index=before_index,
                    )
                )
                continue
            pending[(op.table, op.key)] = Record(index, op.value)
            results.append(OpResult(ok=True, index=index, existed=before is not None))
        elif isinstance(op, Delete):
            if before is not None:
                pending[(op.table, op.key)] = None
            results.append(OpResult(ok=True, index=index, existed=before is not None))
    writes = tuple(Write(table, key, record) for (table, key), record in pending.items())
    return Applied(writes, tuple(results))
