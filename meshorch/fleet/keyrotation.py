"""Rotating the site key towards the hub, on the site's Raft leader (docs/fleet-link.md).

A revoked host still holds the site key (it was in the replicated state it had), so after
each committed revocation (``revoked/<host>`` in the system table, newer than what the
current key covers) the leader rotates it, in steps that survive a leader change:

1. a pending key is written to the state (``fleet/site-key-next``, compare-and-set: one);
2. it is announced to the hub, signed by the current key, with the new key's proof
   (``meshorch.fleet.sitekey``); while the hub is unreachable this is retried with
   backoff, and the site goes on signing with the current key;
3. once the hub took it, it replaces the current key (guarded on the current record) and
   the link session ends, so the next one signs everything with the new key.

A leader that finds a pending key announces it again: the hub answers a rotation to the key
it already holds with success. When the hub refuses the current key, the pending key is
tried (the hub took it, but its answer was lost). An operator may ask for a rotation at any
time (``request``, ``POST /v1/fleet/key`` on the agent API).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any, Protocol

from nacl.signing import SigningKey

from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import SITE_KEY_KEY
from meshorch.fleet.client import LinkClient, LinkError, LinkUnauthorized
from meshorch.fleet.sitekey import (
    SITE_KEY_NEXT_KEY,
    CurrentKey,
    PendingKey,
    covered_index,
    rotation_body,
    rotation_needed,
)
from meshorch.state.ports import SiteState
from meshorch.state.tables import REVOKED_PREFIX, SYSTEM_TABLE
from raft import Delete, Guard, Put

logger = logging.getLogger(__name__)

WATCH_S = 0.5  # how soon the leader notices a revocation
MAX_REVOCATIONS = 100_000


class Delays(Protocol):
    def next_s(self) -> float: ...

    def reset(self) -> None: ...


class NoSiteKey(RemoteInputError):
    def __init__(self) -> None:
        super().__init__("not_configured", "this site has no fleet key yet (no fleet link)")


def _public_hex(seed: bytes) -> str:
    return bytes(SigningKey(seed).verify_key).hex()


class SiteKeyRotation:
    """The rotation state machine of one agent; ``run`` runs in the leader's link session."""

    def __init__(
        self, site: SiteState, site_id: str, clock: Callable[[], float] = time.time
    ) -> None:
        self.site = site
        self.site_id = site_id
        self.clock = clock
        self.last_error: str | None = None
        self._wake = asyncio.Event()

    # -- reading the state -------------------------------------------------------------

    def current(self) -> tuple[CurrentKey, int] | None:
        record = self.site.view.get(SYSTEM_TABLE, SITE_KEY_KEY)
        return None if record is None else (CurrentKey.decode(record.value), record.mod_index)

    def pending(self) -> PendingKey | None:
        record = self.site.view.get(SYSTEM_TABLE, SITE_KEY_NEXT_KEY)
        return None if record is None else PendingKey.decode(record.value)

    def newest_revocation(self) -> int:
        records, _ = self.site.view.scan(SYSTEM_TABLE, REVOKED_PREFIX, MAX_REVOCATIONS)
        return max((record.mod_index for _, record in records), default=0)

    def due(self) -> bool:
        """A host was revoked after the current key was made."""
        current = self.current()
        if current is None:
            return False
        return rotation_needed(covered_index(*current), self.newest_revocation())

    def status_json(self) -> dict[str, Any]:
        current, pending = self.current(), self.pending()
        covers = None if current is None else covered_index(*current)
        return {
            "pending": None
            if pending is None
            else {
                "public_key": pending.public_hex,
                "reason": pending.reason,
                "requested_at": pending.requested_at,
            },
            "rotated_at": None if current is None else current[0].rotated_at,
            "reason": None if current is None else current[0].reason or None,
            "covers_revocations_to": covers,
            "due": self.due(),
            "last_error": self.last_error,
        }

    # -- changes -----------------------------------------------------------------------

    async def request(self, reason: str) -> PendingKey:
        """Make the pending key, or return the one already waiting (any host may call it).

        Raises NoSiteKey when the site has no key yet, ProposalError when Raft did not commit.
        """
        await self.site.barrier()
        while True:
            waiting = self.pending()
            if waiting is not None:
                return waiting
            if self.current() is None:
                raise NoSiteKey()
            fresh = PendingKey(os.urandom(32), self.newest_revocation(), reason, self.clock())
            (result,) = await self.site.propose(
                [Put(SYSTEM_TABLE, SITE_KEY_NEXT_KEY, fresh.encode(), expect_index=0)]
            )
            if result.ok:
                logger.info("fleet key: rotation to %s asked (%s)", fresh.public_hex, reason)
                self._wake.set()
                return fresh
            await self.site.barrier()  # another host made one meanwhile: take that one

    async def run(self, client: LinkClient, delays: Delays) -> None:
        """Make, announce and promote rotations with ``client`` (which signs with the
        current key); returns when the key in use changed, so the session starts again."""
        signing_with = bytes(client.key.verify_key).hex()
        while True:
            current = self.current()
            if current is None or _public_hex(current[0].seed) != signing_with:
                return
            pending = self.pending()
            if pending is None:
                if self.due():
                    await self.request("revocation")
                    continue
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(WATCH_S):
                        await self._wake.wait()
                self._wake.clear()
                continue
            if await self._announce(client, pending):
                await self._promote(current[1], pending)
                delays.reset()
                return
            await asyncio.sleep(delays.next_s())

    async def _announce(self, client: LinkClient, pending: PendingKey) -> bool:
        """Whether the hub holds the pending key now."""
        body = rotation_body(self.site_id, pending.signing_key, self.clock())
        try:
            try:
                await client.rotate_key(body)
            except LinkUnauthorized:
                # The hub may hold the pending key already (its answer to an earlier
                # announcement was lost): a request signed by that key tells.
                await client.rotate_key(body, key=pending.signing_key)
        except LinkError as exc:
            if str(exc) != self.last_error:
                log = logger.error if isinstance(exc, LinkUnauthorized) else logger.warning
                log("fleet key: rotation to %s not taken by the hub: %s", pending.public_hex, exc)
            self.last_error = str(exc)
            return False
        self.last_error = None
        return True

    async def _promote(self, current_index: int, pending: PendingKey) -> None:
        promoted = CurrentKey(pending.seed, pending.covers, self.clock(), pending.reason)
        results = await self.site.propose(
            [
                Guard(SYSTEM_TABLE, SITE_KEY_KEY, current_index, 2),
                Put(SYSTEM_TABLE, SITE_KEY_KEY, promoted.encode()),
                Delete(SYSTEM_TABLE, SITE_KEY_NEXT_KEY),
            ]
        )
        if results[0].ok:
            logger.info("fleet key: the site now signs with %s", pending.public_hex)
        else:  # another leader promoted it first
            logger.info("fleet key: %s was promoted meanwhile", pending.public_hex)
