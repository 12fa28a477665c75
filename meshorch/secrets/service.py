"""The secrets service of one agent (the I/O around ``meshorch.secrets.keyring``; docs/secrets.md).

- Holds this host's keys in memory only: the KEK (unseal key), the site secrets key and
  the data keys opened so far. Every host starts sealed.
- Registers this host's X25519 key (``secrets-host.key`` in the data dir, 0600) in Raft,
  so peers can seal the KEK to it.
- On the Raft leader: creates the site's keys once (a guarded proposal: one leader wins),
  then keeps the secrets where they should be (``meshorch.secrets.keyring.next_step``): delivered
  secrets opened and put under the current data key, rotations, rewraps, old keys deleted.
- While sealed: asks its peers for the KEK every ``UNSEAL_RETRY_S``
  (``POST /v1/secrets/unseal-request``), and answers theirs when unsealed.
- Rekey on the leader, when a host that may know the KEK left the site (a committed
  revocation, ``meshorch.secrets.keyring.rekey_step``): hands the new KEK, sealed to each
  remaining host's key, to those hosts (``POST /v1/secrets/rekey``), then commits the new
  keyring. A host whose keys no longer match the keyring switches to the KEK it was
  handed, or drops its keys and asks its peers.
- Lock-down (a record in Raft): every host drops its keys as soon as it sees it.
- Delivery: writes an instance's secret files into a tmpfs directory outside the data dir
  (``/dev/shm/meshorch-secrets/<hash of the data dir>/<runtime id>/``, 0700, files 0400).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson
from nacl.public import PrivateKey

from meshorch.errors import RemoteInputError
from meshorch.secrets.keyring import (
    KEY_BYTES,
    LOCKDOWN_KEY,
    RING_KEY,
    ROTATE_KEY,
    SEAL_OVERHEAD,
    SETTINGS_KEY,
    Indexed,
    Keyring,
    Keys,
    Membership,
    Rekey,
    SecretRecord,
    SecretRef,
    SecretSettings,
    SecretUnavailable,
    Snapshot,
    Tampered,
    b64,
    decrypt,
    encode_flag,
    encode_hostkey,
    hostkey_key,
    init_ops,
    next_step,
    open_sealed,
    parse_public_key,
    rekey_step,
    seal,
    secret_key,
    unb64,
)
from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import (
    MEMBER_PREFIX,
    REVOKED_PREFIX,
    SECRETS_TABLE,
    SYSTEM_TABLE,
    validate_host_id,
)
from raft import Delete, Put
from raft.durable import write_durably
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

HOST_KEY_FILE = "secrets-host.key"
TICK_S = 0.25
UNSEAL_RETRY_S = 1.0
PEER_TIMEOUT_S = 2.0
MAX_STEPS_PER_TICK = 16
MAX_HOSTS = 100_000
MAX_HANDED = 4  # new KEKs handed to this host by a leader about to rekey, kept in memory
TMPFS_ROOTS = (Path("/dev/shm"), Path("/run"))
DELIVERY_DIR = "meshorch-secrets"


class SecretsRefused(RemoteInputError):
    """A secrets request this host will not serve now; ``status`` is the HTTP status."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(code, message)
        self.status = status


def load_or_create_host_key(data_dir: Path) -> PrivateKey:
    path = data_dir / HOST_KEY_FILE
    if path.exists():
        return PrivateKey(bytes.fromhex(path.read_text().strip()))
    key = PrivateKey.generate()
    data_dir.mkdir(parents=True, exist_ok=True)
    write_durably(path, (bytes(key).hex() + "\n").encode())  # whole, even after a power cut
    return key


def delivery_root(data_dir: Path) -> Path:
    """Where this host's instances get their secret files: on tmpfs, outside the data dir."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    base = next((r for r in TMPFS_ROOTS if r.is_dir() and os.access(r, os.W_OK)), TMPFS_ROOTS[0])
    return base / DELIVERY_DIR / digest


class SiteSecrets:
    def __init__(
        self,
        site: SiteState,
        members: Members,
        *,
        host_id: str,
        data_dir: Path,
        sign: Callable[[str, str], Mapping[str, str]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.sign = sign  # proves this host to the peers it asks for the unseal key
        self.members = members
        self.host_id = host_id
        self.data_dir = data_dir
        self.clock = clock
        self.root = delivery_root(data_dir)
        self.host_key: PrivateKey | None = None
        self.unsealed_by: str | None = None
        self._keys: Keys | None = None
        # KEKs of a rekey not seen committed yet, by the new SSK's public key: memory only
        self._handed: dict[bytes, tuple[bytes, str]] = {}
        self._next_unseal_try = 0.0
        self._lock = asyncio.Lock()

    # -- state ----------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        records, _ = self.site.view.scan(SECRETS_TABLE, b"", 1_000_000)
        return Snapshot.read((key, Indexed(r.mod_index, r.value)) for key, r in records)

    def locked_down(self) -> bool:
        """True while the lock-down record is in Raft; drops the keys at once if so."""
        locked = self.site.view.get(SECRETS_TABLE, LOCKDOWN_KEY) is not None
        if locked:
            self.drop_keys("the site is locked down")
        return locked

    @property
    def sealed(self) -> bool:
        return self._keys is None

    def keys(self) -> Keys:
        """The unsealed keys; raises SecretUnavailable ("site locked down", "site sealed")."""
        if self.locked_down():
            raise SecretUnavailable("site locked down")
        self._follow_rekey()
        if self._keys is None:
            raise SecretUnavailable("site sealed")
        return self._keys

    def _follow_rekey(self) -> None:
        """Keys from before a rekey open nothing of the new keyring: switch to the KEK a
        leader handed this host for it, or drop them (the peers are asked then)."""
        raw = self.site.view.get(SECRETS_TABLE, RING_KEY)
        if raw is None:
            return
        keyring = Keyring.decode(raw.value)
        if self._keys is not None and self._keys.matches(keyring):
            return
        handed = self._handed.get(keyring.ssk_public)
        if handed is not None:
            kek, by = handed
            try:
                keys = Keys.unseal(kek, keyring)
            except Tampered:
                logger.warning("secrets: the unseal key %s handed over does not open", by)
            else:
                self._handed.clear()
                self.drop_keys("the keyring was rekeyed", logging.INFO)
                self._hold(keys, f"rekeyed, from {by}")
                return
        if self._keys is not None:
            self.drop_keys("the keyring was rekeyed; asking the peers", logging.INFO)
            self._next_unseal_try = 0.0

    def drop_keys(self, why: str, level: int = logging.WARNING) -> None:
        if self._keys is not None:
            logger.log(level, "secrets: dropping the keys from memory: %s", why)
            self._keys.forget()
        self._keys = None
        self._handed.clear()
        self.unsealed_by = None

    def _hold(self, keys: Keys, by: str) -> None:
        self._keys = keys
        self.unsealed_by = by
        logger.info("secrets: unsealed (%s)", by)

    def public_key_hex(self) -> str | None:
        keyring = self.snapshot().keyring
        return None if keyring is None else keyring.ssk_public.hex()

    def status_json(self) -> dict[str, Any]:
        snap = self.snapshot()
        locked = self.locked_down()
        if not locked:
            self._follow_rekey()  # "sealed" must not count keys from before a rekey
        state = snap.dkstate
        pending = sum(1 for s, _ in snap.secrets.values() if s.state == "sealed")
        return {
            "host_id": self.host_id,
            "initialized": snap.keyring is not None,
            "sealed": self._keys is None,
            "unsealed_by": self.unsealed_by,
            "locked_down": locked,
            "lockdown_source": snap.lockdown,
            "public_key": None if snap.keyring is None else snap.keyring.ssk_public.hex(),
            "keyring_generation": None if snap.keyring is None else snap.keyring.generation,
            "previous_public_keys": []
            if snap.keyring is None
            else [p.public.hex() for p in snap.keyring.previous],
            "data_keys": sorted(snap.dks),
            "current_data_key": None if state is None else state.current,
            "last_rotation": None if state is None else state.last_rotation,
            "rotation_requested": snap.rotate_index > 0,
            "rotation_interval_s": snap.settings.rotation_interval_s,
            "secrets": len(snap.secrets),
            "pending": pending,
        }

    def list_json(self) -> list[dict[str, Any]]:
        snap = self.snapshot()
        return [snap.secrets[k][0].to_json() for k in sorted(snap.secrets)]

    # -- the service --------------------------------------------------------------------------

    async def run(self) -> None:
        self.host_key = await asyncio.to_thread(load_or_create_host_key, self.data_dir)
        timeout = aiohttp.ClientTimeout(total=PEER_TIMEOUT_S)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            try:
                while True:
                    try:
                        await self.tick(session)
                    except ProposalError as exc:
                        logger.debug("secrets: not committed: %s", exc)
                    except Exception:
                        logger.exception("secrets tick failed")
                    await asyncio.sleep(TICK_S)
            finally:
                self.drop_keys("the agent stops", logging.INFO)

    async def tick(self, session: aiohttp.ClientSession) -> None:
        raft = self.site
        if not raft.status().ready:
            return
        snap = self.snapshot()
        await self._register_host_key(snap)
        if snap.lockdown is not None:
            self.drop_keys("the site is locked down")
            return
        leader = raft.status().is_leader
        if snap.keyring is None:
            if leader:
                await self._initialise()
            return
        self._follow_rekey()
        if self._keys is None:
            now = time.monotonic()
            if now >= self._next_unseal_try:
                self._next_unseal_try = now + UNSEAL_RETRY_S
                await self._unseal_from_peers(session, snap)
            return
        if leader:
            await self._rekey(session)
            await self._upkeep()

    def membership(self) -> Membership:
        """The members, and the revoked hosts with their revocation record's Raft index."""
        view = self.site.view
        members, _ = view.scan(SYSTEM_TABLE, MEMBER_PREFIX, MAX_HOSTS)
        revoked, _ = view.scan(SYSTEM_TABLE, REVOKED_PREFIX, MAX_HOSTS)
        return Membership(
            frozenset(k[len(MEMBER_PREFIX) :].decode() for k, _ in members),
            {k[len(REVOKED_PREFIX) :].decode(): r.mod_index for k, r in revoked},
        )

    async def _register_host_key(self, snap: Snapshot) -> None:
        assert self.host_key is not None
        public = bytes(self.host_key.public_key)
        host_id = self.host_id
        if self.site.view.get(SYSTEM_TABLE, MEMBER_PREFIX + host_id.encode()) is None:
            return  # a host key without a member record means a host removed (a rekey)
        if snap.hostkeys.get(host_id) != public:
            await self.site.propose(
                [Put(SECRETS_TABLE, hostkey_key(host_id), encode_hostkey(public))], idempotent=True
            )
            logger.info("secrets: registered this host's key")

    async def _initialise(self) -> None:
        kek, seed, dk = os.urandom(KEY_BYTES), os.urandom(KEY_BYTES), os.urandom(KEY_BYTES)
        revoked = max(self.membership().revoked.values(), default=0)
        results = await self.site.propose(init_ops(kek, seed, dk, self.clock(), revoked))
        if results[0].ok:
            self._hold(Keys(kek, PrivateKey(seed)), "created the site's keys")

    async def _rekey(self, session: aiohttp.ClientSession) -> None:
        """After a revocation: the new keys to every remaining host first, then committed."""
        async with self._lock:
            if self._keys is None or self.locked_down():
                return
            rekey = rekey_step(
                self.snapshot(),
                self._keys,
                self.membership(),
                self.clock(),
                os.urandom(KEY_BYTES),
                os.urandom(KEY_BYTES),
                os.urandom(KEY_BYTES),
            )
            if rekey is None:
                return
            public = bytes(rekey.keys.ssk.public_key)
            # Kept until seen committed: a proposal that times out may still commit.
            self._handed = {public: (rekey.keys.kek, "this host")}
            handed = await self._hand_over(session, rekey)
            logger.info("secrets: the new unseal key handed to %s", ", ".join(handed) or "nobody")
            results = await self.site.propose(rekey.ops)
            if not rekey.committed(results):
                logger.info("secrets: rekey: the state moved meanwhile, again")
                return
            logger.warning("secrets: %s", rekey.what)
            if self.locked_down():
                return
            self._handed.clear()
            self.drop_keys("rekeyed", logging.DEBUG)
            self._hold(rekey.keys, "rekeyed here")

    async def _hand_over(self, session: aiohttp.ClientSession, rekey: Rekey) -> list[str]:
        """Give each remaining host the new KEK sealed to its host key; the hosts that
        took it (the others get it later from a peer, as after a restart)."""
        path = "/v1/secrets/rekey"
        public = bytes(rekey.keys.ssk.public_key).hex()

        async def one(host_id: str, api: str, host_key: bytes) -> str | None:
            body = {"ssk_public": public, "sealed_key": b64(seal(host_key, rekey.keys.kek))}
            headers = {} if self.sign is None else dict(self.sign("POST", path))
            try:
                async with session.post(
                    f"http://{api}{path}", data=orjson.dumps(body), headers=headers
                ) as response:
                    return host_id if response.status == 200 else None
            except (aiohttp.ClientError, TimeoutError) as exc:
                logger.info("secrets: could not hand the new unseal key to %s: %s", host_id, exc)
                return None

        calls = [
            one(m.host_id, m.api, rekey.recipients[m.host_id])
            for m in self.members.members()
            if m.host_id != self.host_id and m.api is not None and m.host_id in rekey.recipients
        ]
        return sorted(h for h in await asyncio.gather(*calls) if h is not None)

    async def _upkeep(self) -> None:
        async with self._lock:
            for _ in range(MAX_STEPS_PER_TICK):
                if self._keys is None or self.locked_down():
                    return
                step = next_step(self.snapshot(), self._keys, self.clock(), os.urandom(KEY_BYTES))
                if step is None:
                    return
                results = await self.site.propose(step.ops)
                if not results[0].ok:
                    logger.info("secrets: %s: the state moved meanwhile, again", step.what)
                    return
                logger.info("secrets: %s", step.what)

    async def _unseal_from_peers(self, session: aiohttp.ClientSession, snap: Snapshot) -> None:
        assert self.host_key is not None and snap.keyring is not None
        me = self.host_id
        for member in self.members.members():
            if member.host_id == me or member.api is None:
                continue
            path = "/v1/secrets/unseal-request"
            url = f"http://{member.api}{path}"
            headers = {} if self.sign is None else dict(self.sign("POST", path))
            body = orjson.dumps({"host_id": me})
            try:
                async with session.post(url, data=body, headers=headers) as response:
                    if response.status != 200:
                        continue
                    body = await response.json()
                blob = unb64(body.get("sealed_key"), "sealed_key", KEY_BYTES + 48)
                keys = Keys.unseal(open_sealed(self.host_key, blob), snap.keyring)
            except (aiohttp.ClientError, TimeoutError, ValueError, AttributeError) as exc:
                logger.debug("secrets: unseal from %s: %s", member.host_id, exc)
                continue
            except (RemoteInputError, Tampered) as exc:
                logger.warning("secrets: %s sent a bad unseal answer: %s", member.host_id, exc)
                continue
            if self.locked_down():
                return
            self._hold(keys, f"from {member.host_id}")
            return

    # -- requests -----------------------------------------------------------------------------

    def _check_serving(self) -> Keys:
        if self.locked_down():
            raise SecretsRefused(409, "locked_down", "the site is locked down")
        self._follow_rekey()  # never hand out a KEK from before a rekey
        if self._keys is None:
            raise SecretsRefused(503, "sealed", "this host is sealed")
        return self._keys

    def answer_unseal_request(self, host_id: object, signer: str | None) -> bytes:
        """The KEK sealed to ``host_id``'s registered key (only that host can open it).

        ``signer``: the member whose peer signature the request carries (None only while
        a host of the site does not sign yet); it must be ``host_id`` itself, so no host
        makes this one seal the KEK to another's key.
        """
        if not isinstance(host_id, str):
            raise RemoteInputError("bad_request", "host_id: a string")
        validate_host_id(host_id)
        if signer is not None and signer != host_id:
            raise SecretsRefused(
                403,
                "not_the_requester",
                f"{signer} may ask for its own unseal key, not {host_id}'s",
            )
        keys = self._check_serving()
        if self.site.view.get(SYSTEM_TABLE, REVOKED_PREFIX + host_id.encode()) is not None:
            raise SecretsRefused(403, "revoked", f"{host_id} was revoked from this site")
        if self.site.view.get(SYSTEM_TABLE, MEMBER_PREFIX + host_id.encode()) is None:
            raise SecretsRefused(403, "not_a_member", f"{host_id} is not a member of this site")
        host_key = self.snapshot().hostkeys.get(host_id)
        if host_key is None:
            raise SecretsRefused(404, "no_host_key", f"{host_id} has not registered its key")
        logger.info("secrets: sending the unseal key to %s, sealed to its key", host_id)
        return seal(host_key, keys.kek)

    def escrow(self, public_key: bytes) -> bytes:
        return seal(public_key, self._check_serving().kek)

    def accept_rekey(self, data: Mapping[str, object], sender: str | None) -> None:
        """A leader about to rekey hands this host the new KEK, sealed to its host key.
        Kept in memory only, and used only once a committed keyring opens with it."""
        unknown = set(data) - {"ssk_public", "sealed_key"}
        if unknown:
            raise RemoteInputError("bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
        public = parse_public_key(data.get("ssk_public"), "ssk_public")
        blob = unb64(data.get("sealed_key"), "sealed_key", KEY_BYTES + SEAL_OVERHEAD)
        if self.locked_down():
            raise SecretsRefused(409, "locked_down", "the site is locked down")
        if self.host_key is None:
            raise SecretsRefused(503, "starting", "this host's key is not loaded yet")
        try:
            kek = open_sealed(self.host_key, blob)
        except Tampered as exc:
            raise SecretsRefused(403, "wrong_key", "not sealed to this host's key") from exc
        if len(kek) != KEY_BYTES:
            raise RemoteInputError("bad_key", f"sealed_key: {KEY_BYTES} bytes sealed")
        while len(self._handed) >= MAX_HANDED:
            self._handed.pop(next(iter(self._handed)))
        self._handed[public] = (kek, sender or "a peer")
        self._follow_rekey()  # committed already, if this host's view is ahead

    async def unseal(self, kek: bytes) -> bool:
        """Unseal with the operator's key; False when this host was unsealed already."""
        await self.site.barrier()
        if self.locked_down():
            raise SecretsRefused(409, "locked_down", "the site is locked down: unlock it first")
        keyring = self.snapshot().keyring
        if keyring is None:
            raise SecretsRefused(409, "not_initialized", "the site has no secrets keys yet")
        try:
            keys = Keys.unseal(kek, keyring)
        except Tampered as exc:
            raise SecretsRefused(403, "wrong_key", "this is not the site's unseal key") from exc
        if self._keys is not None and self._keys.matches(keyring):
            return False
        self._hold(keys, "the operator's key")
        return True

    async def lockdown(self, source: str) -> None:
        await self.site.propose(
            [Put(SECRETS_TABLE, LOCKDOWN_KEY, encode_flag(source))], idempotent=True
        )
        self.drop_keys("the site is locked down")

    async def unlock(self) -> bool:
        (result,) = await self.site.propose([Delete(SECRETS_TABLE, LOCKDOWN_KEY)], idempotent=True)
        return result.existed

    async def request_rotation(self, source: str) -> int | None:
        """Ask for a rotation; the current data key id before it (None: no keys yet)."""
        await self.site.barrier()
        state = self.snapshot().dkstate
        if state is None:
            raise SecretsRefused(409, "not_initialized", "the site has no secrets keys yet")
        if self.locked_down():
            raise SecretsRefused(409, "locked_down", "the site is locked down")
        await self.site.propose(
            [Put(SECRETS_TABLE, ROTATE_KEY, encode_flag(source))], idempotent=True
        )
        return state.current

    async def rotated_since(self, before: int, timeout_s: float) -> bool:
        """Wait until a data key newer than ``before`` is current and alone in use."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            snap = self.snapshot()
            state = snap.dkstate
            if state is not None and state.current > before and set(snap.dks) == {state.current}:
                return True
            await asyncio.sleep(0.05)
        return False

    async def put_settings(self, settings: SecretSettings) -> None:
        await self.site.propose(
            [Put(SECRETS_TABLE, SETTINGS_KEY, settings.encode())], idempotent=True
        )

    # -- delivery -----------------------------------------------------------------------------

    def instance_dir(self, runtime_id: str) -> Path:
        return self.root / runtime_id

    def _record(self, ref: SecretRef) -> SecretRecord | None:
        record = self.site.view.get(SECRETS_TABLE, secret_key(ref.tenant, ref.name))
        return None if record is None else SecretRecord.decode(record.value)

    def versions_tag(self, refs: Sequence[SecretRef], tenant: str) -> str:
        """Which version of each secret an instance of an app of ``tenant`` gets: part of
        its spec hash, so a new version restarts it. Holds no secret material; another
        tenant's secret is not looked up."""
        parts = []
        for ref in refs:
            record = None if ref.tenant != tenant else self._record(ref)
            parts.append(f"{ref.tenant}/{ref.name}@{record.version if record else 0}")
        return ",".join(parts)

    @staticmethod
    def check_owned(refs: Sequence[SecretRef], tenant: str) -> None:
        """Raise SecretUnavailable if a secret of ``refs`` is not ``tenant``'s: an app gets
        only its own tenant's secrets. Looks nothing up, so the answer is the same whether
        that secret exists or not."""
        for ref in refs:
            if ref.tenant != tenant:
                raise SecretUnavailable(
                    f"secret {ref.tenant}/{ref.name} refused: an app of tenant {tenant} "
                    "gets only its own tenant's secrets"
                )

    def check_deliverable(self, refs: Sequence[SecretRef], tenant: str) -> None:
        """Raise SecretUnavailable unless an instance of an app of ``tenant`` needing
        ``refs`` may start now (nothing may start under lock-down; no secret of another
        tenant is delivered). Decrypts nothing."""
        if self.locked_down():
            raise SecretUnavailable("site locked down")
        if not refs:
            return
        self.check_owned(refs, tenant)
        self.keys()
        for ref in refs:
            record = self._record(ref)
            if record is None:
                raise SecretUnavailable(f"waiting for secret {ref.tenant}/{ref.name}")
            if record.state == "failed":
                raise SecretUnavailable(
                    f"secret {ref.tenant}/{ref.name} is unusable: {record.message}"
                )
            if record.state != "ready":
                raise SecretUnavailable(
                    f"waiting for secret {ref.tenant}/{ref.name} (not decrypted yet)"
                )

    def value(self, tenant: str, name: str) -> bytes:
        """One secret's value, for the agent's own use (a registry's credentials): never
        answered to a caller. Raises SecretUnavailable (sealed, locked down, missing)."""
        if self.locked_down():
            raise SecretUnavailable("site locked down")
        return decrypt(self.keys(), self.snapshot(), tenant, name)[0]

    def materialise(
        self,
        runtime_id: str,
        refs: Sequence[SecretRef],
        tenant: str,
        owner_uid: int | None = None,
    ) -> dict[str, str]:
        """Write the secret files of an instance of an app of ``tenant``; returns its
        secret environment variables.

        ``owner_uid``: the uid the instance runs as (its tenant's); the files are its own.

        Raises SecretUnavailable (sealed, locked down, a secret missing or unusable, or a
        secret of another tenant: refused before anything is decrypted or written).
        """
        self.check_owned(refs, tenant)
        keys = self.keys()
        snap = self.snapshot()
        values = [(ref, decrypt(keys, snap, ref.tenant, ref.name)[0]) for ref in refs]
        env: dict[str, str] = {}
        for ref, value in values:
            if ref.env is None:
                continue
            try:
                text = value.decode()
            except UnicodeDecodeError:
                text = "\0"
            if "\0" in text:
                raise SecretUnavailable(
                    f"secret {ref.tenant}/{ref.name} cannot be the environment variable "
                    f"{ref.env}: not text without NUL"
                )
            env[ref.env] = text
        directory = self.instance_dir(runtime_id)
        shutil.rmtree(directory, ignore_errors=True)
        directory.mkdir(parents=True, mode=0o700)
        for parent in (directory.parent, directory.parent.parent):
            with contextlib.suppress(OSError):
                parent.chmod(0o700)
        for ref, value in values:
            target = directory / ref.file
            for part in reversed(target.relative_to(directory).parents[:-1]):
                (directory / part).mkdir(mode=0o700, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o400)
            with os.fdopen(fd, "wb") as handle:
                handle.write(value)
        if owner_uid is not None:
            for path in (directory, *directory.rglob("*")):
                os.chown(path, owner_uid, owner_uid, follow_symlinks=False)
        return env

    def remove(self, runtime_id: str) -> None:
        shutil.rmtree(self.instance_dir(runtime_id), ignore_errors=True)

    def remove_stale(self, keep: Iterable[str]) -> None:
        """Delete the secret files of instances not in ``keep`` (left by an earlier run)."""
        kept = set(keep)
        if not self.root.is_dir():
            return
        for entry in self.root.iterdir():
            if entry.name not in kept:
                logger.info("secrets: removing stale secret files of %s", entry.name)
                shutil.rmtree(entry, ignore_errors=True)


def parse_unseal_key(data: dict[str, object]) -> bytes:
    unknown = set(data) - {"key"}
    if unknown:
        raise RemoteInputError("bad_request", f"unknown fields: {', '.join(sorted(unknown))}")
    kek = unb64(data.get("key"), "key", KEY_BYTES)
    if len(kek) != KEY_BYTES:
        raise RemoteInputError("bad_key", f"key: base64 of {KEY_BYTES} bytes")
    return kek


def sealed_answer(blob: bytes) -> dict[str, str]:
    return {"sealed_key": b64(blob)}
