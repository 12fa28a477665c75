"""Signed snapshots of one site's desired state (pure): how a far-behind site catches up.

A site that cannot follow the fleet log from where it is (the hub compacted the deltas it
needs, or the next page has expired and no fresh delta follows it in that page) fetches a
snapshot of its own desired state at the hub's head version N, signed by the fleet root
key, and follows the log's tail from N. Wire form (the same envelope as a delta)::

    {"body": "<canonical JSON>", "sigs": [{"key": "<hex>", "sig": "<hex>"}]}

The body::

    {"v": 1, "kind": "snapshot", "fleet": "acme", "site": "shop-1", "version": N,
     "head": "<sha256 hex of delta N's body: the tail chains onto it>",
     "issued_at": ..., "expires_at": ...,
     "ops": [{"at": <version of the delta the op came from>, "op": {...}}, ...]}

``ops`` is the fold of every operation of deltas 1..N that targeted this site: per thing
an operation sets (an application by name, a tenant's quota, a secret, the lock-down, the
agent release, ...) only the last operation, deletions included, in log order. Secret
values sealed to other sites are left out.

Signed by a root key at N. Root keys rotated after the site's applied version are proved
by the ``root.rotate`` delta envelopes that carried them (each signed by the old key and
the new one), given with the snapshot and walked in order from the site's trusted keys.

A site applies a snapshot only when (first failure wins; the reason is ``snapshot_<r>``
in the site's rejections): too_large, malformed, wrong_fleet, wrong_site, unknown_key
(not signed by a key the site trusts, after the rotations), bad_signature, replay (the
version the site applied), rollback (older), expired.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import orjson
from nacl.signing import SigningKey

from meshorch.fleet import delta as deltas
from meshorch.fleet.delta import DeltaRejected, TrustState, key_id

MAX_SNAPSHOT_BYTES = 64 * 1024 * 1024
MAX_SNAPSHOT_OPS = 100_000
MAX_ROTATIONS = 64
KIND = "snapshot"
FORMAT_VERSION = 1

Reason = Literal[
    "too_large",
    "malformed",
    "wrong_fleet",
    "wrong_site",
    "unknown_key",
    "bad_signature",
    "replay",
    "rollback",
    "expired",
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class SnapshotRejected(Exception):
    """A snapshot the site must not apply; ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: Reason, message: str, version: int | None = None) -> None:
        super().__init__(f"snapshot {reason}: {message}")
        self.reason: Reason = reason
        self.message = message
        self.version = version


@dataclass(frozen=True, slots=True)
class SnapshotOp:
    at: int  # the version of the delta the operation came from
    op: Mapping[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "op": dict(self.op)}


@dataclass(frozen=True, slots=True)
class Snapshot:
    fleet: str
    site: str
    version: int
    head: str
    issued_at: float
    expires_at: float
    ops: tuple[SnapshotOp, ...]

    def body_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "kind": KIND,
            "fleet": self.fleet,
            "site": self.site,
            "version": self.version,
            "head": self.head,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "ops": [op.to_json() for op in self.ops],
        }


# -- the hub --------------------------------------------------------------------------


def sign_snapshot(snapshot: Snapshot, keys: Sequence[SigningKey]) -> bytes:
    """The envelope of ``snapshot`` signed by ``keys`` (the fleet root key)."""
    if not keys:
        raise ValueError("a snapshot needs at least one signature")
    body = orjson.dumps(snapshot.body_json(), option=orjson.OPT_SORT_KEYS)
    sigs = [{"key": key_id(k), "sig": k.sign(body).signature.hex()} for k in keys]
    return orjson.dumps({"body": body.decode(), "sigs": sigs})


# -- the site -------------------------------------------------------------------------


def _malformed(message: str) -> SnapshotRejected:
    return SnapshotRejected("malformed", message)


_BODY_FIELDS = {"v", "kind", "fleet", "site", "version", "head", "issued_at", "expires_at", "ops"}


def parse_snapshot(raw: bytes) -> tuple[Snapshot, bytes, tuple[tuple[str, bytes], ...]]:
    """Parse an envelope without trusting it. Raises SnapshotRejected (too_large, malformed)."""
    if len(raw) > MAX_SNAPSHOT_BYTES:
        raise SnapshotRejected("too_large", f"{len(raw)} bytes, the limit is {MAX_SNAPSHOT_BYTES}")
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"envelope is not JSON ({exc})") from None
    if not isinstance(envelope, dict) or set(envelope) != {"body", "sigs"}:
        raise _malformed("an envelope is an object with exactly 'body' and 'sigs'")
    body_text, raw_sigs = envelope["body"], envelope["sigs"]
    if not isinstance(body_text, str) or not isinstance(raw_sigs, list):
        raise _malformed("'body' is a string and 'sigs' a list")
    if not 1 <= len(raw_sigs) <= deltas.MAX_SIGNATURES:
        raise _malformed(f"1 to {deltas.MAX_SIGNATURES} signatures")
    try:
        sigs = tuple(deltas.parse_signature(s) for s in raw_sigs)
    except DeltaRejected as exc:
        raise _malformed(exc.message) from None
    body = body_text.encode()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"body is not JSON ({exc})") from None
    return _parse_body(data), body, sigs


def _parse_body(data: object) -> Snapshot:
    if not isinstance(data, dict) or set(data) != _BODY_FIELDS:
        raise _malformed(f"a snapshot body has exactly the fields {sorted(_BODY_FIELDS)}")
    if data["v"] != FORMAT_VERSION or data["kind"] != KIND:
        raise _malformed(f"not a snapshot of format {FORMAT_VERSION}")
    fleet, site, version, head = data["fleet"], data["site"], data["version"], data["head"]
    if not isinstance(fleet, str) or not fleet or not isinstance(site, str) or not site:
        raise _malformed("'fleet' and 'site' are non-empty strings")
    if type(version) is not int or version < 1:
        raise _malformed("'version' is an integer >= 1")
    if not isinstance(head, str) or len(head) != 64 or not deltas.is_hex(head):
        raise _malformed("'head' is a sha256 hex digest")
    times = data["issued_at"], data["expires_at"]
    if any(type(t) not in (int, float) or t != t for t in times):  # rejects bool and NaN
        raise _malformed("'issued_at' and 'expires_at' are numbers of seconds")
    raw_ops = data["ops"]
    if not isinstance(raw_ops, list) or len(raw_ops) > MAX_SNAPSHOT_OPS:
        raise _malformed(f"'ops' is a list of at most {MAX_SNAPSHOT_OPS}")
    ops = []
    for item in raw_ops:
        if not isinstance(item, dict) or set(item) != {"at", "op"}:
            raise _malformed("each entry of 'ops' is {'at': version, 'op': {...}}")
        at, op = item["at"], item["op"]
        if type(at) is not int or not 1 <= at <= version:
            raise _malformed(f"an op's 'at' is a version from 1 to {version}")
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise _malformed("each operation is an object with an 'op' string")
        ops.append(SnapshotOp(at, op))
    return Snapshot(fleet, site, version, head, float(times[0]), float(times[1]), tuple(ops))


def _follow_rotations(
    rotations: Sequence[bytes], state: TrustState, version: int
) -> frozenset[str]:
    """The keys trusted after the ``root.rotate`` envelopes (each signed by a key trusted
    then, and by its new key), for rotations after the applied version up to ``version``."""
    if len(rotations) > MAX_ROTATIONS:
        raise _malformed(f"at most {MAX_ROTATIONS} rotations")
    trusted, last = state.trusted_keys, state.version
    for raw in rotations:
        try:
            rotation, body, sigs = deltas.parse(raw)
        except DeltaRejected as exc:
            raise _malformed(f"rotation: {exc.message}") from None
        new_key = rotation.rotation_key()
        if rotation.fleet != state.fleet:
            raise SnapshotRejected("wrong_fleet", f"a rotation of fleet {rotation.fleet!r}")
        if new_key is None or not last < rotation.version <= version:
            raise _malformed(
                f"rotations are root.rotate deltas in order, after version {state.version} "
                f"up to {version}"
            )
        try:
            deltas.check_signatures(rotation, body, sigs, trusted)
        except DeltaRejected as exc:
            reason: Reason = "unknown_key" if exc.reason == "unknown_key" else "bad_signature"
            raise SnapshotRejected(
                reason, f"rotation {rotation.version}: {exc.message}", version
            ) from None
        trusted, last = frozenset({new_key}), rotation.version
    return trusted


def verify_snapshot(
    raw: bytes,
    rotations: Sequence[bytes],
    state: TrustState,
    site_id: str,
    now: float,
) -> tuple[Snapshot, TrustState]:
    """Every check (module docstring); returns the snapshot and the state after it."""
    snapshot, body, sigs = parse_snapshot(raw)
    version = snapshot.version
    if snapshot.fleet != state.fleet:
        raise SnapshotRejected(
            "wrong_fleet", f"for fleet {snapshot.fleet!r}, this site is in {state.fleet!r}", version
        )
    if snapshot.site != site_id:
        raise SnapshotRejected(
            "wrong_site", f"for site {snapshot.site!r}, this is {site_id!r}", version
        )
    trusted = _follow_rotations(rotations, state, version)
    if not any(key in trusted for key, _ in sigs):
        raise SnapshotRejected("unknown_key", "not signed by a fleet root key", version)
    for key, sig in sigs:
        if not deltas.signature_valid(key, sig, body):
            raise SnapshotRejected(
                "bad_signature", f"signature by {key[:12]}... does not verify", version
            )
    if version == state.version:
        raise SnapshotRejected("replay", f"version {version} is applied", version)
    if version < state.version:
        raise SnapshotRejected("rollback", f"version {version} < applied {state.version}", version)
    if snapshot.expires_at <= now:
        raise SnapshotRejected("expired", f"expired {now - snapshot.expires_at:.0f} s ago", version)
    after = TrustState(fleet=state.fleet, trusted_keys=trusted, version=version, head=snapshot.head)
    return snapshot, after
