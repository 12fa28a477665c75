"""A new cluster password after a host is revoked, changed on every host without a restart.

Whoever knows the cluster password can talk Raft to the site's hosts (pysyncobj accepts a
peer that proves it, under any member's name), and, on a LAN without the overlay, read
the replicated state off the wire. A revoked host knew it, so every revocation starts a
rotation, driven by the Raft leader through three steps (``raft.password``):

    accept   every host accepts the new password too, still sends with the old one
    send     every host sends with the new one, still accepts the old one
    done     every host accepts the new one only

The record ``raftpw/rotation`` (system table) holds the step and, for each host, the old
and the new password sealed to that host's X25519 key (``hostkey/`` in the secrets table;
the revoked host's copy is never made). Each host sets its keys from the record and
acknowledges the step (``raftpw/ack/{host}``); the leader moves to the next step once every
member has acknowledged the current one, so no host is ever asked to accept only a
password a member does not send with. A member that joins during a rotation gets its
sealed copies added by the leader. While a rotation is under way, admission refuses
joins ("retry later"): a host admitted with a password about to be retired would be cut.

A host down for the whole rotation holds up its end (the old password stays accepted
until it acknowledges): ``/v1/status`` names the hosts a rotation waits for, and removing
such a host lets the rotation finish.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import orjson
from nacl.exceptions import CryptoError
from nacl.public import PrivateKey, PublicKey, SealedBox

from meshorch.state.ports import Members, SiteState
from meshorch.state.tables import REVOKED_PREFIX, SYSTEM_TABLE
from raft import Put
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

ROTATION_KEY = b"raftpw/rotation"
ACK_PREFIX = b"raftpw/ack/"
STEPS = ("accept", "send", "done")
POLL_S = 0.5


@dataclass(frozen=True)
class Rotation:
    """One password change: its step, and both passwords sealed to each host's key."""

    generation: int
    step: str
    sealed: Mapping[str, tuple[str, str]] = field(default_factory=dict)  # host: (old, new)
    revoked_at: float = 0.0  # the newest revocation this rotation answers

    def encode(self) -> bytes:
        return orjson.dumps(
            {
                "v": 1,
                "generation": self.generation,
                "step": self.step,
                "sealed": {h: list(pair) for h, pair in self.sealed.items()},
                "revoked_at": self.revoked_at,
            }
        )

    @staticmethod
    def decode(raw: bytes) -> Rotation:
        data = orjson.loads(raw)
        sealed = {str(h): (str(p[0]), str(p[1])) for h, p in dict(data["sealed"]).items()}
        step = str(data["step"])
        if step not in STEPS:
            raise ValueError(f"unknown rotation step {step!r}")
        return Rotation(int(data["generation"]), step, sealed, float(data["revoked_at"]))

    @property
    def under_way(self) -> bool:
        return self.step != "done"


def seal_pair(public_key: bytes, old: str, new: str) -> tuple[str, str]:
    box = SealedBox(PublicKey(public_key))
    return tuple(  # type: ignore[return-value]
        base64.b64encode(box.encrypt(p.encode())).decode() for p in (old, new)
    )


def open_pair(private_key: PrivateKey, pair: tuple[str, str]) -> tuple[str, str] | None:
    """The (old, new) passwords sealed to this host, or None when they do not open."""
    box = SealedBox(private_key)
    try:
        old, new = (box.decrypt(base64.b64decode(p)).decode() for p in pair)
    except (CryptoError, ValueError):
        return None
    return old, new


def keys_for(step: str, old: str, new: str) -> tuple[str, tuple[str, ...]]:
    """What a host sends with and accepts at ``step``."""
    if step == "accept":
        return old, (new,)
    if step == "send":
        return new, (old,)
    return new, ()


def next_step(rotation: Rotation, members: Sequence[str], acks: Mapping[str, str]) -> str | None:
    """The step after the current one once every member acknowledged it (None: wait)."""
    if not rotation.under_way:
        return None
    if any(acks.get(host) != f"{rotation.generation}/{rotation.step}" for host in members):
        return None
    return STEPS[STEPS.index(rotation.step) + 1]


def waiting_for(rotation: Rotation, members: Sequence[str], acks: Mapping[str, str]) -> list[str]:
    want = f"{rotation.generation}/{rotation.step}"
    return sorted(h for h in members if acks.get(h) != want)


class PasswordNode(SiteState, Protocol):
    """The Raft node whose password changes."""

    async def use_passwords(self, send: str, also_accept: Sequence[str] = ()) -> None: ...

    def passwords(self) -> tuple[str, tuple[str, ...]]: ...


class PasswordRotation:
    """Runs on every host: follows the rotation record; on the leader, drives it."""

    def __init__(
        self,
        node: PasswordNode,
        members: Members,
        host_id: str,
        host_key: Callable[[], PrivateKey | None],
        host_public_keys: Callable[[], Mapping[str, bytes]],
        store_password: Callable[[str], None],
    ) -> None:
        self.node = node
        self.members = members
        self.host_id = host_id
        self.host_key = host_key
        self.host_public_keys = host_public_keys
        self.store_password = store_password
        self._followed = -1  # the rotation record (its index) this host has followed

    # -- reading the state -----------------------------------------------------

    def rotation(self) -> Rotation | None:
        record = self.node.view.get(SYSTEM_TABLE, ROTATION_KEY)
        return None if record is None else Rotation.decode(record.value)

    def acks(self) -> dict[str, str]:
        records, _ = self.node.view.scan(SYSTEM_TABLE, ACK_PREFIX, 100_000)
        return {k[len(ACK_PREFIX) :].decode(): r.value.decode() for k, r in records}

    def newest_revocation(self) -> float:
        records, _ = self.node.view.scan(SYSTEM_TABLE, REVOKED_PREFIX, 100_000)
        return max((float(orjson.loads(r.value).get("at", 0.0)) for _, r in records), default=0.0)

    def member_ids(self) -> list[str]:
        return sorted(m.host_id for m in self.members.members())

    def under_way(self) -> bool:
        rotation = self.rotation()
        return rotation is not None and rotation.under_way

    def status(self) -> dict[str, object]:
        rotation = self.rotation()
        accepted = len(self.node.passwords()[1])  # by this host; 2 during a rotation
        if rotation is None:
            return {"generation": 0, "step": "done", "waiting_for": [], "accepted": accepted}
        return {
            "generation": rotation.generation,
            "step": rotation.step,
            # At "done" too: the hosts that have not dropped the old password yet.
            "waiting_for": waiting_for(rotation, self.member_ids(), self.acks()),
            "accepted": accepted,
        }

    # -- the loop ----------------------------------------------------------------

    async def run(self) -> None:
        while True:
            try:
                await self.follow()
                await self.seal_missing()
                if self.node.status().is_leader:
                    await self.drive()
            except ProposalError as exc:
                logger.info("cluster password rotation: %s; retrying", exc)
            except Exception:  # a bug here must not stop rotations for good
                logger.exception("cluster password rotation failed; retrying")
            await asyncio.sleep(POLL_S)

    async def seal_missing(self) -> None:
        """Any host holding its copy seals copies for members that have none (a host that
        joined during the rotation): the leader may be such a newcomer itself."""
        record = self.node.view.get(SYSTEM_TABLE, ROTATION_KEY)
        if record is None:
            return
        rotation = Rotation.decode(record.value)
        key, own = self.host_key(), rotation.sealed.get(self.host_id)
        if not rotation.under_way or key is None or own is None:
            return
        public_keys = self.host_public_keys()
        missing = [h for h in self.member_ids() if h not in rotation.sealed and h in public_keys]
        pair = open_pair(key, own) if missing else None
        if pair is None:
            return
        sealed = dict(rotation.sealed)
        sealed.update({h: seal_pair(public_keys[h], *pair) for h in missing})
        updated = Rotation(rotation.generation, rotation.step, sealed, rotation.revoked_at)
        await self.node.propose(
            [Put(SYSTEM_TABLE, ROTATION_KEY, updated.encode(), expect_index=record.mod_index)],
            idempotent=True,
        )

    async def follow(self) -> None:
        """Set this host's keys from the record, keep the new password, acknowledge."""
        record = self.node.view.get(SYSTEM_TABLE, ROTATION_KEY)
        if record is None or record.mod_index == self._followed:
            return  # nothing new: no unsealing twice a second
        rotation = Rotation.decode(record.value)
        key = self.host_key()
        if key is None or self.host_id not in rotation.sealed:
            return
        pair = open_pair(key, rotation.sealed[self.host_id])
        if pair is None:
            logger.warning("cluster password rotation: this host's copy does not open")
            return
        send, accept = keys_for(rotation.step, *pair)
        if self.node.passwords() != (send, (send, *(p for p in accept if p != send))):
            await self.node.use_passwords(send, accept)
            if rotation.step != "accept":
                await asyncio.to_thread(self.store_password, send)  # for restarts
            logger.info("cluster password rotation %d: step %s", rotation.generation, rotation.step)
        ack = f"{rotation.generation}/{rotation.step}".encode()
        current = self.node.view.get(SYSTEM_TABLE, ACK_PREFIX + self.host_id.encode())
        if current is None or current.value != ack:
            await self.node.propose(
                [Put(SYSTEM_TABLE, ACK_PREFIX + self.host_id.encode(), ack)], idempotent=True
            )
        self._followed = record.mod_index  # keys set and acknowledged for this record

    async def drive(self) -> None:
        """On the leader: start a rotation after a revocation (once every member has a
        host key to seal to), move to the next step once every member acknowledged."""
        local = self.rotation()
        idle = local is None or not local.under_way
        if idle and self.newest_revocation() <= (0.0 if local is None else local.revoked_at):
            return  # nothing to do here: no barrier (a log entry) twice a second for nothing
        await self.node.barrier()
        record = self.node.view.get(SYSTEM_TABLE, ROTATION_KEY)
        rotation = None if record is None else Rotation.decode(record.value)
        index = 0 if record is None else record.mod_index
        members = self.member_ids()
        if rotation is None or not rotation.under_way:
            revoked_at = self.newest_revocation()
            if revoked_at <= (0.0 if rotation is None else rotation.revoked_at):
                return
            public_keys = self.host_public_keys()
            if any(h not in public_keys for h in members):
                return  # a host still registering its key: it would be left out
            old, new = self.node.passwords()[0], secrets.token_urlsafe(32)
            generation = 1 if rotation is None else rotation.generation + 1
            sealed = {h: seal_pair(public_keys[h], old, new) for h in members}
            rotation = Rotation(generation, "accept", sealed, revoked_at)
            logger.info("cluster password rotation %d: started (a host was revoked)", generation)
        else:
            step = next_step(rotation, members, self.acks())
            if step is None:
                return
            rotation = Rotation(rotation.generation, step, rotation.sealed, rotation.revoked_at)
        await self.node.propose(
            [Put(SYSTEM_TABLE, ROTATION_KEY, rotation.encode(), expect_index=index)],
            idempotent=True,
        )
