"""Signed desired-state deltas: the fleet log shared by the hub and the sites (pure).

The hub appends deltas to one fleet-wide log; every site walks the whole log in order
and applies the operations of the deltas that target it. Anyone may relay a delta:
only the signature, the version and the chain decide whether a site applies it.

Wire form of one delta (an *envelope*), UTF-8 JSON::

    {"body": "<the body, canonical JSON, as a string>",
     "sigs": [{"key": "<hex Ed25519 public key>", "sig": "<hex signature of body>"}]}

The body (signed bytes, exactly as carried in the envelope)::

    {"v": 1, "fleet": "acme", "version": 7, "prev": "<sha256 hex of version 6's body>",
     "issued_at": 1790000000.0, "expires_at": 1790086400.0,
     "target": {"all": true} | {"sites": ["shop-1", ...]},
     "ops": [{"op": "app.put", "spec": {...}}, {"op": "app.delete", "name": "web"},
             {"op": "root.rotate", "new_key": "<hex>"}]}

Format 2 (per-site delta views): the signed body carries ``"v": 2`` and, instead of
``ops``, ``"ops_hash"``: the sha256 hex of the operations' canonical JSON (a list, keys
sorted). The operations travel next to the body, as that JSON in a string::

    {"body": "<the body>", "sigs": [...], "ops": "<the operations, canonical JSON>"}

Every site gets every delta's envelope (the chain stays one fleet-wide chain: order, no
omission, no fork), but ``ops`` only in the deltas that target it (or all sites): for the
others it gets the *header* (``body`` and ``sigs`` alone) and applies it as a no-op that
advances its trust state. ``view_for`` makes the view of one site; ``full_view`` says
whether an envelope carries its operations.

Merkle targets (format 2 only): a delta for many sites signs ``"target": {"merkle":
"<root>", "count": N}``, the root of a Merkle tree over the sorted site ids
(``meshorch.fleet.merkle``), instead of listing them. The hub's full envelope carries the
list beside the body (``"targets": [...]``, checked against the root); a site's view
carries instead its proof (``"proof": {...}``: member or not, 1-2 KB at 10,000 sites).
A site decides from the proof whether the delta is for it; a view relayed by another site
holds that site's proof, not this one's (``proof_missing``: fetch it from the hub).

A site applies a delta only when (checked in this order, first failure wins):

    too_large       the envelope is over MAX_DELTA_BYTES
    malformed       not an envelope, or a body that breaks the schema (truncation lands here)
    wrong_fleet     the body names another fleet
    unknown_key     no signature by a key the site trusts
    bad_signature   a trusted key's signature does not verify (or a rotation lacks the
                    new key's signature)
    replay          the version the site has already applied
    rollback        older than the version the site has applied
    ops_mismatch    (format 2) the ``ops`` carried do not hash to the signed ``ops_hash``
    ops_missing     (format 2) a delta that targets this site came without its ``ops``
                    (a header relayed by a site it does not target): fetch it from the hub
    proof_missing   (Merkle target) no proof of whether the delta is for this site (a
                    view relayed by another site): fetch it from the hub
    gap             newer than the next version: fetch the missing ones first (not an attack)
    chain_mismatch  ``prev`` is not the hash of the delta the site applied last
    expired         past ``expires_at`` -- unless a later delta of the same batch is still
                    fresh: a site that was cut off for longer than a delta's lifetime
                    catches up through the chain, whose fresh tip vouches for it.

The fleet root key is rotated by a ``root.rotate`` delta (target all) signed by the old
root key and by the new one; from then on only the new key is trusted.
Operations are not interpreted here: the site's applier decides what an ``app.put`` means.
"""

from __future__ import annotations

import hashlib
import itertools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import lru_cache
from typing import Any, Literal, get_args

import orjson
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey, VerifyKey

from meshorch.fleet import merkle

MAX_DELTA_BYTES = 256 * 1024
# A full envelope's list of a Merkle target's sites (the hub's copy, an export) is not
# counted in MAX_DELTA_BYTES; this bounds it (about 250,000 site ids).
MAX_TARGETS_BYTES = 16 * 1024 * 1024
MAX_SIGNATURES = 4
MAX_OPS = 256
FORMAT_VERSION = 1  # of the trust state, and of the first delta format
DELTA_V1 = 1
DELTA_V2 = 2  # per-site views: the body signs ``ops_hash``, the operations travel beside it
DELTA_FORMATS = (DELTA_V1, DELTA_V2)
GENESIS_HASH = "0" * 64
ROTATE_OP = "root.rotate"

Reason = Literal[
    "too_large",
    "malformed",
    "wrong_fleet",
    "unknown_key",
    "bad_signature",
    "ops_mismatch",
    "ops_missing",
    "proof_missing",
    "replay",
    "rollback",
    "gap",
    "chain_mismatch",
    "expired",
]
REASONS: tuple[Reason, ...] = get_args(Reason)


class DeltaRejected(Exception):
    """A delta the site must not apply. ``reason`` is one of ``REASONS``."""

    def __init__(self, reason: Reason, message: str, version: int | None = None) -> None:
        super().__init__(f"{reason}: {message}")
        self.reason: Reason = reason
        self.message = message
        self.version = version

    def to_json(self) -> dict[str, Any]:
        return {"reason": self.reason, "message": self.message, "version": self.version}


@dataclass(frozen=True, slots=True)
class Target:
    """Which sites a delta's operations are for. ``sites`` is empty when ``all``.

    A Merkle target (``root``, ``count``: what is signed) holds in ``sites`` what is known
    of it: every site (``complete``: the hub's copy, from the full envelope's list), or,
    from a site's view, the site its proof is about (``proven``) if a member."""

    all: bool = False
    sites: frozenset[str] = frozenset()
    root: str = ""  # a Merkle target: the root of the sorted site ids ...
    count: int = 0  # ... and how many they are
    complete: bool = True
    proven: str | None = None
    # The tree of a Merkle target this process built (``merkle_of``), kept for the proofs
    # of its views: not part of the value.
    tree: merkle.Tree | None = field(default=None, compare=False, repr=False)

    @staticmethod
    def merkle_of(sites: Iterable[str]) -> Target:
        tree = merkle.Tree.of(sites)
        return Target(sites=frozenset(tree.ids), root=tree.root, count=tree.count, tree=tree)

    def includes(self, site_id: str) -> bool:
        """Whether ``site_id`` is targeted (False also when unknown: ``decides``)."""
        return self.all or site_id in self.sites

    def decides(self, site_id: str) -> bool:
        """Whether what is known says if ``site_id`` is targeted or not."""
        return not self.root or self.complete or self.proven == site_id

    def to_json(self) -> dict[str, Any]:
        if self.root:
            return {"merkle": self.root, "count": self.count}
        return {"all": True} if self.all else {"sites": sorted(self.sites)}

    def describe(self) -> dict[str, Any]:
        """For people: a Merkle target with the sites known of it."""
        if self.root:
            return {**self.to_json(), "sites": sorted(self.sites)}
        return self.to_json()


ALL_SITES = Target(all=True)


@dataclass(frozen=True, slots=True)
class Delta:
    """A verified (or about to be signed) delta body."""

    fleet: str
    version: int
    prev: str
    issued_at: float
    expires_at: float
    target: Target
    ops: tuple[Mapping[str, Any], ...]
    digest: str = ""  # sha256 hex of the body bytes; set once encoded or parsed
    format: int = DELTA_V1
    ops_hash: str = ""  # format 2: sha256 hex of ``encode_ops(ops)`` (signed)
    has_ops: bool = True  # False: a format 2 header whose operations did not come along

    def body_json(self) -> dict[str, Any]:
        body: dict[str, Any] = {
            "v": self.format,
            "fleet": self.fleet,
            "version": self.version,
            "prev": self.prev,
            "issued_at": self.issued_at,
            "expires_at": self.expires_at,
            "target": self.target.to_json(),
        }
        if self.format == DELTA_V2:
            body["ops_hash"] = self.ops_hash or digest_of(encode_ops(self.ops))
        else:
            body["ops"] = [dict(op) for op in self.ops]
        return body

    def rotation_key(self) -> str | None:
        for op in self.ops:
            if op.get("op") == ROTATE_OP:
                return str(op["new_key"])
        return None


@dataclass(frozen=True, slots=True)
class TrustState:
    """What a site has applied of the fleet log, and whom it trusts. Stored in Raft."""

    fleet: str
    trusted_keys: frozenset[str]
    version: int = 0
    head: str = GENESIS_HASH

    def to_json(self) -> dict[str, Any]:
        return {
            "v": FORMAT_VERSION,
            "fleet": self.fleet,
            "trusted_keys": sorted(self.trusted_keys),
            "version": self.version,
            "head": self.head,
        }

    @staticmethod
    def from_json(data: Mapping[str, Any]) -> TrustState:
        return TrustState(
            fleet=str(data["fleet"]),
            trusted_keys=frozenset(str(k) for k in data["trusted_keys"]),
            version=int(data["version"]),
            head=str(data["head"]),
        )


@dataclass(slots=True)
class BatchResult:
    """Deltas accepted in order, the state after them, and why the rest stopped."""

    accepted: list[Delta] = field(default_factory=list)
    state: TrustState | None = None
    rejected: DeltaRejected | None = None


# -- keys ---------------------------------------------------------------------------


def key_id(key: SigningKey | VerifyKey) -> str:
    verify_key = key.verify_key if isinstance(key, SigningKey) else key
    return bytes(verify_key).hex()


def parse_key_id(text: str) -> str:
    """Validate a hex Ed25519 public key as given by an operator; returns it lower-cased."""
    text = text.strip().lower()
    if len(text) != 64 or not is_hex(text):
        raise ValueError("an Ed25519 public key is 64 hex characters")
    return text


@lru_cache(maxsize=64)
def _verify_key(hex_key: str) -> VerifyKey:
    return VerifyKey(bytes.fromhex(hex_key))


_HEX = re.compile("[0-9a-f]*")


def is_hex(text: str) -> bool:
    return _HEX.fullmatch(text) is not None


# -- signing (the hub) ----------------------------------------------------------------


def encode_body(delta: Delta) -> bytes:
    return orjson.dumps(delta.body_json(), option=orjson.OPT_SORT_KEYS)


def digest_of(body: bytes) -> str:
    return hashlib.sha256(body).hexdigest()


def encode_ops(ops: Iterable[Mapping[str, Any]]) -> bytes:
    """The canonical JSON of a format 2 delta's operations (what ``ops_hash`` hashes)."""
    return orjson.dumps([dict(op) for op in ops], option=orjson.OPT_SORT_KEYS)


def sign(delta: Delta, keys: Sequence[SigningKey]) -> tuple[bytes, Delta]:
    """Encode and sign; returns the envelope (the full view: a format 2 delta's ``ops``
    included) and the delta with its digest."""
    if not keys:
        raise ValueError("a delta needs at least one signature")
    if delta.format not in DELTA_FORMATS:
        raise ValueError(f"unknown delta format {delta.format}")
    if delta.format == DELTA_V2:
        ops_text = encode_ops(delta.ops)
        delta = replace(delta, ops_hash=digest_of(ops_text))
    if delta.target.root and (delta.format != DELTA_V2 or not delta.target.complete):
        raise ValueError("a Merkle target needs format 2 and every site it names")
    body = encode_body(delta)
    sigs = [{"key": key_id(k), "sig": k.sign(body).signature.hex()} for k in keys]
    wire: dict[str, Any] = {"body": body.decode(), "sigs": sigs}
    if delta.format == DELTA_V2:
        wire["ops"] = ops_text.decode()
    envelope = orjson.dumps(wire)
    if len(envelope) > MAX_DELTA_BYTES:
        raise ValueError(f"delta is {len(envelope)} bytes, over {MAX_DELTA_BYTES}")
    if delta.target.root:
        tree = delta.target.tree  # its ids are sorted: 10,000 ids are not sorted again
        built = tree.ids if tree is not None and tree.root == delta.target.root else None
        targets = orjson.dumps(built if built is not None else sorted(delta.target.sites))
        if len(targets) > MAX_TARGETS_BYTES:
            raise ValueError(f"its target list is {len(targets)} bytes, over {MAX_TARGETS_BYTES}")
        envelope = orjson.dumps({**wire, "targets": orjson.Fragment(targets)})
    return envelope, replace(delta, digest=digest_of(body))


def next_delta(
    fleet: str,
    head_version: int,
    head_hash: str,
    ops: Iterable[Mapping[str, Any]],
    target: Target,
    now: float,
    ttl_s: float,
    format: int = DELTA_V1,
) -> Delta:
    return Delta(
        fleet=fleet,
        version=head_version + 1,
        prev=head_hash,
        issued_at=now,
        expires_at=now + ttl_s,
        target=target,
        ops=tuple(ops),
        format=format,
    )


# -- per-site views (format 2) -------------------------------------------------------


def view_for(raw: bytes, site: str, tree: merkle.Tree | None = None) -> bytes:
    """The envelope as ``site`` may see it: a format 2 delta that does not target it
    without its ``ops`` (the header); a Merkle target's with ``site``'s proof instead of
    the list (``tree``: its tree, when the caller keeps it); anything else as it is.
    Raises DeltaRejected (too_large, malformed; proof_missing for a view made for
    another site)."""
    return view_of(_parse(raw, full=True), raw, site, tree)


def view_of(
    parsed: ParsedEnvelope, raw: bytes, site: str, tree: merkle.Tree | None = None
) -> bytes:
    """``view_for`` of an envelope already parsed."""
    target = parsed.delta.target
    if target.root:
        if not target.decides(site):
            raise DeltaRejected(
                "proof_missing", f"this view of the delta is not {site}'s", parsed.delta.version
            )
        proof: object = parsed.proof
        if target.complete:
            proof = (tree or merkle.Tree.of(target.sites)).proof(site)
        member = target.includes(site)
        return _envelope(parsed, with_ops=member, proof=proof)
    if parsed.ops_text is None or target.includes(site):
        return raw
    return header_of(parsed)


def _envelope(parsed: ParsedEnvelope, *, with_ops: bool, proof: object = None) -> bytes:
    wire: dict[str, Any] = {
        "body": parsed.body.decode(),
        "sigs": [{"key": k, "sig": s.hex()} for k, s in parsed.sigs],
    }
    if with_ops and parsed.ops_text is not None:
        wire["ops"] = parsed.ops_text.decode()
    if proof is not None:
        wire["proof"] = proof
    return orjson.dumps(wire)


def parse_full(raw: bytes, tree: merkle.Tree | None = None) -> ParsedEnvelope:
    """Parse an envelope without trusting it (for ``header_of``). Raises DeltaRejected.
    ``tree``: the Merkle tree the caller built of the target's list, if it did: a list
    equal to its ids is not hashed again."""
    return _parse(raw, full=True, tree=tree)


def header_of(parsed: ParsedEnvelope) -> bytes:
    return _envelope(parsed, with_ops=False)


def full_view(raw: bytes) -> bool:
    """Whether ``raw`` carries its operations (always for format 1)."""
    return _parse(raw, full=True).delta.has_ops


# -- parsing and verification (the sites) ---------------------------------------------


@dataclass(frozen=True, slots=True)
class ParsedEnvelope:
    delta: Delta
    body: bytes
    sigs: tuple[tuple[str, bytes], ...]
    ops_text: bytes | None = None  # format 2: the ``ops`` string carried (None: a header)
    proof: object = None  # a Merkle target's view: the proof it carries (checked)


def parse(raw: bytes) -> tuple[Delta, bytes, tuple[tuple[str, bytes], ...]]:
    """Parse an envelope without trusting it (a full one, with a Merkle target's list, may
    exceed MAX_DELTA_BYTES by that list). Raises DeltaRejected (too_large, malformed)."""
    parsed = _parse(raw, full=True)
    return parsed.delta, parsed.body, parsed.sigs


def _malformed(message: str) -> DeltaRejected:
    return DeltaRejected("malformed", message)


_ENVELOPE_EXTRAS = {"ops", "targets", "proof"}


def _too_large(size: int) -> DeltaRejected:
    return DeltaRejected("too_large", f"{size} bytes, the limit is {MAX_DELTA_BYTES}")


def _parse(raw: bytes, *, full: bool = False, tree: merkle.Tree | None = None) -> ParsedEnvelope:
    """``full``: the envelope may carry a Merkle target's list beyond MAX_DELTA_BYTES (the
    hub's copy; never what a site verifies, so a stranger's bytes cost a site at most
    MAX_DELTA_BYTES of parsing)."""
    if len(raw) > MAX_DELTA_BYTES + (MAX_TARGETS_BYTES if full else 0):
        raise _too_large(len(raw))
    try:
        envelope = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        if len(raw) > MAX_DELTA_BYTES:
            raise _too_large(len(raw)) from None
        raise _malformed(f"envelope is not JSON ({exc})") from None
    if not isinstance(envelope, dict) or set(envelope) - _ENVELOPE_EXTRAS != {"body", "sigs"}:
        raise _malformed(
            "an envelope is an object with 'body', 'sigs' and (format 2) 'ops', and "
            "'targets' or 'proof' (Merkle targets)"
        )
    targets = envelope.get("targets")
    size = len(raw) if targets is None else len(raw) - len(orjson.dumps(targets))
    if size > MAX_DELTA_BYTES:
        raise _too_large(size)
    body_text, raw_sigs = envelope["body"], envelope["sigs"]
    ops_text = envelope.get("ops")
    if ops_text is not None and not isinstance(ops_text, str):
        raise _malformed("'ops' is a string (the operations' JSON)")
    if not isinstance(body_text, str) or not isinstance(raw_sigs, list):
        raise _malformed("'body' is a string and 'sigs' a list")
    if not 1 <= len(raw_sigs) <= MAX_SIGNATURES:
        raise _malformed(f"1 to {MAX_SIGNATURES} signatures")
    sigs = tuple(parse_signature(s) for s in raw_sigs)
    body = body_text.encode()
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise _malformed(f"body is not JSON ({exc})") from None
    ops_bytes = None if ops_text is None else ops_text.encode()
    delta = _parse_body(data, digest_of(body), ops_bytes)
    proof = envelope.get("proof")
    if delta.target.root:
        delta = replace(delta, target=_known_targets(delta, targets, proof, tree))
    elif targets is not None or proof is not None:
        raise _malformed("'targets' and 'proof' go only with a Merkle target")
    return ParsedEnvelope(delta, body, sigs, ops_bytes, proof)


def _known_targets(
    delta: Delta, targets: object, proof: object, tree: merkle.Tree | None = None
) -> Target:
    """What the full list or the proof beside a Merkle target says (checked against the
    signed root and count); DeltaRejected (malformed) when it does not hold."""
    target = delta.target
    if targets is not None and proof is not None:
        raise _malformed("an envelope carries a Merkle target's list or a proof, not both")
    if targets is not None:
        if (
            not isinstance(targets, list)
            or not all(isinstance(t, str) and t for t in targets)
            or len(targets) != target.count
            or any(a >= b for a, b in itertools.pairwise(targets))
        ):
            raise _malformed("'targets' is the sorted list of the target's site ids")
        built = tree is not None and tree.root == target.root and tree.ids == tuple(targets)
        if not built and merkle.Tree.of(targets).root != target.root:
            raise _malformed("'targets' does not hash to the signed Merkle root")
        return replace(target, sites=frozenset(targets), complete=True)
    if proof is None:
        return replace(target, complete=False)
    try:
        site, member = merkle.verify(proof, target.root, target.count)
    except merkle.BadProof as exc:
        raise _malformed(f"the Merkle proof does not hold: {exc}") from None
    sites = frozenset({site}) if member else frozenset()
    return replace(target, sites=sites, complete=False, proven=site)


def parse_signature(item: object) -> tuple[str, bytes]:
    """One ``{"key", "sig"}`` entry of an envelope; DeltaRejected (malformed) otherwise."""
    if not isinstance(item, dict) or set(item) != {"key", "sig"}:
        raise _malformed("a signature is an object with exactly 'key' and 'sig'")
    key, sig = item["key"], item["sig"]
    if not isinstance(key, str) or len(key) != 64 or not is_hex(key):
        raise _malformed("a signature's key is 64 lower-case hex characters")
    if not isinstance(sig, str) or len(sig) != 128 or not is_hex(sig):
        raise _malformed("a signature is 128 lower-case hex characters")
    return key, bytes.fromhex(sig)


_HEAD_FIELDS = {"v", "fleet", "version", "prev", "issued_at", "expires_at", "target"}
_BODY_FIELDS = {DELTA_V1: _HEAD_FIELDS | {"ops"}, DELTA_V2: _HEAD_FIELDS | {"ops_hash"}}


def _parse_body(data: object, digest: str, ops_text: bytes | None = None) -> Delta:
    if not isinstance(data, dict) or type(data.get("v")) is not int:
        raise _malformed("a body is an object with an integer 'v'")
    form = data["v"]
    if form not in DELTA_FORMATS:
        raise _malformed(f"unsupported delta format {form!r}")
    if set(data) != _BODY_FIELDS[form]:
        fields = sorted(_BODY_FIELDS[form])
        raise _malformed(f"a format {form} body has exactly the fields {fields}")
    ops_hash = ""
    if form == DELTA_V2:
        ops_hash = data["ops_hash"]
        if not isinstance(ops_hash, str) or len(ops_hash) != 64 or not is_hex(ops_hash):
            raise _malformed("'ops_hash' is a sha256 hex digest")
        if ops_text is None:
            data = {**data, "ops": []}
        else:
            try:
                data = {**data, "ops": orjson.loads(ops_text)}
            except orjson.JSONDecodeError as exc:
                raise _malformed(f"'ops' is not JSON ({exc})") from None
    elif ops_text is not None:
        raise _malformed("a format 1 envelope carries its operations in the body")
    fleet, version, prev = data["fleet"], data["version"], data["prev"]
    if not isinstance(fleet, str) or not fleet:
        raise _malformed("'fleet' is a non-empty string")
    if type(version) is not int or version < 1:
        raise _malformed("'version' is an integer >= 1")
    if not isinstance(prev, str) or len(prev) != 64 or not is_hex(prev):
        raise _malformed("'prev' is a sha256 hex digest")
    issued_at, expires_at = data["issued_at"], data["expires_at"]
    for name, value in (("issued_at", issued_at), ("expires_at", expires_at)):
        if type(value) not in (int, float) or value != value:  # rejects bool and NaN
            raise _malformed(f"{name!r} is a number of seconds")
    ops = data["ops"]
    if not isinstance(ops, list) or len(ops) > MAX_OPS:
        raise _malformed(f"'ops' is a list of at most {MAX_OPS}")
    for op in ops:
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise _malformed("each operation is an object with an 'op' string")
    delta = Delta(
        fleet=fleet,
        version=version,
        prev=prev,
        issued_at=float(issued_at),
        expires_at=float(expires_at),
        target=_parse_target(data["target"], form),
        ops=tuple(ops),
        digest=digest,
        format=form,
        ops_hash=ops_hash,
        has_ops=form == DELTA_V1 or ops_text is not None,
    )
    rotation = [op for op in ops if op["op"] == ROTATE_OP]
    if rotation:
        new_key = rotation[0].get("new_key")
        if len(rotation) > 1 or not delta.target.all:
            raise _malformed("a root rotation is the only rotation of a delta that targets all")
        if not isinstance(new_key, str) or len(new_key) != 64 or not is_hex(new_key):
            raise _malformed("'new_key' is 64 lower-case hex characters")
    return delta


def _parse_target(target: object, form: int) -> Target:
    if target == {"all": True}:
        return ALL_SITES
    if isinstance(target, dict) and set(target) == {"sites"}:
        sites = target["sites"]
        if isinstance(sites, list) and all(isinstance(s, str) and s for s in sites):
            return Target(sites=frozenset(sites))
    if isinstance(target, dict) and set(target) == {"merkle", "count"} and form == DELTA_V2:
        root, count = target["merkle"], target["count"]
        valid_root = isinstance(root, str) and len(root) == 64 and is_hex(root)
        if valid_root and type(count) is int and 1 <= count < 2**merkle.MAX_DEPTH:
            return Target(root=root, count=count, complete=False)
    raise _malformed(
        '\'target\' is {"all": true}, {"sites": [names]} or (format 2) {"merkle": root, "count": n}'
    )


def _check_signatures(parsed: ParsedEnvelope, state: TrustState) -> None:
    check_signatures(parsed.delta, parsed.body, parsed.sigs, state.trusted_keys)


def check_signatures(
    delta: Delta, body: bytes, sigs: Sequence[tuple[str, bytes]], trusted_keys: frozenset[str]
) -> None:
    """A trusted key signed ``body``, every signature verifies, and a rotation is signed by
    its new key too. Raises DeltaRejected (unknown_key, bad_signature)."""
    trusted = [(key, sig) for key, sig in sigs if key in trusted_keys]
    if not trusted:
        raise DeltaRejected("unknown_key", "not signed by a key this site trusts", delta.version)
    for key, sig in sigs:
        if not signature_valid(key, sig, body):
            raise DeltaRejected(
                "bad_signature", f"signature by {key[:12]}... does not verify", delta.version
            )
    new_key = delta.rotation_key()
    if new_key is not None and new_key not in {key for key, _ in sigs}:
        raise DeltaRejected(
            "bad_signature", "a root rotation must also be signed by the new key", delta.version
        )


def signature_valid(key: str, sig: bytes, body: bytes) -> bool:
    try:
        _verify_key(key).verify(body, sig)
    except (BadSignatureError, ValueError):
        return False
    return True


def _check_order(delta: Delta, state: TrustState) -> None:
    if delta.version == state.version:
        if delta.digest == state.head:
            raise DeltaRejected("replay", f"version {delta.version} is applied", delta.version)
        raise DeltaRejected(
            "chain_mismatch",
            f"another delta with version {delta.version} was applied",
            delta.version,
        )
    if delta.version < state.version:
        raise DeltaRejected(
            "rollback", f"version {delta.version} < applied {state.version}", delta.version
        )
    if delta.version > state.version + 1:
        raise DeltaRejected(
            "gap", f"version {delta.version}, next is {state.version + 1}", delta.version
        )
    if delta.prev != state.head:
        raise DeltaRejected(
            "chain_mismatch",
            f"prev {delta.prev[:12]}... is not the applied head {state.head[:12]}...",
            delta.version,
        )


def _advance(delta: Delta, state: TrustState) -> TrustState:
    new_key = delta.rotation_key()
    trusted = frozenset({new_key}) if new_key is not None else state.trusted_keys
    return replace(state, version=delta.version, head=delta.digest, trusted_keys=trusted)


def _check_ops(parsed: ParsedEnvelope, site: str | None) -> Delta:
    """A format 2 delta's operations against its signed ``ops_hash``; the delta as
    ``site`` applies it (a header for a delta that does not target it). ``site`` None:
    the operations must be there (the hub, a check of the full view)."""
    delta = parsed.delta
    if delta.format != DELTA_V2:
        return delta
    if site is not None and not delta.target.decides(site):
        raise DeltaRejected(
            "proof_missing",
            "no proof of whether this delta (a Merkle target) is for this site",
            delta.version,
        )
    targeted = site is None or delta.target.includes(site)
    if parsed.ops_text is not None:
        if digest_of(parsed.ops_text) != delta.ops_hash:
            raise DeltaRejected(
                "ops_mismatch", "the operations do not match the signed ops_hash", delta.version
            )
        if not targeted:  # not this site's: applied (and kept, relayed) as a header
            return replace(delta, ops=(), has_ops=False)
        return delta
    if targeted:
        raise DeltaRejected(
            "ops_missing", "a delta for this site came without its operations", delta.version
        )
    return delta


def verify_chain(
    raw: bytes, state: TrustState, site: str | None = None, *, full: bool = False
) -> tuple[Delta, TrustState]:
    """Every check but expiry. Returns the delta (as ``site`` applies it: ``_check_ops``)
    and the state after applying it. ``full``: a full envelope (``_parse``) is taken."""
    parsed = _parse(raw, full=full)
    if parsed.delta.fleet != state.fleet:
        raise DeltaRejected(
            "wrong_fleet",
            f"for fleet {parsed.delta.fleet!r}, this site is in {state.fleet!r}",
            parsed.delta.version,
        )
    _check_signatures(parsed, state)
    delta = _check_ops(parsed, site)
    _check_order(delta, state)
    return delta, _advance(delta, state)


def verify(
    raw: bytes, state: TrustState, now: float, site: str | None = None
) -> tuple[Delta, TrustState]:
    """One delta on its own: every check, expiry included."""
    result = verify_batch([raw], state, now, site)
    if result.rejected is not None:
        raise result.rejected
    assert result.state is not None  # accepted one delta
    return result.accepted[0], result.state


def verify_batch(
    raws: Sequence[bytes], state: TrustState, now: float, site: str | None = None
) -> BatchResult:
    """Verify consecutive deltas (for ``site``: ``verify_chain``); accept the longest
    prefix whose last delta is fresh.

    Deltas past their expiry are accepted only on the way to a fresh one: the tip's
    freshness vouches for the chain that leads to it.
    """
    chained: list[tuple[Delta, TrustState]] = []
    rejected: DeltaRejected | None = None
    current = state
    for raw in raws:
        try:
            delta, current = verify_chain(raw, current, site)
        except DeltaRejected as exc:
            rejected = exc
            break
        chained.append((delta, current))
    fresh = max((i for i, (d, _) in enumerate(chained) if d.expires_at > now), default=-1)
    if fresh < len(chained) - 1:
        stale = chained[fresh + 1][0]
        rejected = DeltaRejected(
            "expired", f"expired {now - stale.expires_at:.0f} s ago", stale.version
        )
    accepted = chained[: fresh + 1]
    return BatchResult(
        accepted=[d for d, _ in accepted],
        state=accepted[-1][1] if accepted else state,
        rejected=rejected,
    )
