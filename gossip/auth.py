"""Per-datagram authentication for gossip: member certificates, sealing, opening (pure).

No sockets and no clock: every call that needs the time takes ``now`` (Unix
seconds, ``time.time()`` in the adapter).

Member certificate
------------------
A trust anchor (in meshorch the fleet root key, held by the hub) vouches that a
member id owns an Ed25519 key until a time. Version 1, big-endian::

    version u8 (=1) | id_len u8 | member_id (1..255 bytes UTF-8) | public_key 32
    | expires_at u64 (Unix seconds) | anchor_key 32 | signature 64

The signature is the anchor's, over ``CERT_CONTEXT`` followed by every byte of
the certificate before it. The context string keeps a certificate signature
from ever being mistaken for another document the same anchor key signs (a
desired-state delta, say), and the other way round. A certificate is 138 bytes
plus the id.

Datagram
--------
::

    magic b"\\x9bG" | version u8 (=1) | flags u8 | certificate | counter u64
    | payload | signature 64

The signature is the member's (the certificate's key), over ``DATAGRAM_CONTEXT``,
the recipient id and a zero byte, then every byte of the datagram before it.
``flags`` bit 0 set means *bound*: the recipient id signed is the destination's
member id, so a datagram captured on its way to one member cannot be replayed to
another. Clear means *unbound* (the recipient id signed is empty), for a
destination whose real id the sender does not know yet (a seed placeholder);
the adapter only sends join traffic that way. Other flag bits must be zero.

Overhead per datagram: 2 + 1 + 1 + (138 + id length) + 8 + 64 = 214 bytes plus
the sender's id length (e.g. 246 bytes for a 32-byte id).

The counter is the sender's wall-clock time in microseconds, forced above the
last one it used, so it only moves forward, across restarts too (as long as the
clock does). The opener refuses a counter more than ``max_skew_s`` from its own
clock (stale), and per sender remembers the highest ``window`` counters it
accepted: a counter among them, or below all of them once the window is full,
is a replay. Reordering by up to ``window`` datagrams is tolerated.

Cost: the opener caches verified certificates (bounded, LRU), so a datagram
from a known member costs one Ed25519 verification; a first datagram (or a
forged one carrying a certificate not seen before) costs at most two. Nothing
about a sender is stored until its datagram has verified, so forged datagrams
cannot grow any table, and every per-sender table is bounded (LRU).

Exceptions (all ``RemoteProtocolError``: a peer's bad input, never a crash)::

    AuthError                  .reason names the drop counter
    ├── MalformedError         "malformed": not a datagram/certificate of this version
    ├── BadCertError           "bad_cert": unknown anchor, expired, bad anchor signature
    ├── BadSignatureError      "bad_signature": not signed by the certificate's key
    ├── ReplayedError          "replayed": counter already seen or below the window
    └── StaleError             "stale": counter more than max_skew_s from now
"""

from __future__ import annotations

import bisect
import struct
from array import array
from collections import OrderedDict
from collections.abc import Callable, Collection
from typing import ClassVar, NamedTuple

from nacl.exceptions import BadSignatureError as _NaclBadSignature
from nacl.signing import SigningKey, VerifyKey

from gossip.errors import LocalProtocolError, RemoteProtocolError

MAGIC = b"\x9bG"
VERSION = 1
CERT_VERSION = 1
FLAG_BOUND = 0x01

CERT_CONTEXT = b"gossip member certificate v1\x00"
DATAGRAM_CONTEXT = b"gossip datagram v1\x00"

KEY_BYTES = 32
SIGNATURE_BYTES = 64
MAX_ID_BYTES = 255
#: Certificate bytes besides the member id.
CERT_FIXED_BYTES = 1 + 1 + KEY_BYTES + 8 + KEY_BYTES + SIGNATURE_BYTES
_HEADER_BYTES = len(MAGIC) + 2
#: Datagram bytes besides the sender's member id and the payload.
OVERHEAD_FIXED_BYTES = _HEADER_BYTES + CERT_FIXED_BYTES + 8 + SIGNATURE_BYTES

_U64 = struct.Struct("!Q")
_U64_MAX = 0xFFFFFFFFFFFFFFFF


def overhead(member_id: str) -> int:
    """Bytes a sealed datagram from ``member_id`` adds to its payload."""
    return OVERHEAD_FIXED_BYTES + len(member_id.encode())


# -- errors -------------------------------------------------------------------------


class AuthError(RemoteProtocolError):
    """A datagram (or certificate) that must be dropped; ``reason`` names the counter."""

    reason: ClassVar[str] = "auth"


class MalformedError(AuthError):
    """Not a datagram or certificate of a version this code speaks."""

    reason = "malformed"


class BadCertError(AuthError):
    """The certificate is not signed by a trusted anchor, or has expired."""

    reason = "bad_cert"


class BadSignatureError(AuthError):
    """The datagram is not signed by the key its certificate names."""

    reason = "bad_signature"


class ReplayedError(AuthError):
    """The sender's counter was seen already, or is older than the replay window."""

    reason = "replayed"


class StaleError(AuthError):
    """The sender's counter is further than ``max_skew_s`` from our clock."""

    reason = "stale"


#: Every ``AuthError.reason``, in a stable order (for counters).
REASONS: tuple[str, ...] = (
    MalformedError.reason,
    BadCertError.reason,
    BadSignatureError.reason,
    ReplayedError.reason,
    StaleError.reason,
)


# -- keys -----------------------------------------------------------------------------


def _key_bytes(key: bytes | str, what: str) -> bytes:
    raw = bytes.fromhex(key) if isinstance(key, str) else bytes(key)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"{what} must be {KEY_BYTES} bytes (or their hex), got {len(raw)}")
    return raw


def _signing_key(key: SigningKey | bytes) -> SigningKey:
    if isinstance(key, SigningKey):
        return key
    if len(key) != KEY_BYTES:
        raise ValueError(f"a signing key seed is {KEY_BYTES} bytes, got {len(key)}")
    return SigningKey(bytes(key))


def _anchor_set(anchors: Collection[bytes | str]) -> frozenset[bytes]:
    out: set[bytes] = set()
    for a in anchors:
        try:
            out.add(_key_bytes(a, "a trust anchor key"))
        except ValueError:
            continue  # a bad entry in the trusted list trusts nothing
    return frozenset(out)


# -- certificates ----------------------------------------------------------------------


class Certificate(NamedTuple):
    """A parsed member certificate (``raw`` is its exact encoding)."""

    member_id: str
    public_key: bytes
    expires_at: int
    anchor_key: bytes
    signature: bytes
    raw: bytes

    def signed_bytes(self) -> bytes:
        return CERT_CONTEXT + self.raw[:-SIGNATURE_BYTES]


def issue_cert(
    anchor_signing_key: SigningKey | bytes,
    member_id: str,
    public_key: bytes | str,
    expires_at: float,
) -> bytes:
    """A certificate binding ``member_id`` to ``public_key`` until ``expires_at`` (Unix s)."""
    anchor = _signing_key(anchor_signing_key)
    raw_id = member_id.encode()
    if not 0 < len(raw_id) <= MAX_ID_BYTES:
        raise ValueError(f"member id must be 1..{MAX_ID_BYTES} bytes of UTF-8: {member_id!r}")
    expires = int(expires_at)
    if not 0 <= expires <= _U64_MAX:
        raise ValueError(f"expires_at out of range: {expires_at}")
    body = b"".join(
        (
            bytes([CERT_VERSION, len(raw_id)]),
            raw_id,
            _key_bytes(public_key, "the member public key"),
            _U64.pack(expires),
            bytes(anchor.verify_key),
        )
    )
    return body + anchor.sign(CERT_CONTEXT + body).signature


def _cert_end(data: bytes, off: int) -> int:
    """Where the certificate starting at ``data[off]`` ends (framing only)."""
    if len(data) < off + 2:
        raise MalformedError("certificate cut short")
    if data[off] != CERT_VERSION:
        raise MalformedError(f"certificate version {data[off]}")
    n = data[off + 1]
    if n == 0:
        raise MalformedError("empty member id in certificate")
    end = off + CERT_FIXED_BYTES + n
    if len(data) < end:
        raise MalformedError("certificate cut short")
    return end


def parse_cert(cert: bytes) -> Certificate:
    """Decode a certificate without checking it; ``MalformedError`` if it is not one."""
    cert = bytes(cert)
    if _cert_end(cert, 0) != len(cert):
        raise MalformedError("trailing bytes after certificate")
    n = cert[1]
    off = 2 + n
    try:
        member_id = cert[2:off].decode()
    except UnicodeDecodeError:
        raise MalformedError("member id is not UTF-8") from None
    public_key = cert[off : off + KEY_BYTES]
    off += KEY_BYTES
    (expires_at,) = _U64.unpack_from(cert, off)
    off += 8
    anchor_key = cert[off : off + KEY_BYTES]
    off += KEY_BYTES
    return Certificate(member_id, public_key, expires_at, anchor_key, cert[off:], cert)


def _check_cert(c: Certificate, anchors: frozenset[bytes], now: float) -> None:
    if c.anchor_key not in anchors:
        raise BadCertError(f"certificate of {c.member_id!r} is signed by an untrusted anchor")
    if now >= c.expires_at:
        raise BadCertError(f"certificate of {c.member_id!r} expired at {c.expires_at}")


def _verify_cert_signature(c: Certificate) -> None:
    try:
        VerifyKey(c.anchor_key).verify(c.signed_bytes(), c.signature)
    except (_NaclBadSignature, ValueError):
        raise BadCertError(f"certificate of {c.member_id!r}: bad anchor signature") from None


def verify_cert(
    cert: bytes, trusted_anchor_keys: Collection[bytes | str], now: float
) -> Certificate:
    """The parsed certificate if a trusted anchor signed it and it has not expired.

    Raises ``MalformedError`` or ``BadCertError``.
    """
    c = parse_cert(cert)
    _check_cert(c, _anchor_set(trusted_anchor_keys), now)
    _verify_cert_signature(c)
    return c


# -- sealing ------------------------------------------------------------------------


class DatagramSealer:
    """Seals payloads as datagrams from one member (its key and its certificate)."""

    def __init__(self, member_id: str, signing_key: SigningKey | bytes, cert: bytes) -> None:
        self._key = _signing_key(signing_key)
        self.member_id = member_id
        self._last = 0
        self.cert = self._checked(cert)

    def _checked(self, cert: bytes) -> Certificate:
        try:
            c = parse_cert(cert)
        except MalformedError as exc:
            raise LocalProtocolError(f"not a certificate: {exc}") from None
        if c.member_id != self.member_id:
            raise LocalProtocolError(f"certificate is for {c.member_id!r}, not {self.member_id!r}")
        if c.public_key != bytes(self._key.verify_key):
            raise LocalProtocolError("certificate does not name this signing key")
        return c

    def replace_cert(self, cert: bytes) -> None:
        """Use a renewed certificate (same member id and key) from now on."""
        self.cert = self._checked(cert)

    @property
    def overhead(self) -> int:
        """Bytes a sealed datagram adds to its payload."""
        return _HEADER_BYTES + len(self.cert.raw) + 8 + SIGNATURE_BYTES

    def next_counter(self, now: float) -> int:
        counter = max(int(now * 1_000_000), self._last + 1)
        self._last = counter
        return counter

    def seal(self, payload: bytes, now: float, recipient: str | None = None) -> bytes:
        """A datagram carrying ``payload``; bound to ``recipient`` when it is given."""
        bound = recipient is not None
        head = b"".join(
            (
                MAGIC,
                bytes([VERSION, FLAG_BOUND if bound else 0]),
                self.cert.raw,
                _U64.pack(self.next_counter(now)),
                payload,
            )
        )
        rcpt = recipient.encode() if recipient is not None else b""
        signature = self._key.sign(DATAGRAM_CONTEXT + rcpt + b"\x00" + head).signature
        return head + signature


# -- opening ------------------------------------------------------------------------


class Opened(NamedTuple):
    sender_id: str
    payload: bytes


class DatagramOpener:
    """Checks datagrams addressed to ``recipient``: certificate, signature, freshness.

    ``trusted_anchors`` is called for every datagram and returns the anchor
    public keys (hex, or raw bytes) trusted right now, so a rotated or revoked
    anchor takes effect at once, for cached certificates too.
    """

    def __init__(
        self,
        trusted_anchors: Callable[[], Collection[bytes | str]],
        max_skew_s: float = 60.0,
        *,
        recipient: str = "",
        window: int = 64,
        max_senders: int = 8192,
        max_certs: int = 8192,
    ) -> None:
        if max_skew_s <= 0 or window < 1 or max_senders < 1 or max_certs < 1:
            raise ValueError("max_skew_s, window, max_senders and max_certs must be positive")
        self._trusted = trusted_anchors
        self._anchor_src: object = None
        self._anchors: frozenset[bytes] = frozenset()
        self.recipient = recipient
        self._rcpt = DATAGRAM_CONTEXT + recipient.encode() + b"\x00"
        self._unbound = DATAGRAM_CONTEXT + b"\x00"
        self.max_skew_us = int(max_skew_s * 1_000_000)
        self.window = window
        self.max_senders = max_senders
        self.max_certs = max_certs
        # Verified certificates: raw bytes -> (parsed, its key ready to verify).
        self._certs: OrderedDict[bytes, tuple[Certificate, VerifyKey]] = OrderedDict()
        # Per sender: the highest ``window`` counters accepted, ascending.
        self._seen: OrderedDict[str, array[int]] = OrderedDict()
        # Per sender in ``_seen``: the certificate of its last accepted datagram.
        self._cert_of: dict[str, Certificate] = {}
        # Counters at or below this are refused from senders not in ``_seen``
        # (their entry may have been evicted): raised on eviction.
        self._floor = 0

    def senders(self) -> int:
        """Senders whose replay window is kept (at most ``max_senders``)."""
        return len(self._seen)

    def cached_certs(self) -> int:
        return len(self._certs)

    def member_key(self, member_id: str, now: float) -> bytes | None:
        """The public key in the certificate of ``member_id``'s last accepted datagram,
        if that certificate is still valid at ``now`` (a trusted anchor's, unexpired);
        None for a member not heard from (or forgotten: bounded like the replay windows).

        For checking what a member signed besides its datagrams (its gossip summary,
        passed on by others)."""
        cert = self._cert_of.get(member_id)
        if cert is None:
            return None
        try:
            _check_cert(cert, self._trusted_now(), now)
        except BadCertError:
            return None
        return cert.public_key

    def _trusted_now(self) -> frozenset[bytes]:
        src = self._trusted()
        if isinstance(src, frozenset) and src is self._anchor_src:
            return self._anchors  # an immutable set we have converted already
        self._anchor_src = src
        self._anchors = _anchor_set(src)
        return self._anchors

    def open(self, data: bytes, now: float) -> Opened:
        """(sender id, payload) of an authentic, fresh datagram; else an ``AuthError``."""
        if len(data) < OVERHEAD_FIXED_BYTES + 1:
            raise MalformedError(f"datagram of {len(data)} bytes is too short")
        if data[:2] != MAGIC:
            raise MalformedError("not a gossip datagram")
        if data[2] != VERSION:
            raise MalformedError(f"datagram version {data[2]}")
        flags = data[3]
        if flags & ~FLAG_BOUND:
            raise MalformedError(f"unknown flags {flags:#x}")
        cert_end = _cert_end(data, _HEADER_BYTES)
        sig_at = len(data) - SIGNATURE_BYTES
        if sig_at < cert_end + 8:
            raise MalformedError("datagram cut short")

        anchors = self._trusted_now()
        raw_cert = bytes(data[_HEADER_BYTES:cert_end])
        certs = self._certs
        hit = certs.get(raw_cert)
        if hit is not None:
            cert, key = hit
            _check_cert(cert, anchors, now)
            certs.move_to_end(raw_cert)
        else:
            cert = parse_cert(raw_cert)
            _check_cert(cert, anchors, now)
            _verify_cert_signature(cert)
            key = VerifyKey(cert.public_key)
            certs[raw_cert] = (cert, key)
            if len(certs) > self.max_certs:
                certs.popitem(last=False)

        (counter,) = _U64.unpack_from(data, cert_end)
        if abs(counter - int(now * 1_000_000)) > self.max_skew_us:
            raise StaleError(f"counter of {cert.member_id!r} is {counter / 1e6 - now:+.1f} s off")
        sender = cert.member_id
        seen = self._seen.get(sender)
        self._check_fresh(sender, seen, counter)

        context = self._rcpt if flags & FLAG_BOUND else self._unbound
        try:
            key.verify(context + data[:sig_at], data[sig_at:])
        except (_NaclBadSignature, ValueError):
            raise BadSignatureError(f"datagram claiming {sender!r}: bad signature") from None

        self._accept(sender, seen, counter)
        self._cert_of[sender] = cert
        return Opened(sender, bytes(data[cert_end + 8 : sig_at]))

    def _check_fresh(self, sender: str, seen: array[int] | None, counter: int) -> None:
        if seen is None:
            if counter <= self._floor:
                raise ReplayedError(f"counter of {sender!r} is below the replay floor")
            return
        if len(seen) >= self.window and counter <= seen[0]:
            raise ReplayedError(f"counter of {sender!r} is older than the replay window")
        i = bisect.bisect_left(seen, counter)
        if i < len(seen) and seen[i] == counter:
            raise ReplayedError(f"counter of {sender!r} seen already")

    def _accept(self, sender: str, seen: array[int] | None, counter: int) -> None:
        table = self._seen
        if seen is None:
            table[sender] = array("Q", [counter])
            if len(table) > self.max_senders:
                gone, evicted = table.popitem(last=False)
                self._cert_of.pop(gone, None)
                self._floor = max(self._floor, evicted[-1])
            return
        table.move_to_end(sender)
        if counter > seen[-1]:
            seen.append(counter)
        else:
            bisect.insort(seen, counter)
        if len(seen) > self.window:
            del seen[0]


__all__ = [
    "CERT_CONTEXT",
    "CERT_FIXED_BYTES",
    "DATAGRAM_CONTEXT",
    "MAGIC",
    "OVERHEAD_FIXED_BYTES",
    "REASONS",
    "VERSION",
    "AuthError",
    "BadCertError",
    "BadSignatureError",
    "Certificate",
    "DatagramOpener",
    "DatagramSealer",
    "MalformedError",
    "Opened",
    "ReplayedError",
    "StaleError",
    "issue_cert",
    "overhead",
    "parse_cert",
    "verify_cert",
]
