"""The hub service: configuration, life cycle, and every change to the hub's state.

``Hub`` is an async context manager: entering opens (or initialises) the data directory,
starts the HTTP API and the rollout driver; leaving stops them and closes the store::

    async with Hub(HubConfig(data_dir=Path("/var/lib/meshorch-hub"), port=0)) as hub:
        print(hub.url, hub.root_key)

Ordering rules:

- Every change goes through ``_transact``: under one lock, a plan reads the store, builds
  its writes (deltas included, chained from the current head) and they are committed in
  one LMDB transaction, flushed to disk, before the caller is answered. The plan runs in
  a shielded task, so a caller that goes away never leaves a commit half-applied in memory.
- A delta is visible to sites (and long-polls are woken) only after its commit is durable:
  a delta once served is never issued differently.
- Reports are kept in memory for the fleet view and the rollout driver and written to the
  store without a flush. Gossip summaries (``central_hub.gossip``) are kept in memory only.
- The gossip member starts after the HTTP API and stops before it; it publishes the head
  after every append.
- Active alerts are kept in the store (``central_hub.alerts``): fired and cleared ones
  without a flush, one write after the other under ``_alerts_lock`` (a clear never
  overtakes its firing); an acknowledgement durably, with its audit entry, in that order too.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

import orjson
from aiohttp import web
from nacl.signing import SigningKey

from central_hub import (
    alerts,
    audit,
    deltalog,
    fleetview,
    placement,
    store,
    tenancy,
    tokens,
    waves,
)
from central_hub.alerts import Alert, AlertBook, Thresholds, record_key
from central_hub.authz import Principal
from central_hub.deltalog import Head
from central_hub.errors import ApiError, BadStoredRecord, HubConfigError
from central_hub.gossip import HubGossip
from central_hub.logs import HubLogs
from central_hub.model import DEFAULT_TENANT, is_id
from central_hub.store import Store, Write, delete, put_json, version_key
from central_hub.tenancy import unknown_tenant
from central_hub.tokens import TokenRecord
from central_hub.vault import VaultService
from meshorch.apps.spec import AppSpec, to_json
from meshorch.fleet.client import GOSSIP_PRESETS
from meshorch.fleet.delta import ALL_SITES, ROTATE_OP, Target, key_id
from meshorch.fleet.gossip import HUB_ID

logger = logging.getLogger(__name__)

ALERTS_EVERY_S = 2.0

T = TypeVar("T")
DAY_S = 86400.0
ADMIN_TOKEN_FILE = "admin.token"
STORE_DIR = "hub.lmdb"
DEFAULT_FLEET = "fleet"
ENROLL_PREFIX = "mhe_"
MAX_DELTA_RESPONSE_BYTES = 8 * 1024 * 1024
CALLER = audit.CALLER


@dataclass
class HubConfig:
    """Settings of one hub. ``heartbeat_s`` None means ``delta_ttl_s / 4``; ``fleet`` None
    means the stored name (``"fleet"`` on first start). Gossip (UDP) listens on
    ``gossip_host`` (None: ``host``) and ``gossip_port`` (None: the same number as
    ``port``; 0 picks a free one) and tells sites ``gossip_advertise`` (None: that address;
    an unspecified host makes sites use their hub URL's host). Fleet logs are kept
    ``logs_max_age_s`` and within ``logs_max_bytes`` (None: no limit), checked every
    ``logs_retention_every_s``."""

    data_dir: Path
    host: str = "127.0.0.1"
    port: int = 7900
    fleet: str | None = None
    delta_ttl_s: float = 7 * DAY_S
    heartbeat_s: float | None = None
    wave_timeout_s: float = 600.0
    site_stale_s: float = 30.0
    alert_thresholds: Thresholds = field(default_factory=Thresholds)
    enroll_ttl_s: float = 7 * DAY_S
    rejection_window_s: float = 600.0
    tick_s: float = 0.2
    max_body_bytes: int = 2 * 1024 * 1024
    gossip: bool = True
    gossip_host: str | None = None
    gossip_port: int | None = None
    gossip_advertise: tuple[str, int] | None = None
    gossip_preset: str = "wan"
    gossip_cert_ttl_s: float = 7 * DAY_S
    logs_max_age_s: float | None = 30 * DAY_S
    logs_max_bytes: int | None = None
    logs_retention_every_s: float = 60.0
    clock: Callable[[], float] = field(default=time.time)

    @property
    def gossip_address(self) -> tuple[str, int]:
        host = self.gossip_host if self.gossip_host is not None else self.host
        return host, self.port if self.gossip_port is None else self.gossip_port

    @property
    def heartbeat_interval_s(self) -> float:
        return self.heartbeat_s if self.heartbeat_s is not None else self.delta_ttl_s / 4

    def validate(self) -> None:
        """Raise HubConfigError listing every problem."""
        problems: list[str] = []
        if not self.host:
            problems.append("host: must not be empty")
        if not 0 <= self.port <= 65535:
            problems.append(f"port: {self.port} is not 0-65535")
        if self.fleet is not None and not is_id(self.fleet):
            problems.append(f"fleet: {self.fleet!r} must be 1-63 characters of a-z, 0-9 and '-'")
        positive = {
            "delta_ttl_s": self.delta_ttl_s,
            "heartbeat_s": self.heartbeat_interval_s,
            "wave_timeout_s": self.wave_timeout_s,
            "site_stale_s": self.site_stale_s,
            "enroll_ttl_s": self.enroll_ttl_s,
            "rejection_window_s": self.rejection_window_s,
            "tick_s": self.tick_s,
            "gossip_cert_ttl_s": self.gossip_cert_ttl_s,
            "logs_retention_every_s": self.logs_retention_every_s,
        }
        if self.logs_max_age_s is not None:
            positive["logs_max_age_s"] = self.logs_max_age_s
        if self.logs_max_bytes is not None:
            positive["logs_max_bytes"] = self.logs_max_bytes
        problems += [f"{name}: must be > 0" for name, v in positive.items() if not v > 0]
        if self.heartbeat_interval_s >= self.delta_ttl_s:
            problems.append("heartbeat_s: must be shorter than delta_ttl_s (the tip expires)")
        if self.max_body_bytes < 64 * 1024:
            problems.append("max_body_bytes: at least 65536")
        if self.gossip:
            problems += _gossip_problems(self)
        if problems:
            raise HubConfigError("invalid hub configuration: " + "; ".join(problems))


def _gossip_problems(config: HubConfig) -> list[str]:
    problems = []
    host, port = config.gossip_address
    if not _is_ip(host):
        problems.append(f"gossip: {host!r} is not an IP address (give --gossip IP:PORT)")
    if not 0 <= port <= 65535:
        problems.append(f"gossip: port {port} is not 0-65535")
    if config.gossip_advertise is not None:
        adv_host, adv_port = config.gossip_advertise
        if not _is_ip(adv_host) or not 0 < adv_port <= 65535:
            problems.append(f"gossip_advertise: {config.gossip_advertise!r} is not IP:PORT")
    if config.gossip_preset not in GOSSIP_PRESETS:
        problems.append(f"gossip_preset: one of {', '.join(GOSSIP_PRESETS)}")
    return problems


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class _Txn:
    """The writes of one change, and the delta log's head as they would leave it."""

    def __init__(self, hub: Hub, now: float) -> None:
        self.hub = hub
        self.now = now
        self.head = hub.head
        self.writes: list[Write] = []
        self.after: list[Callable[[], None]] = []
        self.audit_entries: list[dict[str, Any]] = []

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
        try:
            envelope, head = deltalog.build_delta(
                self.head,
                self.hub.fleet,
                ops,
                target,
                self.now,
                self.hub.config.delta_ttl_s,
                keys or self.hub.signing_keys,
            )
        except ValueError as exc:
            raise ApiError(413, "delta_too_large", str(exc)) from None
        self.writes.append(("deltas", version_key(head.version), envelope))
        self.head = head
        self.put("meta", "head", head.to_json())
        return head.version


class Hub:
    """The hub service (see the module docstring)."""

    def __init__(self, config: HubConfig) -> None:
        self.config = config
        self.fleet = ""
        self.head = Head()
        self.signing_keys: list[SigningKey] = []
        self._store: Store | None = None
        self._runner: web.AppRunner | None = None
        self._driver: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()
        self._rotate_lock = asyncio.Lock()
        self._appended = asyncio.Event()
        self._wake = asyncio.Event()
        self._closing = False
        self._pending: set[asyncio.Task[Any]] = set()
        self._reports: dict[str, tuple[dict[str, Any], float]] = {}
        self._active: set[str] = set()  # apps whose current deployment may be running
        self.link_waiters = 0  # long-polls waiting for a delta right now
        self._txn: _Txn | None = None  # the change being planned (under the lock)
        self._audit_seq = 0
        self.url = ""
        self.gossip: HubGossip | None = None
        self.vault = VaultService(self)
        self.logs = HubLogs(self)
        self.alerts = AlertBook()
        self._behind_since: dict[str, float] = {}  # site -> first seen behind the head
        self._alerts_at = 0.0
        self._alerts_lock = asyncio.Lock()
        self._started_at = 0.0
        self._logs_retained_at: float | None = None  # None: not yet since start
        self._retention: asyncio.Future[None] | None = None

    # -- life cycle -------------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE

    @property
    def root_key(self) -> str:
        return key_id(self.signing_keys[0])

    @property
    def store(self) -> Store:
        if self._store is None:
            raise RuntimeError("the hub is not started")
        return self._store

    def now(self) -> float:
        return self.config.clock()

    async def start(self) -> None:
        from central_hub.api import build_app

        self.config.validate()
        await asyncio.to_thread(self._open)
        try:
            self._runner = web.AppRunner(
                build_app(self, self.config.max_body_bytes), access_log=None, shutdown_timeout=2.0
            )
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.config.host, self.config.port)
            await site.start()
            host, port = self._runner.addresses[0][:2]
            self.url = f"http://[{host}]:{port}" if ":" in str(host) else f"http://{host}:{port}"
        except OSError as exc:
            await self._close_runner_and_store()
            raise HubConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc}"
            ) from None
        if self.config.gossip:
            host, port = self.config.gossip_address
            gossip = HubGossip(
                self,
                host=host,
                port=port,
                advertise=self.config.gossip_advertise,
                preset=self.config.gossip_preset,
                cert_ttl_s=self.config.gossip_cert_ttl_s,
            )
            try:
                await gossip.start()
            except OSError as exc:
                await self._close_runner_and_store()
                raise HubConfigError(f"cannot gossip on udp {host}:{port}: {exc}") from None
            self.gossip = gossip
        self._driver = asyncio.create_task(self._drive(), name="hub-rollouts")
        logger.info(
            "hub of fleet %r serving on %s, head %d", self.fleet, self.url, self.head.version
        )

    async def stop(self) -> None:
        self._closing = True
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
            self._driver = None
        self._notify_appended()  # long-polls answer now
        gossip, self.gossip = self.gossip, None
        if gossip is not None:
            await gossip.stop()
        await self._close_runner_and_store()

    async def _close_runner_and_store(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        if self._pending:
            await asyncio.gather(*self._pending, return_exceptions=True)
        if self._store is not None:
            await asyncio.to_thread(self._store.close)
            self._store = None
        await asyncio.to_thread(self.logs.close)

    def _open(self) -> None:
        """Open the data directory, initialising it on first start (runs in a thread)."""
        data_dir = self.data_dir
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
        elif not data_dir.is_dir():
            raise HubConfigError(f"{data_dir} is not a directory")
        self.vault.open()
        self.logs.open()
        store = Store(data_dir / STORE_DIR)
        try:
            fleet = store.get_json("meta", "fleet")
            if fleet is None:
                self._initialise(store)
            else:
                if self.config.fleet is not None and self.config.fleet != fleet:
                    raise HubConfigError(
                        f"{data_dir} holds fleet {fleet!r}, not {self.config.fleet!r}: "
                        f"leave out --fleet or give --fleet {fleet}"
                    )
                root = deltalog.recover_root_key(
                    data_dir,
                    str(store.get_json("meta", "root_key")),
                    int(store.get_json("meta", "rotations") or 0),
                )
                self.fleet = str(fleet)
                self.signing_keys = [root]
                self.head = Head.from_json(store.get_json("meta", "head"))
            self._adopt_tenants(store)
            self._audit_seq = store.last_sequence("audit")
            self._active = set(store.keys("apps"))  # narrowed by the first rollout step
            for record in store.values_json("reports"):
                self._reports[record["report"]["site"]] = (record["report"], record["received_at"])
            self._started_at = self.now()
            self.alerts.restore(
                _stored_alerts(store), hold_until=self._started_at + self.config.site_stale_s
            )
        except BaseException:
            store.close()
            raise
        self._store = store

    def _initialise(self, store: Store) -> None:
        fleet = self.config.fleet or DEFAULT_FLEET
        root = deltalog.load_or_create_root_key(self.data_dir)
        now = self.now()
        text, record = tokens.new_token(
            "admin", tokens.ALL_TENANTS, now, description="bootstrap admin token"
        )
        deltalog.write_secret_file(self.admin_token_path, text + "\n")
        store.commit(
            [
                put_json("meta", "root_key", key_id(root)),
                put_json("meta", "rotations", 0),
                put_json("meta", "head", Head().to_json()),
                put_json("meta", "deployment_seq", 0),
                put_json("meta", "created_at", now),
                put_json("tokens", record.id, record.to_json()),
                put_json("meta", "fleet", fleet),  # last: marks the directory initialised
            ],
            sync=True,
        )
        self.fleet = fleet
        self.signing_keys = [root]
        self.head = Head()
        logger.info("initialised fleet %r in %s", fleet, self.data_dir)

    def _adopt_tenants(self, store: Store) -> None:
        """Tenant records for ``default`` and for every tenant the stored apps and tokens
        name (data kept before tenants were)."""
        named = {DEFAULT_TENANT}
        named |= {str(app.get("tenant", DEFAULT_TENANT)) for app in store.values_json("apps")}
        named |= {str(t["tenant"]) for t in store.values_json("tokens")}
        missing = sorted(named - set(store.keys("tenants")) - {tokens.ALL_TENANTS})
        now = self.now()
        if missing:
            writes = [put_json("tenants", t, tenancy.new_tenant(t, "", now)) for t in missing]
            store.commit(writes, sync=True)

    # -- changes --------------------------------------------------------------------------

    async def _transact(self, plan: Callable[[_Txn], T]) -> T:
        """Run ``plan`` under the lock and commit its writes durably (see module doc)."""

        async def run() -> T:
            async with self._lock:
                if self._store is None:
                    raise ApiError(503, "stopping", "the hub is stopping")
                txn = _Txn(self, self.now())
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
                    await asyncio.to_thread(self.store.commit, txn.writes, sync=True)
                    self._audit_seq = seq
                    appended = txn.head != self.head
                    self.head = txn.head
                    for action in txn.after:
                        action()
                    if appended:
                        self._notify_appended()
                return result

        task = asyncio.ensure_future(run())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        return await asyncio.shield(task)

    def _activate(self, app: str) -> None:
        self._active.add(app)
        self._wake.set()

    def _notify_appended(self) -> None:
        appended, self._appended = self._appended, asyncio.Event()
        appended.set()
        if self.gossip is not None:
            self.gossip.publish_head()

    # -- the audit log ----------------------------------------------------------------

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

        def plan(txn: _Txn) -> None:
            txn.audit(token, action, tenant, object_type, object_id, outcome, detail)

        future = asyncio.ensure_future(self._transact(plan))
        future.add_done_callback(_log_audit_failure)
        return future

    def read_audit(
        self, token: TokenRecord, after: int, limit: int, tenant: str | None
    ) -> dict[str, Any]:
        """``GET /v1/audit``: entries after ``after`` that the token's tenant may read."""
        found = audit.select(self.store.sequence_after("audit", after), token.tenant, tenant, limit)
        return {"entries": found, "last": self._audit_seq}

    # -- tenants ------------------------------------------------------------------------

    def _tenant(self, token: TokenRecord, tenant_id: str, action: str) -> dict[str, Any]:
        what = f"tenant {tenant_id!r}"
        record = self.store.get_json("tenants", tenant_id) if is_id(tenant_id) else None
        tokens.authorize(token, action, tenant_id if record is None else record["id"], what=what)
        if record is None:
            raise ApiError(404, "not_found", f"no {what}")
        return dict(record)

    def require_tenant(self, tenant: str) -> None:
        """400 ``unknown_tenant`` unless ``tenant`` exists (objects of unknown tenants
        cannot be created)."""
        if not is_id(tenant) or self.store.get_json("tenants", tenant) is None:
            raise unknown_tenant(tenant)

    async def create_tenant(
        self, token: TokenRecord, tenant_id: str, description: str
    ) -> dict[str, Any]:
        tokens.authorize(token, "tenants.create")

        def plan(txn: _Txn) -> dict[str, Any]:
            if self.store.get_json("tenants", tenant_id) is not None:
                raise ApiError(409, "tenant_exists", f"tenant {tenant_id!r} exists")
            record = tenancy.new_tenant(tenant_id, description, txn.now)
            txn.put("tenants", tenant_id, record)
            txn.changed("tenant", tenant_id, tenant_id)
            return record

        return await self._transact(plan)

    def list_tenants(self, token: TokenRecord) -> list[dict[str, Any]]:
        return [t for t in self.store.values_json("tenants") if tokens.reaches(token, t["id"])]

    def get_tenant(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        return self._tenant(token, tenant_id, "tenants.read")

    async def delete_tenant(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        def plan(txn: _Txn) -> dict[str, Any]:
            record = self._tenant(token, tenant_id, "tenants.delete")
            if tenant_id == DEFAULT_TENANT:
                raise ApiError(409, "default_tenant", "the tenant 'default' always exists")
            for db in tenancy.OWNED_DBS:
                if db in store.DBS and any(
                    r.get("tenant") == tenant_id for r in self.store.values_json(db)
                ):
                    raise ApiError(
                        409, "tenant_in_use", f"tenant {tenant_id!r} still owns {db}: delete them"
                    )
            held = self.store.values_json("tokens")
            revoked = [t["id"] for t in held if t["tenant"] == tenant_id]
            for token_id in revoked:
                txn.delete("tokens", token_id)
            if record.get("quota") is not None:
                txn.delta([tenancy.quota_op(tenant_id, None)], ALL_SITES)
            txn.delete("tenants", tenant_id)
            txn.changed("tenant", tenant_id, tenant_id, f"revoked {len(revoked)} token(s)")
            return {"deleted": tenant_id, "revoked_tokens": revoked}

        return await self._transact(plan)

    async def set_quota(
        self, token: TokenRecord, tenant_id: str, quota: dict[str, int | None] | None
    ) -> dict[str, Any]:
        def plan(txn: _Txn) -> dict[str, Any]:
            record = self._tenant(token, tenant_id, "tenants.quota")
            record["quota"] = quota
            txn.put("tenants", tenant_id, record)
            version = txn.delta([tenancy.quota_op(tenant_id, quota)], ALL_SITES)
            txn.changed("quota", tenant_id, tenant_id, f"quota {quota}")
            return {"tenant": tenant_id, "quota": quota, "delta": version}

        return await self._transact(plan)

    def get_quota(self, token: TokenRecord, tenant_id: str) -> dict[str, Any]:
        record = self._tenant(token, tenant_id, "tenants.read")
        return {"tenant": tenant_id, "quota": record.get("quota")}

    # -- tokens -----------------------------------------------------------------------

    def authenticate(self, header: str | None) -> TokenRecord:
        token_id, secret = tokens.split_token(tokens.bearer(header))
        raw = self.store.get_json("tokens", token_id) if _plain_key(token_id) else None
        record = None if raw is None else TokenRecord.from_json(raw)
        return tokens.check_token(record, secret, self.now())

    async def create_token(
        self, caller: TokenRecord, request: tokens.TokenRequest
    ) -> tuple[str, TokenRecord]:
        tokens.authorize(caller, "tokens.create", request.tenant, what="such tenant")

        def plan(txn: _Txn) -> tuple[str, TokenRecord]:
            if request.tenant != tokens.ALL_TENANTS:
                self.require_tenant(request.tenant)
            expires = None if request.expires_in_s is None else txn.now + request.expires_in_s
            text, record = tokens.new_token(
                request.role,
                request.tenant,
                txn.now,
                expires_at=expires,
                description=request.description,
            )
            txn.put("tokens", record.id, record.to_json())
            txn.changed("token", record.id, record.tenant, f"role {record.role}")
            return text, record

        return await self._transact(plan)

    def list_tokens(self, caller: TokenRecord, tenant: str | None = None) -> list[TokenRecord]:
        found = [TokenRecord.from_json(r) for r in self.store.values_json("tokens")]
        return [
            t
            for t in found
            if tokens.reaches(caller, t.tenant) and (tenant is None or t.tenant == tenant)
        ]

    async def delete_token(self, caller: TokenRecord, token_id: str) -> None:
        def plan(txn: _Txn) -> None:
            raw = self.store.get_json("tokens", token_id) if _plain_key(token_id) else None
            tenant = None if raw is None else str(raw["tenant"])
            tokens.authorize(caller, "tokens.delete", tenant, what=f"token {token_id!r}")
            if raw is None:
                raise ApiError(404, "not_found", f"no token {token_id!r}")
            txn.delete("tokens", token_id)
            txn.changed("token", token_id, tenant, "revoked")

        await self._transact(plan)

    # -- sites ------------------------------------------------------------------------

    def _site_or_none(self, site_id: str) -> dict[str, Any] | None:
        return self.store.get_json("sites", site_id) if is_id(site_id) else None

    def _site(self, site_id: str) -> dict[str, Any]:
        record = self._site_or_none(site_id)
        if record is None:
            raise ApiError(404, "not_found", f"no site {site_id!r}")
        return dict(record)

    def site_public_key(self, site_id: str) -> str | None:
        record = self._site_or_none(site_id)
        return None if record is None else record.get("public_key")

    async def register_site(
        self, site_id: str, labels: Mapping[str, str], public_key: str | None
    ) -> dict[str, Any]:
        def plan(txn: _Txn) -> dict[str, Any]:
            if self.store.get_json("sites", site_id) is not None:
                raise ApiError(409, "site_exists", f"site {site_id!r} is registered")
            record: dict[str, Any] = {
                "id": site_id,
                "labels": dict(labels),
                "public_key": public_key,
                "enroll_hash": None,
                "enroll_expires_at": None,
                "created_at": txn.now,
            }
            answer: dict[str, Any] = {"id": site_id, "labels": dict(labels)}
            if public_key is None:
                secret = os.urandom(24).hex()
                record["enroll_hash"] = tokens.hash_secret(secret)
                record["enroll_expires_at"] = txn.now + self.config.enroll_ttl_s
                answer["enroll_token"] = ENROLL_PREFIX + secret
                answer["enroll_expires_at"] = record["enroll_expires_at"]
            answer["public_key"] = public_key
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None)
            return answer

        return await self._transact(plan)

    async def set_site_labels(self, site_id: str, labels: Mapping[str, str]) -> dict[str, Any]:
        def plan(txn: _Txn) -> dict[str, Any]:
            record = self._site(site_id)
            record["labels"] = dict(labels)
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "labels")
            return {"id": site_id, "labels": dict(labels)}

        return await self._transact(plan)

    async def delete_site(self, site_id: str) -> None:
        def plan(txn: _Txn) -> None:
            self._site(site_id)
            txn.delete("sites", site_id)
            txn.changed("site", site_id, None, "deleted")
            if self.store.get_json("reports", site_id) is not None:
                txn.delete("reports", site_id)
            for app in self.store.values_json("apps"):
                dep = self._deployment_or_none(app["deployment"])
                if dep is not None and site_id in dep.progress:
                    dep, issue = waves.drop_site(dep, site_id, txn.now)
                    dep = self._issue_wave(txn, app, dep, issue)
                    txn.put("deployments", dep.id, dep.to_json())
                if site_id in app["sites"]:
                    app["sites"] = [s for s in app["sites"] if s != site_id]
                    txn.put("apps", app["name"], app)

            def forget_report() -> None:
                self._reports.pop(site_id, None)
                if self.gossip is not None:
                    self.gossip.forget(site_id)

            txn.after.append(forget_report)

        await self._transact(plan)

    async def enroll(self, site_id: str, public_key: str, token: str) -> None:
        def plan(txn: _Txn) -> None:
            record = self._site_or_none(site_id)
            expected = None if record is None else record.get("enroll_hash")
            secret = token[len(ENROLL_PREFIX) :] if token.startswith(ENROLL_PREFIX) else ""
            matches = hmac.compare_digest(
                tokens.hash_secret(secret).encode(), str(expected or "-" * 64).encode()
            )
            if record is None or expected is None or not matches or not secret:
                raise ApiError(403, "bad_enroll_token", "unknown, used or wrong enrollment token")
            if txn.now >= float(record["enroll_expires_at"]):
                raise ApiError(403, "bad_enroll_token", "the enrollment token has expired")
            record.update(public_key=public_key, enroll_hash=None, enroll_expires_at=None)
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "enrolled")

        await self._transact(plan)

    # -- reports and the fleet view -----------------------------------------------------

    async def decommission_site(self, token: TokenRecord, site_id: str) -> dict[str, Any]:
        """Send ``site.decommission``: the site stops its work and wipes its secrets, then
        says so in a report, and the hub forgets it (``record_report``)."""
        tokens.authorize(token, "sites.delete")

        def plan(txn: _Txn) -> dict[str, Any]:
            record = self._site(site_id)
            version = txn.delta([{"op": "site.decommission"}], Target(sites=frozenset({site_id})))
            record["decommission"] = {"delta": version, "requested_at": txn.now}
            txn.put("sites", site_id, record)
            txn.changed("site", site_id, None, "decommissioning")
            return {"site": site_id, "delta": version, "state": "requested"}

        return await self._transact(plan)

    async def record_report(self, site_id: str, report: dict[str, Any]) -> int:
        ending = report.get("decommission")
        record = self._site_or_none(site_id)
        if ending and ending["state"] == "done" and record and record.get("decommission"):
            logger.warning("site %s is decommissioned: forgetting it", site_id)
            await self.delete_site(site_id)
            return self.head.version
        now = self.now()
        previous = self._reports.get(site_id)
        if previous is not None and fleetview.is_stale_report(report, *previous, now):
            logger.info("site %s: a report overtaken by a newer one, ignored", site_id)
            return self.head.version
        self._reports[site_id] = (report, now)
        self._wake.set()

        def persist() -> None:
            store, latest = self._store, self._reports.get(site_id)
            if store is not None and latest is not None:
                record = {"report": latest[0], "received_at": latest[1]}
                store.commit([put_json("reports", site_id, record)], sync=False)

        task = asyncio.ensure_future(asyncio.to_thread(persist))
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        await asyncio.shield(task)
        return self.head.version

    def _view_args(self, site_id: str) -> tuple[dict[str, Any] | None, float | None]:
        return self._reports.get(site_id, (None, None))

    def _gossip_of(self, site_id: str) -> tuple[dict[str, Any], float] | None:
        return None if self.gossip is None else self.gossip.summary_of(site_id)

    def list_sites(self, token: TokenRecord | None = None) -> list[dict[str, Any]]:
        """Every site's summary; a tenant token's ``counts`` cover its tenant's apps only
        (None: the hub's own, fleet-wide view)."""
        now, c = self.now(), self.config
        visible = None if token is None else self._visible_apps(token)
        return [
            fleetview.site_summary(
                site,
                *self._view_args(site["id"]),
                now,
                c.site_stale_s,
                c.rejection_window_s,
                gossip=self._gossip_of(site["id"]),
                visible_apps=visible,
            )
            for site in self.store.values_json("sites")
        ]

    def _visible_apps(self, token: TokenRecord) -> set[str] | None:
        """The applications a tenant token sees at sites (None: a fleet token, all)."""
        if tokens.is_fleet(token):
            return None
        return {
            app["name"]
            for app in self.store.values_json("apps")
            if tokens.reaches(token, app.get("tenant", DEFAULT_TENANT))
        }

    def get_site(self, token: TokenRecord, site_id: str) -> dict[str, Any]:
        """One site. A tenant token sees the site's health, and of its hosts' instances and
        apps only those of its tenant's applications (no gossip summary, no rejections)."""
        mine = self._visible_apps(token)
        detail = self._site_detail(site_id, mine)
        if mine is None:
            return detail
        detail["apps"] = {k: v for k, v in detail["apps"].items() if k in mine}
        for host in detail["hosts"]:
            host["instances"] = [i for i in host["instances"] if i["app"] in mine]
        detail.update(gossip=None, rejections=[])
        return detail

    def _site_detail(self, site_id: str, visible: set[str] | None) -> dict[str, Any]:
        c = self.config
        detail = fleetview.site_detail(
            self._site(site_id),
            *self._view_args(site_id),
            self.now(),
            c.site_stale_s,
            c.rejection_window_s,
            gossip=self._gossip_of(site_id),
            visible_apps=visible,
        )
        if self.gossip is not None:
            detail["gossip_member"] = self.gossip.member_state(site_id)
        detail["secrets"] = self.vault.site_view(site_id)
        return detail

    def gossip_info(self, site_id: str) -> dict[str, Any]:
        """``GET /v1/link/gossip`` for an authenticated site."""
        if self.gossip is None:
            raise ApiError(404, "gossip_disabled", "this hub does not gossip")
        if site_id == HUB_ID:
            raise ApiError(409, "reserved_id", f"{HUB_ID!r} is the hub's gossip id")
        key = self.site_public_key(site_id)
        if key is None:  # deleted since the request was verified
            raise ApiError(404, "not_found", f"no site {site_id!r}")
        return self.gossip.certificate_for(site_id, key)

    # -- apps and deployments -------------------------------------------------------------

    def _deployment_or_none(self, deployment_id: str | None) -> waves.Deployment | None:
        if deployment_id is None:
            return None
        raw = self.store.get_json("deployments", deployment_id)
        return None if raw is None else waves.Deployment.from_json(raw)

    def _app(self, token: TokenRecord, name: str, action: str = "apps.read") -> dict[str, Any]:
        app = self.store.get_json("apps", name) if is_id(name) else None
        what = f"application {name!r}"
        if app is None:
            raise ApiError(404, "not_found", f"no {what}")
        app.setdefault("tenant", DEFAULT_TENANT)
        tokens.authorize(token, action, app["tenant"], what=what)
        return dict(app)

    def _issue_wave(
        self, txn: _Txn, app: dict[str, Any], dep: waves.Deployment, sites: Sequence[str]
    ) -> waves.Deployment:
        """Append the app.put delta of a wave; records which sites now have the app."""
        if not sites:
            return dep
        op = {"op": "app.put", "spec": app["spec"], "tenant": app.get("tenant", DEFAULT_TENANT)}
        version = txn.delta([op], Target(sites=frozenset(sites)))
        app["sites"] = sorted(set(app["sites"]) | set(sites))
        txn.put("apps", app["name"], app)
        return replace(dep, deltas=(*dep.deltas, version))

    async def deploy(
        self,
        token: TokenRecord,
        spec: AppSpec,
        digest: str,
        policy: placement.Policy,
        tenant: str | None,
    ) -> tuple[int, dict[str, Any]]:
        """Start a deployment; (202, deployment), or (200, the same one) when repeated."""
        if tenant is None:
            tenant = DEFAULT_TENANT if tokens.is_fleet(token) else token.tenant
        elif not tokens.reaches(token, tenant):
            raise tokens.field_not_allowed(
                ["tenant"], f"a token of tenant {token.tenant!r} deploys to that tenant only"
            )
        tokens.authorize(token, "apps.write", tenant)

        def plan(txn: _Txn) -> tuple[int, dict[str, Any]]:
            self.require_tenant(tenant)
            app = self.store.get_json("apps", spec.name)
            if app is not None:
                if app.get("tenant", DEFAULT_TENANT) != tenant:
                    raise ApiError(
                        409, "app_exists", f"application {spec.name!r} belongs to another tenant"
                    )
                known = app["versions"].get(spec.version)
                if known is not None and known != digest:
                    raise ApiError(
                        409,
                        "version_exists",
                        f"version {spec.version!r} of {spec.name!r} was deployed with another "
                        "spec: give the changed spec a new version",
                    )
            current = None if app is None else self._deployment_or_none(app["deployment"])
            if (
                current is not None
                and current.digest == digest
                and dict(current.placement) == policy.to_json()
                and current.state in ("running", "succeeded")
            ):
                return 200, current.to_json()
            sites = {s["id"]: s["labels"] for s in self.store.values_json("sites")}
            targets = placement.select(policy, sites)
            seq = int(self.store.get_json("meta", "deployment_seq") or 0) + 1
            dep_id = f"dep-{seq}"
            dep, first = waves.start(
                dep_id,
                spec.name,
                spec.version,
                digest,
                tenant,
                policy.to_json(),
                placement.plan_waves(targets, policy.max_parallel),
                txn.now,
            )
            if current is not None and current.state == "running":
                old = waves.supersede(current, f"superseded by {dep_id}", txn.now)
                txn.put("deployments", old.id, old.to_json())
            had = set() if app is None else set(app["sites"])
            removed = sorted(had - set(targets))
            record = {
                "name": spec.name,
                "tenant": tenant,
                "version": spec.version,
                "digest": digest,
                "spec": to_json(spec),
                "placement": policy.to_json(),
                "deployment": dep_id,
                "sites": sorted(had - set(removed)),
                "versions": {**({} if app is None else app["versions"]), spec.version: digest},
                "created_at": txn.now if app is None else app["created_at"],
                "updated_at": txn.now,
            }
            txn.put("apps", spec.name, record)
            dep = self._issue_wave(txn, record, dep, first)
            if removed:
                version = txn.delta(
                    [{"op": "app.delete", "name": spec.name}], Target(sites=frozenset(removed))
                )
                dep = replace(dep, deltas=(*dep.deltas, version))
            txn.put("deployments", dep_id, dep.to_json())
            txn.put("meta", "deployment_seq", seq)
            txn.changed("app", spec.name, tenant, f"deployment {dep_id} of {spec.version}")
            txn.after.append(lambda: self._activate(spec.name))
            return 202, dep.to_json()

        return await self._transact(plan)

    def list_apps(self, token: TokenRecord, tenant: str | None = None) -> list[dict[str, Any]]:
        found = []
        for app in self.store.values_json("apps"):
            app.setdefault("tenant", DEFAULT_TENANT)
            if not tokens.reaches(token, app["tenant"]) or tenant not in (None, app["tenant"]):
                continue
            dep = self._deployment_or_none(app["deployment"])
            found.append(
                {
                    "name": app["name"],
                    "tenant": app["tenant"],
                    "version": app["version"],
                    "digest": app["digest"],
                    "deployment": None if dep is None else {"id": dep.id, "state": dep.state},
                    "sites": app["sites"],
                }
            )
        return found

    def get_app(self, token: TokenRecord, name: str) -> dict[str, Any]:
        app = self._app(token, name)
        dep = self._deployment_or_none(app["deployment"])
        sites = sorted(set(app["sites"]) | set(() if dep is None else dep.sites))
        status = {}
        for site in sites:
            found = fleetview.app_status(self._view_args(site)[0], name)
            status[site] = (
                None
                if found is None
                else {"version": found.version, "state": found.state, "message": found.message}
            )
        return {
            "name": app["name"],
            "tenant": app["tenant"],
            "version": app["version"],
            "digest": app["digest"],
            "spec": app["spec"],
            "placement": app["placement"],
            "deployment": None if dep is None else dep.to_json(),
            "sites": status,
        }

    async def delete_app(self, token: TokenRecord, name: str) -> dict[str, Any]:
        def plan(txn: _Txn) -> dict[str, Any]:
            app = self._app(token, name, "apps.delete")
            dep = self._deployment_or_none(app["deployment"])
            if dep is not None and dep.state == "running":
                old = waves.supersede(dep, "application deleted", txn.now)
                txn.put("deployments", old.id, old.to_json())
            version = None
            if app["sites"]:
                op = {"op": "app.delete", "name": name, "tenant": app["tenant"]}
                version = txn.delta([op], Target(sites=frozenset(app["sites"])))
            txn.delete("apps", name)
            txn.changed("app", name, app["tenant"], "deleted")
            return {"deleted": name, "delta": version, "sites": app["sites"]}

        return await self._transact(plan)

    def get_deployment(self, token: TokenRecord, deployment_id: str) -> dict[str, Any]:
        dep = self._deployment_or_none(deployment_id) if _plain_key(deployment_id) else None
        what = f"deployment {deployment_id!r}"
        if dep is None:
            raise ApiError(404, "not_found", f"no {what}")
        tokens.authorize(token, "apps.read", dep.tenant, what=what)
        return dep.to_json()

    # -- the rollout driver and heartbeats ------------------------------------------------

    async def _drive(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if self.gossip is not None:
                try:
                    self.gossip.maintain()
                except Exception:
                    logger.exception("gossip certificate renewal failed")
            try:
                if self._active or self._heartbeat_due(self.head, self.now()):
                    await self._transact(self._advance)
            except Exception:
                logger.exception("rollout step failed; retrying on the next tick")
            try:
                if self.vault.needs_distribution():
                    await self._transact(self.vault.distribute)
            except Exception:
                logger.exception("secret distribution failed; retrying on the next tick")
            if self.now() - self._alerts_at >= ALERTS_EVERY_S:
                try:
                    self.refresh_alerts()
                except Exception:
                    logger.exception("alert evaluation failed; retrying on the next tick")
            self._start_log_retention()

    # -- fleet logs retention -------------------------------------------------------------

    def _start_log_retention(self) -> None:
        """Every ``logs_retention_every_s``, drop old fleet logs in a worker thread; the
        rollout driver does not wait for it (dropping a large backlog takes a while)."""
        now = self.now()
        due = (
            self._logs_retained_at is None
            or now - self._logs_retained_at >= self.config.logs_retention_every_s
        )
        if not due or (self._retention is not None and not self._retention.done()):
            return
        self._logs_retained_at = now

        async def run() -> None:
            try:
                await asyncio.to_thread(self.logs.apply_retention, now)
            except Exception:
                logger.exception("log retention failed; retrying at its next time")

        task = asyncio.ensure_future(run())
        self._retention = task
        self._pending.add(task)  # awaited before the log store closes
        task.add_done_callback(self._pending.discard)

    # -- alerts -------------------------------------------------------------------------

    def refresh_alerts(self) -> None:
        """Fire and clear alerts from the fleet view as it is now (central_hub.alerts)."""
        now = self.now()
        self._alerts_at = now
        summaries = self.list_sites()
        head = self.head.version
        for summary in summaries:
            site = summary["id"]
            if (summary.get("applied_version") or 0) < head:
                self._behind_since.setdefault(site, now)
            else:
                self._behind_since.pop(site, None)
        reports = {site: report for site, (report, _) in self._reports.items()}
        tenants = {
            app["name"]: app.get("tenant", "default") for app in self.store.values_json("apps")
        }
        found = alerts.conditions(
            summaries, reports, tenants, head, self._behind_since, now, self.config.alert_thresholds
        )
        heard = {s["id"] for s in summaries if (s["last_seen"] or 0) >= self._started_at}
        changes = self.alerts.update(found, now, heard)
        writes = [put_json("alerts", record_key(a.id), a.to_record()) for a in changes.fired]
        writes += [delete("alerts", record_key(a.id)) for a in changes.cleared]
        if writes:
            self._keep_alerts(writes)

    def _keep_alerts(self, writes: list[Write]) -> None:
        """Commit fired and cleared alerts in a worker thread, in order (no flush: the
        conditions are evaluated again after a crash)."""

        async def write() -> None:
            async with self._alerts_lock:
                store = self._store
                if store is not None:
                    await asyncio.to_thread(store.commit, writes, sync=False)

        task = asyncio.ensure_future(write())
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)
        task.add_done_callback(_log_alert_write_failure)

    def list_alerts(self, token: TokenRecord) -> list[dict[str, Any]]:
        tokens.authorize(token, "alerts.read")
        self.refresh_alerts()
        return [
            a.to_json()
            for a in self.alerts.listing()
            if tokens.is_fleet(token) or (a.tenant is not None and tokens.reaches(token, a.tenant))
        ]

    async def acknowledge_alert(self, token: TokenRecord, alert_id: str) -> dict[str, Any]:
        tokens.authorize(token, "alerts.ack")

        def plan(txn: _Txn) -> Alert:
            alert = self.alerts.acknowledge(alert_id, token.id, txn.now)
            if alert is None:
                raise ApiError(404, "not_found", f"no active alert {alert_id!r}")
            txn.put("alerts", record_key(alert_id), alert.to_record())
            txn.audit(token, "alert.ack", alert.tenant, "alert", alert_id, "ok")
            return alert

        async with self._alerts_lock:  # after the alert's firing is written
            alert = await self._transact(plan)
        return alert.to_json()

    def _advance(self, txn: _Txn) -> None:
        """Step every running deployment; append a heartbeat when the tip gets old."""
        for name in sorted(self._active):
            app = self.store.get_json("apps", name)
            dep = None if app is None else self._deployment_or_none(app["deployment"])
            if app is None or dep is None or dep.state != "running":
                self._active.discard(name)
                continue
            statuses = {
                site: fleetview.app_status(self._view_args(site)[0], dep.app)
                for site in dep.waves[dep.wave]
            }
            stepped, issue = waves.step(dep, statuses, txn.now, self.config.wave_timeout_s)
            if stepped == dep:
                continue
            stepped = self._issue_wave(txn, app, stepped, issue)
            txn.put("deployments", stepped.id, stepped.to_json())
            if stepped.state != "running":
                logger.info(
                    "deployment %s of %s: %s %s", dep.id, dep.app, stepped.state, stepped.reason
                )
        if self._heartbeat_due(txn.head, txn.now):
            txn.delta([], ALL_SITES)

    def _heartbeat_due(self, head: Head, now: float) -> bool:
        return head.version > 0 and now - head.issued_at >= self.config.heartbeat_interval_s

    # -- the delta log ----------------------------------------------------------------

    def fleet_info(self) -> dict[str, Any]:
        return {
            "fleet": self.fleet,
            "root_key": self.root_key,
            "head": self.head.version,
            "head_hash": self.head.hash,
        }

    def deltas_after(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        return self.store.deltas_after(after, limit, MAX_DELTA_RESPONSE_BYTES)

    async def wait_for_deltas(
        self, after: int, wait_s: float, limit: int
    ) -> tuple[int, list[bytes]]:
        """Deltas after ``after``; when there is none, wait up to ``wait_s`` for one."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while self.head.version <= after and not self._closing:
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            appended = self._appended
            self.link_waiters += 1
            try:
                async with asyncio.timeout(remaining):
                    await appended.wait()
            except TimeoutError:
                break
            finally:
                self.link_waiters -= 1
        head = self.head.version
        if self._store is None:
            return head, []
        return head, [envelope for _, envelope in self.deltas_after(after, limit)]

    async def rotate_root(self) -> dict[str, Any]:
        """Append a root.rotate delta signed by the old and new keys; sign with the new."""
        async with self._rotate_lock:
            new = await asyncio.to_thread(deltalog.write_new_key, self.data_dir)

            def plan(txn: _Txn) -> dict[str, Any]:
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
                return await self._transact(plan)
            except BaseException:
                if self._store is None or self.store.get_json("meta", "root_key") != key_id(new):
                    (self.data_dir / deltalog.NEW_KEY_FILE).unlink(missing_ok=True)
                raise


def _stored_alerts(store: Store) -> list[Alert]:
    """The active alerts kept by the last run; a record that does not parse is skipped."""
    found = []
    for key, raw in store.items("alerts"):
        try:
            found.append(Alert.from_record(key, orjson.loads(raw)))
        except (BadStoredRecord, orjson.JSONDecodeError) as exc:
            logger.warning("stored alert %r skipped: %s", key[:200], exc)
    return found


def _log_alert_write_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("alerts were not written to the store: %s", future.exception())


def _log_audit_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("an audit entry was not written: %s", future.exception())


def _plain_key(text: str) -> bool:
    """Whether ``text`` can be a stored id (short ASCII letters, digits and '-')."""
    return 0 < len(text) <= 128 and text.isascii() and text.replace("-", "").isalnum()
