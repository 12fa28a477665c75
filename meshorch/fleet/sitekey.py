"""Rotating the site's identity key towards the hub: records, proof, request (pure).

Every host of a site holds the site key (it is in the replicated state), so a revoked host
keeps it. The leader therefore rotates it after each committed revocation
(``meshorch.fleet.keyrotation`` does the I/O; docs/fleet-link.md, "Rotating the site key").

Records in the system table::

    fleet/site-key        the current key; besides ``seed`` it carries ``covers``: the Raft
                          index of the newest revocation the key was made after (absent on a
                          key never rotated: the record's own index stands for it)
    fleet/site-key-next   the pending key: made, perhaps announced, not yet the one in use

A rotation request (``POST /v1/link/key``) is signed by the current key like any site
request; its body carries the new public key and a proof of possession by the new key over
``"meshorch site key v1\\0" + site + "\\0" + public key hex + "\\0" + time`` (time with three
decimals), so nobody can bind a key it does not hold, nor reuse a proof for another site.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

SITE_KEY_NEXT_KEY = b"fleet/site-key-next"
PROOF_CONTEXT = b"meshorch site key v1\x00"
MAX_ROTATION_BODY = 1024  # the request is three short fields
ROTATION_FIELDS = frozenset({"public_key", "time", "proof"})


class RotationRefused(Exception):
    """A rotation request the hub refuses (400 ``bad_key_rotation``)."""


@dataclass(frozen=True, slots=True)
class CurrentKey:
    """``fleet/site-key``: the seed, and which revocations it postdates."""

    seed: bytes
    covers: int | None = None  # None: the record's own Raft index
    rotated_at: float | None = None
    reason: str = ""

    def encode(self) -> bytes:
        data: dict[str, Any] = {"v": 1, "seed": self.seed.hex()}
        if self.covers is not None:
            data.update(covers=self.covers, rotated_at=self.rotated_at, reason=self.reason)
        return orjson.dumps(data)

    @staticmethod
    def decode(raw: bytes) -> CurrentKey:
        data = orjson.loads(raw)
        covers = data.get("covers")
        return CurrentKey(
            bytes.fromhex(str(data["seed"])),
            None if covers is None else int(covers),
            data.get("rotated_at"),
            str(data.get("reason", "")),
        )


@dataclass(frozen=True, slots=True)
class PendingKey:
    """``fleet/site-key-next``: the key a rotation moves to, until the hub took it."""

    seed: bytes
    covers: int  # the newest revocation's Raft index when it was made
    reason: str  # "revocation" or "operator"
    requested_at: float

    @property
    def signing_key(self) -> SigningKey:
        return SigningKey(self.seed)

    @property
    def public_hex(self) -> str:
        return bytes(self.signing_key.verify_key).hex()

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "seed": self.seed.hex(),
                "covers": self.covers,
                "reason": self.reason,
                "requested_at": self.requested_at,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> PendingKey:
        data = orjson.loads(raw)
        return PendingKey(
            bytes.fromhex(str(data["seed"])),
            int(data["covers"]),
            str(data["reason"]),
            float(data["requested_at"]),
        )


def covered_index(current: CurrentKey, record_index: int) -> int:
    """The newest revocation the current key is known to postdate."""
    return record_index if current.covers is None else current.covers


def rotation_needed(covered: int, newest_revocation: int) -> bool:
    """A host was revoked after the current key was made: it may hold the key."""
    return newest_revocation > covered


def _proof_message(site_id: str, public_hex: str, time_text: str) -> bytes:
    return PROOF_CONTEXT + f"{site_id}\x00{public_hex}\x00{time_text}".encode()


def rotation_body(site_id: str, new_key: SigningKey, now: float) -> bytes:
    """The body of ``POST /v1/link/key`` moving ``site_id`` to ``new_key``."""
    stamp = round(now, 3)
    public_hex = bytes(new_key.verify_key).hex()
    proof = new_key.sign(_proof_message(site_id, public_hex, f"{stamp:.3f}")).signature
    return orjson.dumps({"public_key": public_hex, "time": stamp, "proof": proof.hex()})


def check_rotation(site_id: str, data: Mapping[str, Any], now: float, max_skew_s: float) -> str:
    """The new public key (hex) of a rotation request's parsed body, or RotationRefused:
    the proof must be the new key's signature, made within ``max_skew_s`` of ``now``."""
    unknown = set(data) - ROTATION_FIELDS
    if unknown:
        raise RotationRefused(f"unknown fields: {', '.join(sorted(unknown)[:5])}")
    public_hex, stamp, proof_hex = data.get("public_key"), data.get("time"), data.get("proof")
    if not isinstance(public_hex, str) or len(public_hex) != 64:
        raise RotationRefused("public_key is 64 hex digits")
    if not isinstance(proof_hex, str) or len(proof_hex) != 128:
        raise RotationRefused("proof is 128 hex digits")
    if isinstance(stamp, bool) or not isinstance(stamp, int | float) or not math.isfinite(stamp):
        raise RotationRefused("time is a number of seconds")
    if not abs(now - stamp) <= max_skew_s:
        raise RotationRefused(f"the proof's time is {now - stamp:+.0f} s from the hub's clock")
    try:
        key = VerifyKey(bytes.fromhex(public_hex))
        key.verify(_proof_message(site_id, public_hex, f"{stamp:.3f}"), bytes.fromhex(proof_hex))
    except (ValueError, BadSignatureError):
        raise RotationRefused("the proof is not the new key's signature") from None
    return public_hex.lower()
