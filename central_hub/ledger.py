"""The hub's one way to change its state: the store, the delta log's head, the audit log.

``Ledger`` owns the open ``Store``, the fleet's name and signing keys, the head of the
delta log and the audit log's last sequence number. Every change goes through
``transact``: under one lock a plan reads the store and builds its writes in a ``Txn``
(deltas included, chained from the current head; audit entries numbered after the last
one) and they are committed in one LMDB transaction, flushed to disk, before the caller is
answered. The plan runs in a shielded task, so a caller that goes away never leaves a
commit half-applied in memory. A delta is visible (``deltas_after``, long-polls woken by
``wait_for_deltas``, the ``on_append`` hook) only once its commit is durable.

Per-site views (``central_hub.siteviews``, shared with a follower replica): ``view`` is
a stored delta as one site may see it; a site's long-poll (``wait_for_site``) waits for a
delta that targets it (or all sites), woken by that delta only.

The ledger knows nothing of sites, applications or tenants: the hub's parts
(``central_hub.accounts``, ``sites``, ``deployments``, ``vault_service``, ...) plan their
changes against it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, TypeVar

import orjson
from nacl.signing import SigningKey

from central_hub import audit, deltalog
from central_hub.authz import Principal
from central_hub.deltalog import Head
from central_hub.errors import ApiError
from central_hub.keyfiles import Kek
from central_hub.siteviews import SiteViews
from central_hub.store import Store, Write, delete, put_json, version_key
from central_hub.tokens import TokenRecord
from meshorch.fleet.delta import (
    ALL_SITES,
    DELTA_V1,
    ROTATE_OP,
    Target,
    key_id,
)

logger = logging.getLogger(__name__)


def _outcome_unread(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        logger.info("a change whose caller went away was not made: %s", task.exception())


T = TypeVar("T")
MAX_DELTA_RESPONSE_BYTES = 8 * 1024 * 1024
CALLER = audit.CALLER


class Txn:
    """The writes of one change, and the delta log's head as they would leave it."""

    def __init__(self, ledger: Ledger, now: float) -> None:
        self.ledger = ledger
        self.now = now
        self.head = ledger.head
        self.writes: list[Write] = []
        self.after: list[Callable[[], None]] = []
        self.audit_entries: list[dict[str, Any]] = []
        self.targets: list[tuple[int, Target]] = []  # the deltas appended, for the waiters

    def audit(
        self,
        token: Principal | None,
        action: str,
        tenant: str | None,
        object_type: str,
        object_id: str,
        outcome: str,
        detail: str = "",
    ) -> None:
        """An audit entry committed with this transaction's writes."""
        self.audit_entries.append(
            audit.entry(token, action, tenant, object_type, object_id, outcome, detail, self.now)
        )

    def changed(
        self, object_type: str, object_id: str, tenant: str | None, detail: str = ""
    ) -> None:
        """Audit a change made for the current request's caller (in this transaction)."""
        caller = CALLER.get()
        token, action = (None, "hub") if caller is None else caller
        self.audit(token, action, tenant, object_type, object_id, "ok", detail)

    def put(self, db: str, key: str, value: object) -> None:
        self.writes.append(put_json(db, key, value))

    def put_sequence(self, db: str, seq: int, value: object) -> None:
        self.writes.append((db, version_key(seq), orjson.dumps(value)))

    def delete(self, db: str, key: str) -> None:
        self.writes.append(delete(db, key))

    def delta(
        self,
        ops: Sequence[Mapping[str, Any]],
        target: Target,
        keys: Sequence[SigningKey] | None = None,
    ) -> int:
        ledger = self.ledger
        signed = ledger.signed_target(target)  # a Merkle target keeps its tree for the views
        try:
            envelope, head = deltalog.build_delta(
                self.head,
                ledger.fleet,
                ops,
                signed,
                self.now,
                ledger.delta_ttl_s,
                keys or ledger.signing_keys,
                ledger.delta_format(),
            )
        except ValueError as exc:
            raise ApiError(413, "delta_too_large", str(exc)) from None
        self.writes.append(("deltas", version_key(head.version), envelope))
        self.targets.append((head.version, signed))
        self.head = head
        self.put("meta", "head", head.to_json())
        return head.version


class Ledger:
    """The store and the delta and audit logs of one hub (see the module docstring).

    ``attach`` gives it the opened store (``central_hub.service`` opens the data
    directory); until then, and after ``close_store``, ``transact`` answers 503 ``stopping``.
    """

    def __init__(
        self,
        data_dir: Path,
        clock: Callable[[], float],
        delta_ttl_s: float,
        on_append: Callable[[], None] | None = None,
    ) -> None:
        self.data_dir = data_dir
        self.kek: Kek | None = None  # seals the key files (``central_hub.keyfiles``)
        self.clock = clock
        self.delta_ttl_s = delta_ttl_s
        self.on_append = on_append
        self.fleet = ""
        self.head = Head()
        self.signing_keys: list[SigningKey] = []
        self.closing = False
        self.pending: set[asyncio.Future[Any]] = set()  # awaited before the store closes
        # The format of the next delta (``central_hub.deltaformat`` sets it).
        self.delta_format: Callable[[], int] = lambda: DELTA_V1
        # How the next delta names its sites: a list, or a Merkle root (deltaformat sets it).
        self.signed_target: Callable[[Target], Target] = lambda target: target
        self.views = SiteViews()  # per-site views and their long-polls (module docstring)
        self._store: Store | None = None
        self._lock = asyncio.Lock()
        self._rotate_lock = asyncio.Lock()
        self._txn: Txn | None = None  # the change being planned (under the lock)
        self._audit_seq = 0

    # -- state ----------------------------------------------------------------------------

    def now(self) -> float:
        return self.clock()

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the hub is not started")
        return self._store

    @property
    def is_open(self) -> bool:
        return self._store is not None

    @property
    def root_key(self) -> str:
        return key_id(self.signing_keys[0])

    def attach(
        self, store: Store, fleet: str, signing_keys: Sequence[SigningKey], head: Head
    ) -> None:
        """Serve ``store``, whose delta log ends at ``head``, signing with ``signing_keys``."""
        self.fleet = fleet
        self.signing_keys = list(signing_keys)
        self.head = head
        self.views.known_from(head.version)
        self._audit_seq = store.last_sequence("audit")
        self._store = store

    async def close_store(self) -> None:
        """Close the store (once ``drain`` returned); ``transact`` answers 503 after."""
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None

    def track(self, future: asyncio.Future[Any]) -> None:
        """Keep ``future`` in ``pending`` until it is done (the hub awaits them all
        before it closes the store)."""
        self.pending.add(future)
        future.add_done_callback(self.pending.discard)

    async def drain(self) -> None:
        if self.pending:
            await asyncio.gather(*self.pending, return_exceptions=True)

    def close(self) -> None:
        """The hub is stopping: long-polls answer now, and wait no more."""
        self.closing = True
        self._notify_appended()
        self.views.close()

    # -- changes --------------------------------------------------------------------------

    async def transact(self, plan: Callable[[Txn], T]) -> T:
        """Run ``plan`` under the lock and commit its writes durably (module docstring)."""

        async def run() -> T:
            async with self._lock:
                if self._store is None:
                    raise ApiError(503, "stopping", "the hub is stopping")
                txn = Txn(self, self.now())
                self._txn = txn
                try:
                    result = plan(txn)
                finally:
                    self._txn = None
                if txn.writes and not txn.audit_entries and CALLER.get() is not None:
                    txn.changed("request", "", None)  # a change its plan did not describe
                seq = self._audit_seq
                for entry in txn.audit_entries:
                    seq += 1
                    txn.put_sequence("audit", seq, {"seq": seq, **entry})
                if txn.writes:
                    await self.store.apply(txn.writes, sync=True)
                    self._audit_seq = seq
                    appended = txn.head != self.head
                    self.head = txn.head
                    for action in txn.after:
                        action()
                    if appended:
                        for version, target in txn.targets:
                            self.views.index(version, target)
                        self._notify_appended()
                return result

        task = asyncio.ensure_future(run())
        self.track(task)
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            # The caller went (its client hung up, the hub stops): the change carries on,
            # and its outcome, which nobody else reads, is logged here.
            task.add_done_callback(_outcome_unread)
            raise

    def _notify_appended(self) -> None:
        if self.on_append is not None:
            self.on_append()

    # -- the audit log --------------------------------------------------------------------

    def audit(
        self,
        token: Principal | None,
        action: str,
        tenant: str | None,
        object_type: str,
        object_id: str,
        outcome: str,
        detail: str = "",
    ) -> asyncio.Future[None] | None:
        """Append an audit entry (``central_hub.audit``). Called while a change is planned,
        the entry joins that change's transaction (None is returned); otherwise it is
        committed on its own, durably, by the returned future (await it to be sure)."""
        txn = self._txn
        if txn is not None:
            txn.audit(token, action, tenant, object_type, object_id, outcome, detail)
            return None

        def plan(txn: Txn) -> None:
            txn.audit(token, action, tenant, object_type, object_id, outcome, detail)

        future = asyncio.ensure_future(self.transact(plan))
        future.add_done_callback(_log_audit_failure)
        return future

    def read_audit(
        self, token: TokenRecord, after: int, limit: int, tenant: str | None
    ) -> dict[str, Any]:
        """``GET /v1/audit``: entries after ``after`` that the token's tenant may read."""
        found = audit.select(self.store.sequence_after("audit", after), token.tenant, tenant, limit)
        return {"entries": found, "last": self._audit_seq}

    # -- the delta log --------------------------------------------------------------------

    def fleet_info(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "root_key": self.root_key,
            "head": self.head.version,
            "head_hash": self.head.hash,
        }

    def deltas_after(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        return self.store.deltas_after(after, limit, MAX_DELTA_RESPONSE_BYTES)

    def heartbeat_due(self, head: Head, now: float, interval_s: float) -> bool:
        """Whether the tip ``head`` is old enough for an empty delta to renew it."""
        return head.version > 0 and now - head.issued_at >= interval_s

    # -- per-site views -------------------------------------------------------------------

    @property
    def link_waiters(self) -> int:
        """Long-polls waiting for a delta right now."""
        return self.views.waiting

    def site_head(self, site: str) -> int:
        """The newest version that targets ``site`` or all sites (``SiteViews.site_head``)."""
        return self.views.site_head(site)

    def views_after(self, after: int, limit: int, site: str) -> list[bytes]:
        return self.views.views(self.deltas_after(after, limit), site)

    async def wait_for_site(
        self, site: str, after: int, wait_s: float, limit: int
    ) -> tuple[int, list[bytes]]:
        """``site``'s long-poll: its view of the deltas after ``after``, at once when one
        of them targets it (or all sites); otherwise after waiting up to ``wait_s`` for
        one, with whatever was issued for other sites meanwhile (their headers)."""
        await self.views.wait(site, after, wait_s)
        head = self.head.version
        if self._store is None:
            return head, []
        return head, self.views_after(after, limit, site)

    async def wait_for_deltas(
        self, after: int, wait_s: float, limit: int, site: str | None = None
    ) -> tuple[int, list[bytes]]:
        """Deltas after ``after`` (``site``'s view when given); when there is none, wait up
        to ``wait_s`` for one (``SiteViews.wait_any``, as a follower's poll waits)."""
        await self.views.wait_any(after, wait_s, lambda: self.head.version)
        head = self.head.version
        if self._store is None:
            return head, []
        if site is not None:
            return head, self.views_after(after, limit, site)
        return head, [envelope for _, envelope in self.deltas_after(after, limit)]

    async def rotate_root(self) -> dict[str, Any]:
        """Append a root.rotate delta signed by the old and new keys; sign with the new."""
        async with self._rotate_lock:
            new = await asyncio.to_thread(deltalog.write_new_key, self.data_dir, self.kek)

            def plan(txn: Txn) -> dict[str, Any]:
                rotation = int(self.store.get_json("meta", "rotations") or 0) + 1
                old = self.signing_keys[0]
                version = txn.delta(
                    [{"op": ROTATE_OP, "new_key": key_id(new)}], ALL_SITES, keys=[old, new]
                )
                txn.put("meta", "root_key", key_id(new))
                txn.put("meta", "rotations", rotation)
                txn.changed("root_key", key_id(new), None, f"rotation {rotation}")

                def switch() -> None:
                    deltalog.finish_rotation(self.data_dir, rotation)
                    self.signing_keys = [new]

                txn.after.append(switch)
                return {
                    "root_key": key_id(new),
                    "previous_key": key_id(old),
                    "version": version,
                    "retired_file": deltalog.retired_name(rotation),
                }

            try:
                return await self.transact(plan)
            except BaseException:
                if self._store is None or self.store.get_json("meta", "root_key") != key_id(new):
                    (self.data_dir / deltalog.NEW_KEY_FILE).unlink(missing_ok=True)
                raise


def _log_audit_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("an audit entry was not written: %s", future.exception())
