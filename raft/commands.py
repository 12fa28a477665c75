"""Typed, versioned commands of the replicated state machine and their byte codec.

A Raft entry carries one ``Batch``: several operations proposed together so that
one consensus round commits many client writes. The codec is a small explicit
binary format (values are raw bytes, so JSON would need base64 and be larger):

    batch   := version:u8 count:u32 op*
    op      := kind:u8 table_len:u8 table key_len:u16 key body
    body    := PUT: expect:i64 value_len:u32 value | DELETE: (nothing) | BARRIER: (nothing)

All integers are big-endian. ``expect`` is -1 for an unconditional put, 0 for
"only if absent", N for "only if the key was last modified at index N".
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from enum import IntEnum

from raft.errors import CommandDecodeError

CODEC_VERSION = 1
MAX_TABLE_NAME = 64
MAX_KEY_BYTES = 1024
MAX_VALUE_BYTES = 1024 * 1024

_HEADER = struct.Struct(">BI")
_OP_HEAD = struct.Struct(">BB")
_KEY_LEN = struct.Struct(">H")
_PUT_BODY = struct.Struct(">qI")


class OpKind(IntEnum):
    PUT = 1
    DELETE = 2
    BARRIER = 3


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


Op = Put | Delete | Barrier


@dataclass(frozen=True, slots=True)
class Batch:
    ops: tuple[Op, ...]


def encode_batch(batch: Batch) -> bytes:
    parts = [_HEADER.pack(CODEC_VERSION, len(batch.ops))]
    for op in batch.ops:
        if isinstance(op, Barrier):
            parts.append(_OP_HEAD.pack(OpKind.BARRIER, 0))
            parts.append(_KEY_LEN.pack(0))
            continue
        table = op.table.encode()
        if not table or len(table) > MAX_TABLE_NAME:
            raise ValueError(f"table name must be 1..{MAX_TABLE_NAME} bytes: {op.table!r}")
        if len(op.key) > MAX_KEY_BYTES:
            raise ValueError(f"key longer than {MAX_KEY_BYTES} bytes")
        kind = OpKind.PUT if isinstance(op, Put) else OpKind.DELETE
        parts.append(_OP_HEAD.pack(kind, len(table)))
        parts.append(table)
        parts.append(_KEY_LEN.pack(len(op.key)))
        parts.append(op.key)
        if isinstance(op, Put):
            if len(op.value) > MAX_VALUE_BYTES:
                raise ValueError(f"value larger than {MAX_VALUE_BYTES} bytes")
            expect = -1 if op.expect_index is None else op.expect_index
            parts.append(_PUT_BODY.pack(expect, len(op.value)))
            parts.append(op.value)
    return b"".join(parts)


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._pos = 0

    def take(self, size: int) -> bytes:
        end = self._pos + size
        if end > len(self._data):
            raise CommandDecodeError("command truncated")
        chunk = self._data[self._pos : end].tobytes()
        self._pos = end
        return chunk

    def unpack(self, layout: struct.Struct) -> tuple[int, ...]:
        return layout.unpack(self.take(layout.size))

    @property
    def exhausted(self) -> bool:
        return self._pos == len(self._data)


def decode_batch(data: bytes) -> Batch:
    """Decode bytes made by ``encode_batch``; anything else raises CommandDecodeError."""
    reader = _Reader(data)
    version, count = reader.unpack(_HEADER)
    if version != CODEC_VERSION:
        raise CommandDecodeError(f"unsupported command version {version}")
    ops: list[Op] = []
    for _ in range(count):
        kind, table_len = reader.unpack(_OP_HEAD)
        table_raw = reader.take(table_len)
        (key_len,) = reader.unpack(_KEY_LEN)
        key = reader.take(key_len)
        if kind == OpKind.BARRIER:
            ops.append(Barrier())
            continue
        try:
            table = table_raw.decode()
        except UnicodeDecodeError as exc:
            raise CommandDecodeError("table name is not UTF-8") from exc
        if not table:
            raise CommandDecodeError("empty table name")
        if kind == OpKind.PUT:
            expect, value_len = reader.unpack(_PUT_BODY)
            if value_len > MAX_VALUE_BYTES:
                raise CommandDecodeError("value too large")
            value = reader.take(value_len)
            ops.append(Put(table, key, value, None if expect < 0 else expect))
        elif kind == OpKind.DELETE:
            ops.append(Delete(table, key))
        else:
            raise CommandDecodeError(f"unknown operation kind {kind}")
    if not reader.exhausted:
        raise CommandDecodeError("trailing bytes after command")
    return Batch(tuple(ops))
