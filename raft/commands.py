"""Typed, versioned commands of the replicated state machine and their byte codec.

A Raft entry carries one ``Batch``: several operations proposed together so that
one consensus round commits many client writes. The codec is a small explicit
binary format (values are raw bytes, so JSON would need base64 and be larger):

    batch   := version:u8 count:u32 op*
    op      := kind:u8 table_len:u8 table key_len:u16 key body
    body    := PUT: expect:i64 value_len:u32 value | DELETE: (nothing) | BARRIER: (nothing)
             | GUARD: expect:i64 count:u32 | APPEND: count:u32 value_len:u32 value
             | SESSION: seq:u64 floor:u64 count:u32   (table empty, key: the client id)

All integers are big-endian. ``expect`` is -1 for an unconditional put, 0 for
"only if absent", N for "only if the key was last modified at index N".
A GUARD applies the ``count`` operations after it only if its key's index matches
``expect`` (same meaning): a proposal whose writes must all happen or none.
An APPEND stores its value under ``key || first`` (``first`` a big-endian u64) where
``first`` is the next number of the sequence counted at ``key``, and advances that
counter by ``count``: any member can append to a sequence without coordination,
the numbering is decided by the log order.
A SESSION makes the ``count`` operations after it a numbered request of a client
session (``raft.sessions``): applied at most once however often it is proposed.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from enum import IntEnum

from raft.errors import CommandDecodeError

CODEC_VERSION = 1
MAX_TABLE_NAME = 64
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024
MAX_CLIENT_BYTES = 64
# A session's last result is stored: this bounds what one session record holds.
MAX_SESSION_OPS = 64

_HEADER = struct.Struct(">BI")
_OP_HEAD = struct.Struct(">BB")
_KEY_LEN = struct.Struct(">H")
_PUT_BODY = struct.Struct(">qI")
_GUARD_BODY = struct.Struct(">qI")
_APPEND_BODY = struct.Struct(">II")
_SESSION_BODY = struct.Struct(">QQI")


class OpKind(IntEnum):
    PUT = 1
    DELETE = 2
    BARRIER = 3
    GUARD = 4
    APPEND = 5
    SESSION = 6


@dataclass(frozen=True, slots=True)
class Put:
    """Set ``key`` in ``table``; with ``expect_index`` only if its version matches."""

    table: str
    key: bytes
    value: bytes
    expect_index: int | None = None


@dataclass(frozen=True, slots=True)
class Delete:
    table: str
    key: bytes


@dataclass(frozen=True, slots=True)
class Barrier:
    """Changes nothing; once applied locally, every earlier commit is visible."""


@dataclass(frozen=True, slots=True)
class Guard:
    """Apply the next ``count`` operations only if ``key`` was last modified at
    ``expect_index`` (0: only if absent); otherwise skip them all."""

    table: str
    key: bytes
    expect_index: int
    count: int


@dataclass(frozen=True, slots=True)
class Append:
    """Store ``value`` under ``key || u64 first`` where ``first`` is the counter at
    ``key`` (1 when absent), then advance the counter by ``count`` (>= 1) and its
    byte total by ``len(value)``. The result's ``current_index`` is ``first``."""

    table: str
    key: bytes
    value: bytes
    count: int


@dataclass(frozen=True, slots=True)
class Session:
    """The next ``count`` operations are request ``seq`` of the session ``client``:
    applied once, a second proposal of them answered with the first one's results.
    ``floor`` is an applied index seen before the session's first request: no record of
    the session can be older, which tells a new session from one that expired."""

    client: bytes
    seq: int
    floor: int
    count: int


Op = Put | Delete | Barrier | Guard | Append | Session

_BARRIER = Barrier()
_BARRIER_OP = _OP_HEAD.pack(OpKind.BARRIER, 0) + _KEY_LEN.pack(0)


@dataclass(frozen=True, slots=True)
class Batch:
    ops: tuple[Op, ...]


def encode_batch(batch: Batch) -> bytes:
    return join_encoded(len(batch.ops), [encode_ops(batch.ops)])


def encode_ops(ops: Sequence[Op]) -> bytes:
    """The ``op*`` part of a batch: operations encoded once, to be joined later."""
    parts: list[bytes] = []
    append = parts.append
    for op in ops:
        if isinstance(op, Barrier):
            append(_BARRIER_OP)
            continue
        if isinstance(op, Session):
            if not 0 < len(op.client) <= MAX_CLIENT_BYTES:
                raise ValueError(f"a session's client id is 1..{MAX_CLIENT_BYTES} bytes")
            if op.seq < 1 or op.floor < 0 or not 0 <= op.count <= MAX_SESSION_OPS:
                raise ValueError(f"a session counts seq >= 1 and 0..{MAX_SESSION_OPS} operations")
            append(_OP_HEAD.pack(OpKind.SESSION, 0))
            append(_KEY_LEN.pack(len(op.client)))
            append(op.client)
            append(_SESSION_BODY.pack(op.seq, op.floor, op.count))
            continue
        table = op.table.encode()
        if not table or len(table) > MAX_TABLE_NAME:
            raise ValueError(f"table name must be 1..{MAX_TABLE_NAME} bytes: {op.table!r}")
        key = op.key
        if len(key) > MAX_KEY_BYTES:
            raise ValueError(f"key longer than {MAX_KEY_BYTES} bytes")
        if isinstance(op, Put):
            value = op.value
            if len(value) > MAX_VALUE_BYTES:
                raise ValueError(f"value larger than {MAX_VALUE_BYTES} bytes")
            expect = -1 if op.expect_index is None else op.expect_index
            append(_OP_HEAD.pack(OpKind.PUT, len(table)))
            append(table)
            append(_KEY_LEN.pack(len(key)))
            append(key)
            append(_PUT_BODY.pack(expect, len(value)))
            append(value)
        elif isinstance(op, Append):
            value = op.value
            if len(value) > MAX_VALUE_BYTES:
                raise ValueError(f"value larger than {MAX_VALUE_BYTES} bytes")
            if op.count < 1 or len(key) + 8 > MAX_KEY_BYTES:
                raise ValueError("an append counts >= 1 item and its key leaves room for 8 bytes")
            append(_OP_HEAD.pack(OpKind.APPEND, len(table)))
            append(table)
            append(_KEY_LEN.pack(len(key)))
            append(key)
            append(_APPEND_BODY.pack(op.count, len(value)))
            append(value)
        elif isinstance(op, Guard):
            if op.expect_index < 0 or op.count < 0:
                raise ValueError("a guard's expect_index and count are >= 0")
            append(_OP_HEAD.pack(OpKind.GUARD, len(table)))
            append(table)
            append(_KEY_LEN.pack(len(key)))
            append(key)
            append(_GUARD_BODY.pack(op.expect_index, op.count))
        else:
            append(_OP_HEAD.pack(OpKind.DELETE, len(table)))
            append(table)
            append(_KEY_LEN.pack(len(key)))
            append(key)
    return b"".join(parts)


def join_encoded(count: int, encoded: Sequence[bytes]) -> bytes:
    """A batch of ``count`` operations from the outputs of ``encode_ops``."""
    return b"".join((_HEADER.pack(CODEC_VERSION, count), *encoded))


def decode_batch(data: bytes) -> Batch:
    """Decode bytes made by ``encode_batch``; anything else raises CommandDecodeError."""
    try:
        return Batch(tuple(_decode_ops(data)))
    except struct.error as exc:  # a fixed-size field runs past the end
        raise CommandDecodeError("command truncated") from exc


def _decode_ops(data: bytes) -> list[Op]:
    end = len(data)
    version, count = _HEADER.unpack_from(data, 0)
    if version != CODEC_VERSION:
        raise CommandDecodeError(f"unsupported command version {version}")
    pos = _HEADER.size
    ops: list[Op] = []
    append = ops.append
    tables: dict[bytes, str] = {}
    for _ in range(count):
        kind, table_len = _OP_HEAD.unpack_from(data, pos)
        pos += _OP_HEAD.size
        table_raw = data[pos : pos + table_len]
        pos += table_len
        (key_len,) = _KEY_LEN.unpack_from(data, pos)
        pos += _KEY_LEN.size
        key = data[pos : pos + key_len]
        pos += key_len
        if pos > end:
            raise CommandDecodeError("command truncated")
        if kind == OpKind.BARRIER:
            append(_BARRIER)
            continue
        if kind == OpKind.SESSION:
            seq, floor, guarded = _SESSION_BODY.unpack_from(data, pos)
            pos += _SESSION_BODY.size
            if table_len or not 0 < key_len <= MAX_CLIENT_BYTES:
                raise CommandDecodeError("bad session client id")
            if seq < 1 or guarded > MAX_SESSION_OPS:
                raise CommandDecodeError("bad session sequence or count")
            append(Session(key, seq, floor, guarded))
            continue
        table = tables.get(table_raw)
        if table is None:
            try:
                table = table_raw.decode()
            except UnicodeDecodeError as exc:
                raise CommandDecodeError("table name is not UTF-8") from exc
            if not table:
                raise CommandDecodeError("empty table name")
            tables[table_raw] = table
        if kind == OpKind.PUT:
            expect, value_len = _PUT_BODY.unpack_from(data, pos)
            pos += _PUT_BODY.size
            if value_len > MAX_VALUE_BYTES:
                raise CommandDecodeError("value too large")
            value = data[pos : pos + value_len]
            pos += value_len
            if pos > end:
                raise CommandDecodeError("command truncated")
            append(Put(table, key, value, None if expect < 0 else expect))
        elif kind == OpKind.DELETE:
            append(Delete(table, key))
        elif kind == OpKind.APPEND:
            items, value_len = _APPEND_BODY.unpack_from(data, pos)
            pos += _APPEND_BODY.size
            if value_len > MAX_VALUE_BYTES or items < 1:
                raise CommandDecodeError("append value too large or counting no item")
            value = data[pos : pos + value_len]
            pos += value_len
            if pos > end:
                raise CommandDecodeError("command truncated")
            append(Append(table, key, value, items))
        elif kind == OpKind.GUARD:
            expect, guarded = _GUARD_BODY.unpack_from(data, pos)
            pos += _GUARD_BODY.size
            if expect < 0:
                raise CommandDecodeError("negative guard index")
            append(Guard(table, key, expect, guarded))
        else:
            raise CommandDecodeError(f"unknown operation kind {kind}")
    if pos != end:
        raise CommandDecodeError("trailing bytes after command")
    return ops
