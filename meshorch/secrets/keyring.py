"""Secrets at a site, pure: the key hierarchy, the records in Raft, the plans that change them.

No disk, no clock, no sockets: callers pass ``now`` and the random bytes of new keys, and
get Raft operations back (docs/secrets.md)::

    KEK   32 bytes, the "unseal key": only in the memory of the site's hosts
    SSK   X25519 keypair: public half in Raft as is (the hub seals secrets to it),
          private half in Raft wrapped under the KEK
    DK_n  32-byte data keys, wrapped under the KEK; the current one encrypts the values

Every wrapped blob is a SecretBox (XSalsa20-Poly1305) of ``context || plaintext``, where
``context`` names what the blob is (``meshorch/dk/3``,
``meshorch/secret/default/db-password/2``): a blob tampered with, or moved to another
record, does not open.

Records of the ``secrets`` table (versioned JSON, orjson)::

    ring                  Keyring: the SSK (public, wrapped private), the SSKs it replaced
                          (wrapped), and the revocations it accounts for
    dkstate               DataKeyState: current data key id, last rotation
    dk/{id:08d}           DataKey: a wrapped data key
    secret/{tenant}/{name} SecretRecord: "sealed" (to the SSK, as delivered), "ready"
                          (under a data key) or "failed" (could not be opened)
    hostkey/{host_id}     a host's X25519 public key (unseal answers are sealed to it)
                          (registered by a member; a hostkey of a non-member is a host
                          removed, that is revoked, since)
    lockdown              present while the site is locked down
    rotate                a rotation asked for (a delta or the API)
    settings              SecretSettings: the rotation interval

Its size: the whole key hierarchy (records, wrapping, sealing, the rotation and unseal
plans) is one pure module so its invariants can be tested without I/O.
"""

from __future__ import annotations

import base64
import binascii
import re
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import orjson
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox
from nacl.secret import SecretBox

from meshorch.errors import MeshorchError, RemoteInputError
from meshorch.state.tables import SECRETS_TABLE
from raft import Delete, Guard, Put

KEY_BYTES = 32
MAX_SECRET_BYTES = 64 * 1024
SEAL_OVERHEAD = 48  # a SealedBox: the ephemeral public key (32) and the MAC (16)
DEFAULT_TENANT = "default"
DEFAULT_ROTATION_INTERVAL_S = 24 * 3600.0
MIN_ROTATION_INTERVAL_S = 1.0
MAX_ROTATION_INTERVAL_S = 365 * 86400.0
REWRAP_BATCH = 64  # secrets per Raft proposal
# SSKs a rekey replaced stay (wrapped under the new KEK) this long, so a secret the hub
# sealed to one before it learnt the new key still opens; at most this many are kept.
PREVIOUS_SSK_KEEP_S = 3600.0
MAX_PREVIOUS_SSKS = 4

RING_KEY = b"ring"
DKSTATE_KEY = b"dkstate"
DK_PREFIX = b"dk/"
SECRET_PREFIX = b"secret/"
HOSTKEY_PREFIX = b"hostkey/"
LOCKDOWN_KEY = b"lockdown"
ROTATE_KEY = b"rotate"
SETTINGS_KEY = b"settings"

SSK_CONTEXT = "meshorch/ssk"

SECRET_NAME_PATTERN = r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,126}[A-Za-z0-9])?"
_SECRET_NAME_RE = re.compile(SECRET_NAME_PATTERN)
_TENANT_RE = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?")
_FILE_PART_RE = re.compile(r"[A-Za-z0-9._-]{1,255}")
SECRET_NAME_RULE = (
    "1-128 of A-Z, a-z, 0-9, '.', '_', '-', starting and ending with a letter or digit"
)
TENANT_RULE = "1-63 of a-z, 0-9 and '-', not starting or ending with '-'"
FILE_RULE = "a relative path of parts made of A-Z, a-z, 0-9, '.', '_', '-' (no '.' or '..')"


class SecretsError(MeshorchError):
    """A secret or key could not be used (tampered, wrong key, missing)."""


class Tampered(SecretsError):
    """A blob did not open: wrong key, altered bytes, or moved to another record."""


# -- names -------------------------------------------------------------------------------


def is_secret_name(name: object) -> bool:
    return isinstance(name, str) and _SECRET_NAME_RE.fullmatch(name) is not None


def is_tenant(tenant: object) -> bool:
    return isinstance(tenant, str) and _TENANT_RE.fullmatch(tenant) is not None


def is_secret_file(path: object) -> bool:
    """A clean relative path below the secrets directory (at most 4 levels, 255 chars)."""
    if not isinstance(path, str) or not 0 < len(path) <= 255:
        return False
    parts = path.split("/")
    return len(parts) <= 4 and all(
        _FILE_PART_RE.fullmatch(p) is not None and p not in (".", "..") for p in parts
    )


# -- blobs -------------------------------------------------------------------------------

_CTX_LEN = struct.Struct(">H")


def wrap(key: bytes, context: str, plaintext: bytes, nonce: bytes | None = None) -> bytes:
    """SecretBox of ``context || plaintext`` under ``key`` (nonce random unless given)."""
    ctx = context.encode()
    return bytes(SecretBox(key).encrypt(_CTX_LEN.pack(len(ctx)) + ctx + plaintext, nonce))


def unwrap(key: bytes, context: str, blob: bytes) -> bytes:
    """The plaintext of ``wrap(key, context, ...)``; raises Tampered otherwise."""
    try:
        opened = SecretBox(key).decrypt(blob)
    except (CryptoError, ValueError, TypeError) as exc:
        raise Tampered(f"{context}: does not open with this key") from exc
    ctx = context.encode()
    head = _CTX_LEN.pack(len(ctx)) + ctx
    if not opened.startswith(head):
        raise Tampered(f"{context}: the blob belongs to another record")
    return opened[len(head) :]


def seal(public_key: bytes, plaintext: bytes) -> bytes:
    """A SealedBox to an X25519 public key: only its private half opens it."""
    return bytes(SealedBox(PublicKey(public_key)).encrypt(plaintext))


def open_sealed(private_key: PrivateKey, blob: bytes) -> bytes:
    try:
        return bytes(SealedBox(private_key).decrypt(blob))
    except (CryptoError, ValueError, TypeError) as exc:
        raise Tampered("the sealed blob does not open with this key") from exc


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def unb64(text: object, what: str, max_bytes: int) -> bytes:
    """Strict base64 (raises RemoteInputError ``bad_base64``)."""
    if not isinstance(text, str) or len(text) > (max_bytes + 2) // 3 * 4:
        raise RemoteInputError("bad_base64", f"{what}: base64 of at most {max_bytes} bytes")
    try:
        return base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError) as exc:
        raise RemoteInputError("bad_base64", f"{what}: not valid base64") from exc


def parse_public_key(text: object, what: str = "public_key") -> bytes:
    """A hex X25519 public key (64 hex characters); raises RemoteInputError."""
    if isinstance(text, str) and len(text) == 64:
        try:
            return bytes.fromhex(text)
        except ValueError:
            pass
    raise RemoteInputError("bad_public_key", f"{what}: an X25519 public key, 64 hex characters")


def secret_context(tenant: str, name: str, version: int) -> str:
    return f"meshorch/secret/{tenant}/{name}/{version}"


def dk_context(dk_id: int) -> str:
    return f"meshorch/dk/{dk_id}"


def previous_ssk_context(public: bytes) -> str:
    return f"meshorch/ssk/{public.hex()}"


# -- records -----------------------------------------------------------------------------


def _dumps(data: Mapping[str, Any]) -> bytes:
    return orjson.dumps({"v": 1, **data})


@dataclass(frozen=True, slots=True)
class PreviousSsk:
    """An SSK a rekey replaced: its private half wrapped under the current KEK."""

    public: bytes
    wrapped: bytes

    def open(self, kek: bytes) -> PrivateKey:
        private = PrivateKey(unwrap(kek, previous_ssk_context(self.public), self.wrapped))
        if bytes(private.public_key) != self.public:
            raise Tampered("a previous site key's public and private halves differ")
        return private


@dataclass(frozen=True, slots=True)
class Keyring:
    """``generation`` counts rekeys; ``revoked_index`` is the Raft index of the newest
    revocation record this keyring accounts for; ``rotated_at`` when the last rekey was."""

    ssk_public: bytes
    ssk_wrapped: bytes
    created_at: float
    previous: tuple[PreviousSsk, ...] = ()
    generation: int = 1
    revoked_index: int = 0
    rotated_at: float | None = None

    def encode(self) -> bytes:
        return _dumps(
            {
                "ssk_public": self.ssk_public.hex(),
                "ssk_wrapped": b64(self.ssk_wrapped),
                "created_at": self.created_at,
                "previous": [
                    {"ssk_public": p.public.hex(), "ssk_wrapped": b64(p.wrapped)}
                    for p in self.previous
                ],
                "generation": self.generation,
                "revoked_index": self.revoked_index,
                "rotated_at": self.rotated_at,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> Keyring:
        data = orjson.loads(raw)
        rotated_at = data.get("rotated_at")
        return Keyring(
            bytes.fromhex(data["ssk_public"]),
            base64.b64decode(data["ssk_wrapped"]),
            float(data["created_at"]),
            tuple(
                PreviousSsk(bytes.fromhex(p["ssk_public"]), base64.b64decode(p["ssk_wrapped"]))
                for p in data.get("previous", ())
            ),
            int(data.get("generation", 1)),
            int(data.get("revoked_index", 0)),
            None if rotated_at is None else float(rotated_at),
        )

    def open(self, kek: bytes) -> PrivateKey:
        """The SSK's private half; raises Tampered when ``kek`` is not the site's."""
        if len(kek) != KEY_BYTES:
            raise Tampered("an unseal key is 32 bytes")
        private = PrivateKey(unwrap(kek, SSK_CONTEXT, self.ssk_wrapped))
        if bytes(private.public_key) != self.ssk_public:
            raise Tampered("the keyring's public and private halves differ")
        return private


@dataclass(frozen=True, slots=True)
class DataKeyState:
    current: int
    last_rotation: float

    def encode(self) -> bytes:
        return _dumps({"current": self.current, "last_rotation": self.last_rotation})

    @staticmethod
    def decode(raw: bytes) -> DataKeyState:
        data = orjson.loads(raw)
        return DataKeyState(int(data["current"]), float(data["last_rotation"]))


@dataclass(frozen=True, slots=True)
class DataKey:
    id: int
    wrapped: bytes
    created_at: float

    def key(self) -> bytes:
        return dk_key(self.id)

    def encode(self) -> bytes:
        return _dumps({"id": self.id, "wrapped": b64(self.wrapped), "created_at": self.created_at})

    @staticmethod
    def decode(raw: bytes) -> DataKey:
        data = orjson.loads(raw)
        wrapped = base64.b64decode(data["wrapped"])
        return DataKey(int(data["id"]), wrapped, float(data["created_at"]))

    def open(self, kek: bytes) -> bytes:
        return unwrap(kek, dk_context(self.id), self.wrapped)


def dk_key(dk_id: int) -> bytes:
    return DK_PREFIX + f"{dk_id:08d}".encode()


SecretState = Literal["sealed", "ready", "failed"]


@dataclass(frozen=True, slots=True)
class SecretRecord:
    """One secret. ``ciphertext``: a SealedBox to the SSK ("sealed") or a SecretBox under
    data key ``dk`` ("ready"); "failed" keeps the sealed blob and says why."""

    tenant: str
    name: str
    version: int
    state: SecretState
    ciphertext: bytes
    dk: int | None = None
    message: str = ""

    def key(self) -> bytes:
        return secret_key(self.tenant, self.name)

    def encode(self) -> bytes:
        return _dumps(
            {
                "tenant": self.tenant,
                "name": self.name,
                "version": self.version,
                "state": self.state,
                "ciphertext": b64(self.ciphertext),
                "dk": self.dk,
                "message": self.message,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> SecretRecord:
        data = orjson.loads(raw)
        return SecretRecord(
            str(data["tenant"]),
            str(data["name"]),
            int(data["version"]),
            data["state"],
            base64.b64decode(data["ciphertext"]),
            None if data.get("dk") is None else int(data["dk"]),
            str(data.get("message", "")),
        )

    def to_json(self) -> dict[str, Any]:
        """What the API shows: never the ciphertext."""
        return {
            "tenant": self.tenant,
            "name": self.name,
            "version": self.version,
            "state": self.state,
            "data_key": self.dk,
            "message": self.message,
        }


def secret_key(tenant: str, name: str) -> bytes:
    return SECRET_PREFIX + f"{tenant}/{name}".encode()


def hostkey_key(host_id: str) -> bytes:
    return HOSTKEY_PREFIX + host_id.encode()


def encode_hostkey(public_key: bytes) -> bytes:
    return _dumps({"public_key": public_key.hex()})


def decode_hostkey(raw: bytes) -> bytes:
    return bytes.fromhex(str(orjson.loads(raw)["public_key"]))


@dataclass(frozen=True, slots=True)
class SecretSettings:
    rotation_interval_s: float = DEFAULT_ROTATION_INTERVAL_S

    def encode(self) -> bytes:
        return _dumps({"rotation_interval_s": self.rotation_interval_s})

    @staticmethod
    def decode(raw: bytes) -> SecretSettings:
        return SecretSettings(float(orjson.loads(raw)["rotation_interval_s"]))


def parse_settings(data: Mapping[str, object]) -> SecretSettings:
    unknown = set(data) - {"rotation_interval_s"}
    if unknown:
        raise RemoteInputError("bad_settings", f"unknown fields: {', '.join(sorted(unknown))}")
    interval = data.get("rotation_interval_s")
    if (
        isinstance(interval, bool)
        or not isinstance(interval, int | float)
        or not MIN_ROTATION_INTERVAL_S <= interval <= MAX_ROTATION_INTERVAL_S
    ):
        raise RemoteInputError(
            "bad_settings",
            f"rotation_interval_s: seconds, {MIN_ROTATION_INTERVAL_S:g} to "
            f"{MAX_ROTATION_INTERVAL_S:g}",
        )
    return SecretSettings(float(interval))


def encode_flag(source: str) -> bytes:
    """The lockdown and rotate records: who asked."""
    return _dumps({"source": source})


# -- a snapshot of the table -------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Indexed:
    """A record and the Raft index that last modified it (for guards)."""

    index: int
    value: bytes


@dataclass(slots=True)
class Snapshot:
    """The ``secrets`` table, decoded; ``*_index`` are Raft indexes (0: absent)."""

    keyring: Keyring | None = None
    keyring_index: int = 0
    dkstate: DataKeyState | None = None
    dkstate_index: int = 0
    dks: dict[int, DataKey] = field(default_factory=dict)
    secrets: dict[tuple[str, str], tuple[SecretRecord, int]] = field(default_factory=dict)
    hostkeys: dict[str, bytes] = field(default_factory=dict)
    lockdown: str | None = None  # its source, when locked down
    rotate_index: int = 0
    settings: SecretSettings = SecretSettings()

    @staticmethod
    def read(records: Iterable[tuple[bytes, Indexed]]) -> Snapshot:
        snap = Snapshot()
        for key, rec in records:
            if key == RING_KEY:
                snap.keyring, snap.keyring_index = Keyring.decode(rec.value), rec.index
            elif key == DKSTATE_KEY:
                snap.dkstate, snap.dkstate_index = DataKeyState.decode(rec.value), rec.index
            elif key.startswith(DK_PREFIX):
                dk = DataKey.decode(rec.value)
                snap.dks[dk.id] = dk
            elif key.startswith(SECRET_PREFIX):
                secret = SecretRecord.decode(rec.value)
                snap.secrets[(secret.tenant, secret.name)] = (secret, rec.index)
            elif key.startswith(HOSTKEY_PREFIX):
                snap.hostkeys[key[len(HOSTKEY_PREFIX) :].decode()] = decode_hostkey(rec.value)
            elif key == LOCKDOWN_KEY:
                snap.lockdown = str(orjson.loads(rec.value).get("source", ""))
            elif key == ROTATE_KEY:
                snap.rotate_index = rec.index
            elif key == SETTINGS_KEY:
                snap.settings = SecretSettings.decode(rec.value)
        return snap

    def rotation_due(self, now: float) -> bool:
        if self.dkstate is None:
            return False
        elapsed = now - self.dkstate.last_rotation
        return self.rotate_index > 0 or elapsed >= self.settings.rotation_interval_s


# -- plans ---------------------------------------------------------------------------------

Write = Put | Delete | Guard


def init_ops(
    kek: bytes, ssk_seed: bytes, dk: bytes, now: float, revoked_index: int = 0
) -> list[Write]:
    """Create the keyring, DK 1 and the data key state, only if the site has no keyring
    (``revoked_index``: the newest revocation record, which the new keys postdate)."""
    ssk = PrivateKey(ssk_seed)
    ring = Keyring(
        bytes(ssk.public_key), wrap(kek, SSK_CONTEXT, bytes(ssk)), now, revoked_index=revoked_index
    )
    first = DataKey(1, wrap(kek, dk_context(1), dk), now)
    writes: list[Write] = [
        Put(SECRETS_TABLE, RING_KEY, ring.encode()),
        Put(SECRETS_TABLE, first.key(), first.encode()),
        Put(SECRETS_TABLE, DKSTATE_KEY, DataKeyState(1, now).encode()),
    ]
    return [Guard(SECRETS_TABLE, RING_KEY, 0, len(writes)), *writes]


class Keys:
    """The unsealed keys of one host: the KEK, the SSK (and the previous ones the keyring
    still keeps) and the data keys opened so far."""

    def __init__(self, kek: bytes, ssk: PrivateKey, previous: Sequence[PrivateKey] = ()) -> None:
        self.kek = kek
        self.ssk = ssk
        self.previous = tuple(previous)
        self._dks: dict[tuple[int, bytes], bytes] = {}

    @staticmethod
    def unseal(kek: bytes, keyring: Keyring) -> Keys:
        ssk = keyring.open(kek)
        return Keys(bytes(kek), ssk, [p.open(kek) for p in keyring.previous])

    def matches(self, keyring: Keyring | None) -> bool:
        """Whether these keys are the keyring's (not from before a rekey)."""
        return keyring is not None and bytes(self.ssk.public_key) == keyring.ssk_public

    def data_key(self, dk: DataKey) -> bytes:
        cache_key = (dk.id, dk.wrapped)
        opened = self._dks.get(cache_key)
        if opened is None:
            opened = self._dks[cache_key] = dk.open(self.kek)
        return opened

    def forget(self) -> None:
        self._dks.clear()


class SecretUnavailable(SecretsError):
    """A secret an instance needs cannot be delivered now; the message says why."""


def decrypt(keys: Keys, snap: Snapshot, tenant: str, name: str) -> tuple[bytes, int]:
    """A secret's value and version; raises SecretUnavailable."""
    entry = snap.secrets.get((tenant, name))
    if entry is None:
        raise SecretUnavailable(f"waiting for secret {tenant}/{name}")
    secret = entry[0]
    if secret.state == "sealed":
        raise SecretUnavailable(f"waiting for secret {tenant}/{name} (not decrypted yet)")
    if secret.state == "failed" or secret.dk is None:
        raise SecretUnavailable(f"secret {tenant}/{name} is unusable: {secret.message}")
    dk = snap.dks.get(secret.dk)
    if dk is None:
        raise SecretUnavailable(f"secret {tenant}/{name}: data key {secret.dk} is missing")
    try:
        value = unwrap(
            keys.data_key(dk), secret_context(tenant, name, secret.version), secret.ciphertext
        )
    except Tampered as exc:
        raise SecretUnavailable(f"secret {tenant}/{name} does not decrypt: {exc}") from exc
    return value, secret.version


@dataclass(frozen=True, slots=True)
class Step:
    """One Raft proposal of the leader's upkeep, and what it does (for the log)."""

    what: str
    ops: list[Write]


def next_step(snap: Snapshot, keys: Keys, now: float, new_dk: bytes) -> Step | None:
    """The next proposal that brings the secrets to where they should be, or None.

    In order: open secrets delivered sealed to the SSK (to the current data key); start a
    rotation when one is asked for or due (a new data key becomes current); rewrap every
    secret under an older data key; delete data keys no secret uses any more. Every write
    is guarded by the data key state's index (and each secret's by its own), so a plan
    made from a stale view changes nothing.
    """
    state = snap.dkstate
    if snap.keyring is None or state is None or not keys.matches(snap.keyring):
        return None  # no keys yet, or this host's are from before a rekey
    current = snap.dks.get(state.current)
    if current is None:
        return None  # a broken table; nothing safe to do
    guard_index = snap.dkstate_index
    pending = [(s, i) for s, i in snap.secrets.values() if s.state == "sealed"][:REWRAP_BATCH]
    if pending:
        return Step(
            f"decrypt {len(pending)} delivered secret(s)",
            _guarded(
                guard_index, [_open_pending(s, i, keys, snap.keyring, current) for s, i in pending]
            ),
        )
    if snap.rotation_due(now):
        new_id = max(snap.dks) + 1
        record = DataKey(new_id, wrap(keys.kek, dk_context(new_id), new_dk), now)
        writes: list[Write] = [
            Put(SECRETS_TABLE, record.key(), record.encode()),
            Put(SECRETS_TABLE, DKSTATE_KEY, DataKeyState(new_id, now).encode()),
        ]
        if snap.rotate_index:
            writes.append(Delete(SECRETS_TABLE, ROTATE_KEY))
        return Step(
            f"rotate: data key {new_id} replaces {state.current}",
            [Guard(SECRETS_TABLE, DKSTATE_KEY, guard_index, len(writes)), *writes],
        )
    stale = [
        (s, i) for s, i in snap.secrets.values() if s.state == "ready" and s.dk != state.current
    ]
    if stale:
        pairs = [_rewrap(s, i, keys, snap, current) for s, i in stale[:REWRAP_BATCH]]
        return Step(f"rewrap {len(pairs)} secret(s) to data key {state.current}", _guarded(
            guard_index, pairs
        ))  # fmt: skip
    used = {s.dk for s, _ in snap.secrets.values()}
    unused = sorted(i for i in snap.dks if i != state.current and i not in used)
    if unused:
        deletes: list[Write] = [Delete(SECRETS_TABLE, dk_key(i)) for i in unused]
        return Step(
            f"delete data key(s) {', '.join(map(str, unused))}",
            [Guard(SECRETS_TABLE, DKSTATE_KEY, guard_index, len(deletes)), *deletes],
        )
    ring = snap.keyring
    if (
        ring.previous
        and ring.rotated_at is not None
        and now - ring.rotated_at >= PREVIOUS_SSK_KEEP_S
    ):
        # Nothing sealed is left (opened above); one delivered later, sealed to a retired
        # key, fails and the hub's re-delivery to the new key replaces it (op_writes).
        put = Put(SECRETS_TABLE, RING_KEY, replace(ring, previous=()).encode())
        return Step(
            f"retire {len(ring.previous)} previous site key(s)",
            [Guard(SECRETS_TABLE, RING_KEY, snap.keyring_index, 1), put],
        )
    return None


# -- rekey after a revocation --------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Membership:
    """What the system table says of the hosts: the members' ids, and the revoked hosts
    with the Raft index of their revocation record (``meshorch.state.tables``)."""

    members: frozenset[str]
    revoked: Mapping[str, int] = field(default_factory=dict)


def rekey_reasons(snap: Snapshot, membership: Membership) -> list[str]:
    """The hosts that may know the current KEK but are no longer members: revoked after
    the keyring's last rekey, or holding a host key while not a member (a host removed:
    a mesh host's revocation leaves a record, another host's only its absence)."""
    ring = snap.keyring
    if ring is None:
        return []
    hosts = {h for h, index in membership.revoked.items() if index > ring.revoked_index}
    hosts |= {h for h in snap.hostkeys if h not in membership.members}
    return sorted(hosts)


@dataclass(frozen=True, slots=True)
class Rekey:
    """The one proposal that replaces the KEK and the SSK, the keys it makes (the
    proposer's once committed), and the hosts to hand the new KEK to first (their host
    keys), so no host depends on the proposer surviving the commit."""

    what: str
    ops: list[Write]
    keys: Keys
    recipients: dict[str, bytes]

    def committed(self, results: Sequence[Any]) -> bool:
        """Whether the three guards (keyring, no lock-down, data key state) held."""
        return len(results) > 2 and all(bool(r.ok) for r in results[:3])


def rekey_step(
    snap: Snapshot,
    keys: Keys,
    membership: Membership,
    now: float,
    kek: bytes,
    ssk_seed: bytes,
    dk: bytes,
) -> Rekey | None:
    """When a host left that may know the KEK (``rekey_reasons``): a new KEK, a new SSK
    (the old one, and those it kept, wrapped under the new KEK), every data key rewrapped
    under the new KEK, a new current data key (``next_step`` then rewraps every secret
    to it and deletes the old ones), and the removed hosts' host keys deleted, so no peer
    answers their unseal requests. One proposal, guarded by the keyring's and the data
    key state's indexes and by the absence of a lock-down: applied whole or not at all, and
    never from a stale view."""
    ring, state = snap.keyring, snap.dkstate
    gone = rekey_reasons(snap, membership)
    if not gone or ring is None or state is None or not keys.matches(ring):
        return None
    if state.current not in snap.dks:
        return None  # a broken table; nothing safe to do
    if len(kek) != KEY_BYTES or len(dk) != KEY_BYTES:
        raise ValueError("new keys are 32 bytes")
    ssk = PrivateKey(ssk_seed)
    kept = [keys.ssk, *keys.previous][:MAX_PREVIOUS_SSKS]
    previous = tuple(
        PreviousSsk(bytes(k.public_key), wrap(kek, previous_ssk_context(bytes(k.public_key)),
                                                bytes(k)))
        for k in kept
    )  # fmt: skip
    revoked_index = max([ring.revoked_index, *membership.revoked.values()])
    new_ring = Keyring(
        bytes(ssk.public_key),
        wrap(kek, SSK_CONTEXT, bytes(ssk)),
        ring.created_at,
        previous,
        ring.generation + 1,
        revoked_index,
        now,
    )
    writes: list[Write] = [Put(SECRETS_TABLE, RING_KEY, new_ring.encode())]
    for old in sorted(snap.dks.values(), key=lambda d: d.id):
        try:
            value = keys.data_key(old)
        except Tampered:
            continue  # unusable already; left as it is
        rewrapped = DataKey(old.id, wrap(kek, dk_context(old.id), value), old.created_at)
        writes.append(Put(SECRETS_TABLE, rewrapped.key(), rewrapped.encode()))
    new_id = max(snap.dks) + 1
    record = DataKey(new_id, wrap(kek, dk_context(new_id), dk), now)
    writes += [
        Put(SECRETS_TABLE, record.key(), record.encode()),
        Put(SECRETS_TABLE, DKSTATE_KEY, DataKeyState(new_id, now).encode()),
    ]
    if snap.rotate_index:
        writes.append(Delete(SECRETS_TABLE, ROTATE_KEY))
    writes += [Delete(SECRETS_TABLE, hostkey_key(h)) for h in gone if h in snap.hostkeys]
    # Nested guards: the keyring's, then no lock-down (hosts drop their keys, the handed
    # new KEK included: committed then, it would be in nobody's memory), then the data key
    # state's; each counts everything after it, so all of it applies or none.
    ops: list[Write] = list(writes)
    for table_key, index in ((DKSTATE_KEY, snap.dkstate_index), (LOCKDOWN_KEY, 0),
                             (RING_KEY, snap.keyring_index)):  # fmt: skip
        ops = [Guard(SECRETS_TABLE, table_key, index, len(ops)), *ops]
    recipients = {
        h: key for h, key in snap.hostkeys.items() if h in membership.members and h not in gone
    }
    what = (
        f"rekey (generation {new_ring.generation}) after {', '.join(gone)} left: new unseal "
        f"key, new site key, data key {new_id} replaces {state.current}"
    )
    return Rekey(what, ops, Keys(kek, ssk, kept), recipients)


def _guarded(dkstate_index: int, pairs: Sequence[tuple[Guard, Put]]) -> list[Write]:
    ops: list[Write] = []
    for guard, put in pairs[:REWRAP_BATCH]:
        ops += [guard, put]
    return [Guard(SECRETS_TABLE, DKSTATE_KEY, dkstate_index, len(ops)), *ops]


def _open_pending(
    secret: SecretRecord, index: int, keys: Keys, keyring: Keyring, current: DataKey
) -> tuple[Guard, Put]:
    try:
        value = _open_with_any(keys, keyring, secret.ciphertext)
        if len(value) > MAX_SECRET_BYTES:
            raise Tampered(f"the value is over {MAX_SECRET_BYTES} bytes")
    except Tampered as exc:
        message = f"cannot be opened with this site's key: {exc}"
        new = replace(secret, state="failed", message=message)
    else:
        context = secret_context(secret.tenant, secret.name, secret.version)
        ciphertext = wrap(keys.data_key(current), context, value)
        new = replace(secret, state="ready", ciphertext=ciphertext, dk=current.id, message="")
    return _guarded_put(new, index)


def _open_with_any(keys: Keys, keyring: Keyring, blob: bytes) -> bytes:
    """Open a blob sealed to the SSK, or to a previous one the keyring still keeps."""
    kept = {p.public for p in keyring.previous}
    previous = [k for k in keys.previous if bytes(k.public_key) in kept]
    for private in (keys.ssk, *previous):
        try:
            return open_sealed(private, blob)
        except Tampered:
            continue
    raise Tampered("the sealed blob does not open with this site's keys")


def _guarded_put(secret: SecretRecord, index: int) -> tuple[Guard, Put]:
    key = secret.key()
    return Guard(SECRETS_TABLE, key, index, 1), Put(SECRETS_TABLE, key, secret.encode())


def _rewrap(
    secret: SecretRecord, index: int, keys: Keys, snap: Snapshot, current: DataKey
) -> tuple[Guard, Put]:
    context = secret_context(secret.tenant, secret.name, secret.version)
    old = snap.dks.get(secret.dk) if secret.dk is not None else None
    try:
        if old is None:
            raise Tampered(f"data key {secret.dk} is missing")
        value = unwrap(keys.data_key(old), context, secret.ciphertext)
    except Tampered as exc:
        new = replace(secret, state="failed", dk=None, message=f"lost in rotation: {exc}")
    else:
        ciphertext = wrap(keys.data_key(current), context, value)
        new = replace(secret, ciphertext=ciphertext, dk=current.id)
    return _guarded_put(new, index)


# -- delta operations ------------------------------------------------------------------------

PUT_OP = "secret.put"
DELETE_OP = "secret.delete"
LOCKDOWN_OP = "site.lockdown"
UNLOCK_OP = "site.unlock"
ROTATE_OP = "secrets.rotate"
OPS = (PUT_OP, DELETE_OP, LOCKDOWN_OP, UNLOCK_OP, ROTATE_OP)
MAX_SEALED_SITES = 10_000


def _fields(op: Mapping[str, Any], required: Sequence[str], optional: Sequence[str] = ()) -> None:
    allowed = {"op", *required, *optional}
    unknown = sorted(set(op) - allowed)
    missing = [f for f in required if f not in op]
    problems = []
    if unknown:
        problems.append(f"unknown fields {unknown}")
    if missing:
        problems.append(f"missing fields {missing}")
    if problems:
        raise RemoteInputError("bad_op", "; ".join(problems))


def _tenant_name(op: Mapping[str, Any]) -> tuple[str, str]:
    tenant, name = op.get("tenant"), op.get("name")
    problems = []
    if not is_tenant(tenant):
        problems.append(f"'tenant': {TENANT_RULE}")
    if not is_secret_name(name):
        problems.append(f"'name': {SECRET_NAME_RULE}")
    if problems:
        raise RemoteInputError("bad_op", "; ".join(problems))
    assert isinstance(tenant, str) and isinstance(name, str)
    return tenant, name


def op_writes(
    op: Mapping[str, Any],
    site_id: str,
    delta_version: int,
    read: Callable[[str, bytes], bytes | None],
) -> list[Put | Delete]:
    """The writes of one secrets operation of a verified delta (``read(table, key)``).

    Raises RemoteInputError (``bad_op``, ``bad_base64``, ``stale_version``): the op is
    skipped and reported, nothing of it is written.
    """
    kind = op.get("op")
    source = f"delta {delta_version}"
    if kind == PUT_OP:
        _fields(op, ("tenant", "name", "version", "sealed"))
        tenant, name = _tenant_name(op)
        version, sealed = op["version"], op["sealed"]
        if type(version) is not int or not 1 <= version < 2**53:
            raise RemoteInputError("bad_op", "'version': an integer >= 1")
        if not isinstance(sealed, dict) or not 0 < len(sealed) <= MAX_SEALED_SITES:
            raise RemoteInputError("bad_op", "'sealed': an object of site id -> base64 blob")
        if site_id not in sealed:
            raise RemoteInputError("bad_op", f"'sealed' has no value for site {site_id!r}")
        blob = unb64(sealed[site_id], f"'sealed.{site_id}'", MAX_SECRET_BYTES + SEAL_OVERHEAD)
        if len(blob) < SEAL_OVERHEAD:
            raise RemoteInputError("bad_op", f"'sealed.{site_id}': too short for a sealed box")
        raw = read(SECRETS_TABLE, secret_key(tenant, name))
        if raw is not None:
            stored = SecretRecord.decode(raw)
            if version < stored.version:
                raise RemoteInputError(
                    "stale_version", f"{tenant}/{name} version {version} < stored {stored.version}"
                )
            if version == stored.version and stored.state != "failed":
                return []  # delivered again: already here
            # A failed one delivered again (sealed to a newer site key) replaces it.
        record = SecretRecord(tenant, name, version, "sealed", blob)
        return [Put(SECRETS_TABLE, record.key(), record.encode())]
    if kind == DELETE_OP:
        _fields(op, ("tenant", "name"))
        tenant, name = _tenant_name(op)
        return [Delete(SECRETS_TABLE, secret_key(tenant, name))]
    if kind == LOCKDOWN_OP:
        _fields(op, ())
        return [Put(SECRETS_TABLE, LOCKDOWN_KEY, encode_flag(source))]
    if kind == UNLOCK_OP:
        _fields(op, ())
        return [Delete(SECRETS_TABLE, LOCKDOWN_KEY)]
    if kind == ROTATE_OP:
        _fields(op, ())
        return [Put(SECRETS_TABLE, ROTATE_KEY, encode_flag(source))]
    raise RemoteInputError("unknown_op", f"unknown operation {kind!r}")


@dataclass(frozen=True, slots=True)
class SecretRef:
    """A site secret delivered to the container: as a file under its secrets directory
    (``/run/secrets/{file}`` with podman), and as an environment variable if ``env``."""

    name: str
    tenant: str = DEFAULT_TENANT
    file: str = ""  # "": the name
    env: str | None = None

    def __post_init__(self) -> None:
        if not self.file:
            object.__setattr__(self, "file", self.name)
