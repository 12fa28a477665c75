"""Wire messages of the gossip protocol, version 1, and their binary codec.

Every datagram starts with the wire version byte (``VERSION`` = 1) followed by
exactly one message: a type byte and a body. A ``COMPOUND`` message carries up
to 255 other (non-compound) messages, so one datagram can hold a ping plus
piggybacked updates. All integers are big-endian; the sender's identity is not
in the packet: the transport adapter authenticates every datagram and hands the
core the sender's member id.

====  ==========  ===============================================================
type  name        body
====  ==========  ===============================================================
1     PING        seq u32, target str8
2     PING_REQ    seq u32, target str8            (probe ``target`` for me)
3     ACK         seq u32
4     NACK        seq u32                         (relay: the target did not answer)
5     ALIVE       incarnation u32, flags u8, member str8, meta bytes16
6     SUSPECT     incarnation u32, member str8, origin str8
7     DEAD        incarnation u32, member str8, origin str8  (origin == member: left)
8     SUMMARY     version u64, member str8, value bytes16
9     PUSH_PULL   seq u32, flags u8 (1 join, 2 reply), part u16, parts u16, count u16,
                  count * entry
10    COMPOUND    count u8, count * (length u16, type u8, body)
11    SYNC        seq u32, digest u64             (anti-entropy: push-pull if different)
====  ==========  ===============================================================

``str8`` is a length byte and 1..255 bytes of UTF-8; ``bytes16`` a u16 length
and the bytes. A push-pull entry is ``incarnation u32, state u8, flags u8,
summary_version u64, id_len u8, meta_len u16, value_len u16`` followed by the
id, the meta and the summary value. Member flags: bit 0 NATed, bit 1 relay;
other bits are carried but ignored.

Decoding never trusts a length: anything short, long, unknown or not UTF-8
raises a ``RemoteProtocolError`` subclass.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Sequence
from enum import IntEnum
from typing import NamedTuple

from gossip.config import MAX_UDP_PAYLOAD
from gossip.errors import (
    MalformedPacketError,
    OversizedPacketError,
    RemoteProtocolError,
    TruncatedPacketError,
    UnsupportedVersionError,
)

VERSION = 1
_VERSION_BYTE = bytes([VERSION])

FLAG_NATTED = 0x01
FLAG_RELAY = 0x02

MAX_ID_BYTES = 255
MAX_COMPOUND = 255


class MsgType(IntEnum):
    PING = 1
    PING_REQ = 2
    ACK = 3
    NACK = 4
    ALIVE = 5
    SUSPECT = 6
    DEAD = 7
    SUMMARY = 8
    PUSH_PULL = 9
    COMPOUND = 10
    SYNC = 11


class WireState(IntEnum):
    """A member's state as carried in push-pull entries."""

    ALIVE = 0
    SUSPECT = 1
    DEAD = 2
    LEFT = 3


class Ping(NamedTuple):
    seq: int
    target: str


class PingReq(NamedTuple):
    seq: int
    target: str


class Ack(NamedTuple):
    seq: int


class Nack(NamedTuple):
    seq: int


class Alive(NamedTuple):
    member: str
    incarnation: int
    flags: int
    meta: bytes


class Suspect(NamedTuple):
    member: str
    incarnation: int
    origin: str


class Dead(NamedTuple):
    member: str
    incarnation: int
    origin: str


class Summary(NamedTuple):
    member: str
    version: int
    value: bytes


class Sync(NamedTuple):
    seq: int
    digest: int


class StateEntry(NamedTuple):
    member: str
    incarnation: int
    state: int
    flags: int
    meta: bytes
    summary_version: int
    summary: bytes


class PushPull(NamedTuple):
    seq: int
    join: bool
    reply: bool
    part: int
    parts: int
    entries: tuple[StateEntry, ...]


Message = Ping | PingReq | Ack | Nack | Alive | Suspect | Dead | Summary | PushPull | Sync

_U32 = struct.Struct("!I")
_SEQ_STR = struct.Struct("!BIB")  # type, seq, target length
_TYPE_SEQ = struct.Struct("!BI")
_SYNC = struct.Struct("!BIQ")
_ALIVE = struct.Struct("!BIBB")  # type, incarnation, flags, id length
_INC_STR = struct.Struct("!BIB")  # type, incarnation, id length
_SUMMARY = struct.Struct("!BQB")  # type, version, id length
_U16 = struct.Struct("!H")
_PP_HEAD = struct.Struct("!BIBHHH")  # type, seq, flags, part, parts, count
_ENTRY = struct.Struct("!IBBQBHH")
_U32_MAX = 0xFFFFFFFF
_U64_MAX = 0xFFFFFFFFFFFFFFFF

#: The highest incarnation the wire carries (u32): a member at it can refute no more.
MAX_INCARNATION = _U32_MAX
#: The highest summary version the wire carries (u64).
MAX_SUMMARY_VERSION = _U64_MAX

#: Bytes a compound packet adds around its members: version, type, count.
COMPOUND_OVERHEAD = 3
#: Bytes a compound packet adds per member message (its length).
COMPOUND_ITEM_OVERHEAD = 2
PUSH_PULL_HEADER = 1 + _PP_HEAD.size


def _id(member: str) -> bytes:
    raw = member.encode()
    if not 0 < len(raw) <= MAX_ID_BYTES:
        raise ValueError(f"member id must be 1..{MAX_ID_BYTES} bytes of UTF-8: {member!r}")
    return raw


def check_member_id(member: str) -> None:
    """Raise ``ValueError`` unless ``member`` can be a member id on the wire."""
    _id(member)


def _check(value: int, limit: int, name: str) -> None:
    if not 0 <= value <= limit:
        raise ValueError(f"{name} out of range: {value}")


def encode_message(msg: Message) -> bytes:
    """The body of one message: its type byte and fields, without the version byte."""
    if isinstance(msg, Ping | PingReq):
        _check(msg.seq, _U32_MAX, "seq")
        target = _id(msg.target)
        kind = MsgType.PING if isinstance(msg, Ping) else MsgType.PING_REQ
        return _SEQ_STR.pack(kind, msg.seq, len(target)) + target
    if isinstance(msg, Ack | Nack):
        _check(msg.seq, _U32_MAX, "seq")
        return _TYPE_SEQ.pack(MsgType.ACK if isinstance(msg, Ack) else MsgType.NACK, msg.seq)
    if isinstance(msg, Alive):
        _check(msg.incarnation, _U32_MAX, "incarnation")
        _check(msg.flags, 0xFF, "flags")
        _check(len(msg.meta), 0xFFFF, "meta length")
        member = _id(msg.member)
        return b"".join(
            (
                _ALIVE.pack(MsgType.ALIVE, msg.incarnation, msg.flags, len(member)),
                member,
                _U16.pack(len(msg.meta)),
                msg.meta,
            )
        )
    if isinstance(msg, Suspect | Dead):
        _check(msg.incarnation, _U32_MAX, "incarnation")
        member, origin = _id(msg.member), _id(msg.origin)
        kind = MsgType.SUSPECT if isinstance(msg, Suspect) else MsgType.DEAD
        return b"".join(
            (
                _INC_STR.pack(kind, msg.incarnation, len(member)),
                member,
                bytes([len(origin)]),
                origin,
            )
        )
    if isinstance(msg, Summary):
        _check(msg.version, _U64_MAX, "version")
        _check(len(msg.value), 0xFFFF, "value length")
        member = _id(msg.member)
        return b"".join(
            (
                _SUMMARY.pack(MsgType.SUMMARY, msg.version, len(member)),
                member,
                _U16.pack(len(msg.value)),
                msg.value,
            )
        )
    if isinstance(msg, Sync):
        _check(msg.seq, _U32_MAX, "seq")
        _check(msg.digest, _U64_MAX, "digest")
        return _SYNC.pack(MsgType.SYNC, msg.seq, msg.digest)
    if isinstance(msg, PushPull):
        _check(msg.seq, _U32_MAX, "seq")
        _check(len(msg.entries), 0xFFFF, "entry count")
        flags = (1 if msg.join else 0) | (2 if msg.reply else 0)
        head = _PP_HEAD.pack(
            MsgType.PUSH_PULL, msg.seq, flags, msg.part, msg.parts, len(msg.entries)
        )
        return head + b"".join(encode_entry(e) for e in msg.entries)
    raise TypeError(f"not a gossip message: {msg!r}")


def encode_entry(e: StateEntry) -> bytes:
    """One push-pull entry."""
    _check(e.incarnation, _U32_MAX, "incarnation")
    _check(e.summary_version, _U64_MAX, "summary_version")
    _check(len(e.meta), 0xFFFF, "meta length")
    _check(len(e.summary), 0xFFFF, "summary length")
    member = _id(e.member)
    head = _ENTRY.pack(
        e.incarnation,
        e.state,
        e.flags,
        e.summary_version,
        len(member),
        len(e.meta),
        len(e.summary),
    )
    return b"".join((head, member, e.meta, e.summary))


_id_cache: dict[str, bytes] = {}


def entry_bytes(
    member: str, incarnation: int, state: int, flags: int, meta: bytes, version: int, value: bytes
) -> bytes:
    """``encode_entry`` without the range checks, for values a Node already validated."""
    raw = _id_cache.get(member)
    if raw is None:
        if len(_id_cache) > 200_000:
            _id_cache.clear()
        raw = _id_cache[member] = _id(member)
    return (
        _ENTRY.pack(incarnation, state, flags, version, len(raw), len(meta), len(value))
        + raw
        + meta
        + value
    )


def push_pull_body(
    seq: int, join: bool, reply: bool, part: int, parts: int, entries: Sequence[bytes]
) -> bytes:
    """A push-pull body from entries already encoded with ``encode_entry``."""
    flags = (1 if join else 0) | (2 if reply else 0)
    return _PP_HEAD.pack(MsgType.PUSH_PULL, seq, flags, part, parts, len(entries)) + b"".join(
        entries
    )


def pack(bodies: Sequence[bytes]) -> bytes:
    """A datagram from one or more message bodies (a compound when more than one)."""
    if len(bodies) == 1:
        return _VERSION_BYTE + bodies[0]
    if not 1 < len(bodies) <= MAX_COMPOUND:
        raise ValueError(f"a packet holds 1..{MAX_COMPOUND} messages, not {len(bodies)}")
    parts = [_VERSION_BYTE, bytes([MsgType.COMPOUND, len(bodies)])]
    for body in bodies:
        parts.append(_U16.pack(len(body)))
        parts.append(body)
    return b"".join(parts)


def encode_packet(messages: Sequence[Message]) -> bytes:
    """A datagram holding ``messages``."""
    return pack([encode_message(m) for m in messages])


# Decoding --------------------------------------------------------------------

_intern = sys.intern


def _read_id(data: bytes, off: int, end: int) -> tuple[str, int]:
    if off >= end:
        raise TruncatedPacketError("member id length missing")
    n = data[off]
    off += 1
    if n == 0:
        raise MalformedPacketError("empty member id")
    stop = off + n
    if stop > end:
        raise TruncatedPacketError("member id cut short")
    try:
        return _intern(data[off:stop].decode()), stop
    except UnicodeDecodeError:
        raise MalformedPacketError("member id is not UTF-8") from None


def _read_bytes16(data: bytes, off: int, end: int) -> tuple[bytes, int]:
    if off + 2 > end:
        raise TruncatedPacketError("length missing")
    (n,) = _U16.unpack_from(data, off)
    off += 2
    stop = off + n
    if stop > end:
        raise TruncatedPacketError("bytes cut short")
    return data[off:stop], stop


def _decode_one(data: bytes, off: int, end: int) -> Message:
    """Decode the message occupying exactly ``data[off:end]``."""
    if off >= end:
        raise TruncatedPacketError("empty message")
    kind = data[off]
    msg: Message
    if kind in (MsgType.PING, MsgType.PING_REQ):
        if off + 6 > end:
            raise TruncatedPacketError("ping cut short")
        (seq,) = _U32.unpack_from(data, off + 1)
        target, off = _read_id(data, off + 5, end)
        msg = Ping(seq, target) if kind == MsgType.PING else PingReq(seq, target)
    elif kind in (MsgType.ACK, MsgType.NACK):
        if off + 5 > end:
            raise TruncatedPacketError("ack cut short")
        (seq,) = _U32.unpack_from(data, off + 1)
        off += 5
        msg = Ack(seq) if kind == MsgType.ACK else Nack(seq)
    elif kind == MsgType.ALIVE:
        if off + 7 > end:
            raise TruncatedPacketError("alive cut short")
        _, inc, flags, _ = _ALIVE.unpack_from(data, off)
        member, off = _read_id(data, off + 6, end)
        meta, off = _read_bytes16(data, off, end)
        msg = Alive(member, inc, flags, meta)
    elif kind in (MsgType.SUSPECT, MsgType.DEAD):
        if off + 6 > end:
            raise TruncatedPacketError("suspect cut short")
        (inc,) = _U32.unpack_from(data, off + 1)
        member, off = _read_id(data, off + 5, end)
        origin, off = _read_id(data, off, end)
        msg = Suspect(member, inc, origin) if kind == MsgType.SUSPECT else Dead(member, inc, origin)
    elif kind == MsgType.SUMMARY:
        if off + 10 > end:
            raise TruncatedPacketError("summary cut short")
        _, version, _ = _SUMMARY.unpack_from(data, off)
        member, off = _read_id(data, off + 9, end)
        value, off = _read_bytes16(data, off, end)
        msg = Summary(member, version, value)
    elif kind == MsgType.PUSH_PULL:
        msg, off = _decode_push_pull(data, off, end)
    elif kind == MsgType.SYNC:
        if off + _SYNC.size > end:
            raise TruncatedPacketError("sync cut short")
        _, seq, digest = _SYNC.unpack_from(data, off)
        off += _SYNC.size
        msg = Sync(seq, digest)
    elif kind == MsgType.COMPOUND:
        raise MalformedPacketError("compound inside compound")
    else:
        raise MalformedPacketError(f"unknown message type {kind}")
    if off != end:
        raise MalformedPacketError("trailing bytes after message")
    return msg


def _decode_push_pull(data: bytes, off: int, end: int) -> tuple[PushPull, int]:
    if off + _PP_HEAD.size > end:
        raise TruncatedPacketError("push-pull header cut short")
    _, seq, flags, part, parts, count = _PP_HEAD.unpack_from(data, off)
    if parts == 0 or part >= parts:
        raise MalformedPacketError(f"push-pull part {part} of {parts}")
    off += _PP_HEAD.size
    entries: list[StateEntry] = []
    entry_size = _ENTRY.size
    unpack = _ENTRY.unpack_from
    for _ in range(count):
        if off + entry_size > end:
            raise TruncatedPacketError("push-pull entry cut short")
        inc, state, eflags, sv, id_len, meta_len, value_len = unpack(data, off)
        off += entry_size
        if state > WireState.LEFT:
            raise MalformedPacketError(f"unknown member state {state}")
        if id_len == 0:
            raise MalformedPacketError("empty member id")
        id_end = off + id_len
        meta_end = id_end + meta_len
        stop = meta_end + value_len
        if stop > end:
            raise TruncatedPacketError("push-pull entry cut short")
        try:
            member = _intern(data[off:id_end].decode())
        except UnicodeDecodeError:
            raise MalformedPacketError("member id is not UTF-8") from None
        entries.append(
            StateEntry(member, inc, state, eflags, data[id_end:meta_end], sv, data[meta_end:stop])
        )
        off = stop
    return PushPull(seq, bool(flags & 1), bool(flags & 2), part, parts, tuple(entries)), off


def split_packet(data: bytes) -> list[bytes]:
    """The message bodies of one datagram (type byte first), checking only the framing."""
    end = len(data)
    if end > MAX_UDP_PAYLOAD:
        raise OversizedPacketError(f"datagram of {end} bytes")
    if end < 2:
        raise TruncatedPacketError("datagram shorter than a header")
    if data[0] != VERSION:
        raise UnsupportedVersionError(f"wire version {data[0]}")
    if data[1] != MsgType.COMPOUND:
        return [data[1:]]
    if end < 3:
        raise TruncatedPacketError("compound count missing")
    count = data[2]
    if count == 0:
        raise MalformedPacketError("empty compound")
    off = 3
    out: list[bytes] = []
    for _ in range(count):
        if off + 2 > end:
            raise TruncatedPacketError("compound length missing")
        (n,) = _U16.unpack_from(data, off)
        off += 2
        stop = off + n
        if stop > end:
            raise TruncatedPacketError("compound member cut short")
        out.append(data[off:stop])
        off = stop
    if off != end:
        raise MalformedPacketError("trailing bytes after compound")
    return out


def decode_message(body: bytes) -> Message:
    """One message body (as ``encode_message`` makes and ``split_packet`` returns)."""
    return _decode_one(body, 0, len(body))


def decode_packet(data: bytes) -> list[Message]:
    """The messages of one datagram (a compound is flattened), or a ``RemoteProtocolError``."""
    return [_decode_one(b, 0, len(b)) for b in split_packet(data)]


__all__ = [
    "COMPOUND_ITEM_OVERHEAD",
    "COMPOUND_OVERHEAD",
    "FLAG_NATTED",
    "FLAG_RELAY",
    "MAX_ID_BYTES",
    "MAX_INCARNATION",
    "MAX_SUMMARY_VERSION",
    "VERSION",
    "Ack",
    "Alive",
    "Dead",
    "Message",
    "MsgType",
    "Nack",
    "Ping",
    "PingReq",
    "PushPull",
    "RemoteProtocolError",
    "StateEntry",
    "Summary",
    "Suspect",
    "Sync",
    "WireState",
    "check_member_id",
    "decode_message",
    "decode_packet",
    "encode_entry",
    "encode_message",
    "encode_packet",
    "entry_bytes",
    "pack",
    "push_pull_body",
    "split_packet",
]
