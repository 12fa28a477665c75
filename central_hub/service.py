"""The hub service: its life cycle, and the wiring of its parts.

``Hub`` is an async context manager: entering opens (or initialises) the data directory,
starts the HTTP API, the gossip member and the driver; leaving stops them and closes the
store::

    async with Hub(HubConfig(data_dir=Path("/var/lib/meshorch-hub"), port=0)) as hub:
        print(hub.url, hub.root_key)

The state and its rules live in the parts (``central_hub.parts``), each around the one
ledger (``central_hub.ledger``: every change is one durable LMDB transaction, and a delta
is visible only once committed): tenants and tokens (``accounts``), sites and their
reports (``sites``, ``reports``), applications and deployments (``deployments``), secrets
(``vault_service``), fleet logs (``logs``), alerts (``alerting``). The HTTP routes
(``central_hub.api``) are given the parts; the properties of ``Hub`` are for its
callers (the CLI, tests).

Ordering rules:

- The data directory's lock (``meshorch.dirlock``) comes first, before the store or any
  file in it is opened, and goes last: a second hub on the directory refuses to start.
- The gossip member starts after the HTTP API and stops before it; it publishes the head
  after every append.
- The driver wakes every ``tick_s`` (sooner on a report or a new deployment): it renews the
  gossip certificate, steps the running deployments and appends a heartbeat when the tip
  gets old (one transaction), distributes secrets waiting for a site, evaluates the
  alerts every ``ALERTS_EVERY_S``, starts the fleet logs' retention when it is due,
  prunes the audit log (``central_hub.audit_retention``) and
  compacts the delta log every ``compact_every_s`` (``central_hub.snapshots``).
- The collector's policy (``central_hub.gcpolicy``) is held once the hub serves, its
  state loaded, and released after it stops.
- On stop, long-polls answer at once; the failed authentications counted since the last
  sample are audited (``central_hub.authguard``); the store closes after every pending
  write.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from pathlib import Path

from aiohttp import web
from nacl.signing import SigningKey

from central_hub import deltalog, gcpolicy, keyfiles, tokens
from central_hub.accounts import Accounts, adopt_tenants
from central_hub.alerting import Alerting
from central_hub.alerts import AlertBook
from central_hub.api import build_app
from central_hub.audit_retention import AuditRetention
from central_hub.config import DAY_S as DAY_S
from central_hub.config import LISTEN_BACKLOG
from central_hub.config import HubConfig as HubConfig
from central_hub.deltalog import Head
from central_hub.deployments import Deployments
from central_hub.errors import HubConfigError
from central_hub.front import forwarded_client
from central_hub.gossip import HubGossip
from central_hub.ledger import Ledger, Txn
from central_hub.logs import HubLogs
from central_hub.parts import HubParts
from central_hub.replay import NonceCache
from central_hub.sites import Sites
from central_hub.store import Store, put_json
from central_hub.tls import HubTLS
from central_hub.tls import load as load_tls
from central_hub.vault_service import VaultService
from meshorch.dirlock import DataDirLock, hold
from meshorch.errors import ConfigurationError
from meshorch.fleet.delta import ALL_SITES, key_id

logger = logging.getLogger(__name__)

ADMIN_TOKEN_FILE = "admin.token"
STORE_DIR = "hub.lmdb"
DEFAULT_FLEET = "fleet"


class Hub:
    """The hub service (see the module docstring)."""

    def __init__(
        self,
        config: HubConfig,
        *,
        store_factory: Callable[[Path], Store] = Store,
        forwarding_key: bytes | None = None,
        nonces: NonceCache | None = None,
    ) -> None:
        """``store_factory`` opens the store (a replica's is replicated); with
        ``forwarding_key`` the client address a replica's front forwards is trusted
        (``central_hub.front``)."""
        self.config = config
        self._store_factory = store_factory
        self._forwarding_key = forwarding_key
        self._nonces = nonces
        self.url = ""
        self._wake = asyncio.Event()
        self.parts = HubParts(config, wake=self._wake.set)
        self.audit_retention = AuditRetention(
            self.parts.ledger, config.audit_max_entries, config.audit_max_age_s
        )
        failures = self.parts.accounts.failures
        failures.burst, failures.rate = config.auth_failure_burst, config.auth_failure_rate_per_s
        self._runner: web.AppRunner | None = None
        self._driver: asyncio.Task[None] | None = None
        self._data_dir_lock: DataDirLock | None = None
        self.tls: HubTLS | None = None  # None: plain HTTP (``insecure_http``)
        self._gc_held = False

    # -- the parts, and what callers read -------------------------------------------------

    @property
    def ledger(self) -> Ledger:
        return self.parts.ledger

    @property
    def accounts(self) -> Accounts:
        return self.parts.accounts

    @property
    def sites(self) -> Sites:
        return self.parts.sites

    @property
    def deployments(self) -> Deployments:
        return self.parts.deployments

    @property
    def vault(self) -> VaultService:
        return self.parts.vault

    @property
    def logs(self) -> HubLogs:
        return self.parts.logs

    @property
    def alerting(self) -> Alerting:
        return self.parts.alerting

    @property
    def alerts(self) -> AlertBook:
        return self.parts.alerting.book

    @property
    def gossip(self) -> HubGossip | None:
        return self.parts.gossip

    @property
    def fleet(self) -> str:
        return self.ledger.fleet

    @property
    def head(self) -> Head:
        return self.ledger.head

    @property
    def root_key(self) -> str:
        return self.ledger.root_key

    @property
    def store(self) -> Store:
        return self.ledger.store

    @property
    def link_waiters(self) -> int:
        return self.ledger.link_waiters

    @property
    def data_dir(self) -> Path:
        return self.config.data_dir

    @property
    def tls_fingerprint(self) -> str | None:
        """The SHA-256 fingerprint of the certificate served (hex), None over HTTP."""
        return None if self.tls is None else self.tls.fingerprint

    @property
    def app(self) -> web.Application:
        """The HTTP application (a replica's front hands it requests in-process)."""
        if self._runner is None:
            raise RuntimeError("the hub is not started")
        return self._runner.app

    @property
    def admin_token_path(self) -> Path:
        return self.data_dir / ADMIN_TOKEN_FILE

    def now(self) -> float:
        return self.config.clock()

    def deltas_after(self, after: int, limit: int) -> list[tuple[int, bytes]]:
        return self.ledger.deltas_after(after, limit)

    # -- life cycle -----------------------------------------------------------------------

    async def __aenter__(self) -> Hub:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()

    async def start(self) -> None:
        self.config.validate()
        try:
            # Before anything in the data dir is opened: another hub may be serving it.
            self._data_dir_lock = hold(self.data_dir, "meshorch hub")
        except ConfigurationError as exc:
            raise HubConfigError(str(exc)) from None
        try:
            await asyncio.to_thread(self._open)
        except BaseException:
            self._release_data_dir()
            raise
        try:
            # O(sites) indexes a first deployment would otherwise build in its request; in
            # a thread, as nothing uses the parts before the app below serves them.
            await asyncio.to_thread(self._warm)
        except BaseException:
            await self._close_runner_and_store()
            raise
        if not self.config.insecure_http:
            try:
                config = self.config
                self.tls = await asyncio.to_thread(
                    load_tls,
                    self.data_dir,
                    config.tls_cert,
                    config.tls_key,
                    config.host,
                    config.kek,
                )
            except BaseException:
                await self._close_runner_and_store()
                raise
        try:
            app = build_app(
                self.parts,
                self.config.max_body_bytes,
                legacy_signatures=self.config.legacy_link_signatures,
                nonces=self._nonces,
            )
            if self._forwarding_key is not None:
                app.middlewares.insert(0, forwarded_client(self._forwarding_key))
            self._runner = web.AppRunner(
                app,
                access_log=None,
                shutdown_timeout=2.0,
            )
            await self._runner.setup()
            context = None if self.tls is None else self.tls.context
            site = web.TCPSite(
                self._runner,
                self.config.host,
                self.config.port,
                ssl_context=context,
                backlog=LISTEN_BACKLOG,
            )
            await site.start()
            host, port = self._runner.addresses[0][:2]
            scheme = "http" if self.tls is None else "https"
            self.url = (
                f"{scheme}://[{host}]:{port}" if ":" in str(host) else f"{scheme}://{host}:{port}"
            )
        except OSError as exc:
            await self._close_runner_and_store()
            raise HubConfigError(
                f"cannot listen on {self.config.host}:{self.config.port}: {exc}"
            ) from None
        if self.config.gossip:
            host, port = self.config.gossip_address
            gossip = HubGossip(
                self.ledger,
                self.sites.site_public_key,
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
            gossip.listeners.append(self.parts.alerting.mark)  # a summary moves its alerts
            self.parts.gossip = gossip
        self._driver = asyncio.create_task(self._drive(), name="hub-rollouts")
        # Its state loaded: out of the collector's way (central_hub.gcpolicy).
        gcpolicy.hold()
        self._gc_held = True
        logger.info(
            "hub of fleet %r serving on %s, head %d", self.fleet, self.url, self.head.version
        )

    async def stop(self) -> None:
        self.ledger.closing = True
        if self._driver is not None:
            self._driver.cancel()
            await asyncio.gather(self._driver, return_exceptions=True)
            self._driver = None
        self.ledger.close()  # long-polls answer now
        gossip, self.parts.gossip = self.parts.gossip, None
        if gossip is not None:
            await gossip.stop()
        await self._close_runner_and_store()
        if self._gc_held:
            self._gc_held = False
            await gcpolicy.release()

    async def _close_runner_and_store(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        try:
            await self.accounts.failures.flush()
        except Exception:
            logger.exception("failed authentications not audited at stop")
        await self.parts.reports.close()
        await self.ledger.drain()
        await self.ledger.close_store()
        await asyncio.to_thread(self.logs.close)
        self._release_data_dir()

    def _release_data_dir(self) -> None:
        lock, self._data_dir_lock = self._data_dir_lock, None
        if lock is not None:
            lock.release()

    def _open(self) -> None:
        """Open the data directory, initialising it on first start (runs in a thread)."""
        data_dir = self.data_dir
        if not data_dir.exists():
            data_dir.mkdir(mode=0o700, parents=True)
        elif not data_dir.is_dir():
            raise HubConfigError(f"{data_dir} is not a directory")
        parts = self.parts
        kek = self.config.kek
        keyfiles.recover(data_dir, kek)
        if kek is not None:
            keyfiles.seal_plain_files(data_dir, kek)
        keyfiles.check_open(data_dir, kek)  # before anything is served
        parts.vault.open()
        parts.logs.open()
        store = self._store_factory(data_dir / STORE_DIR)
        try:
            fleet = store.get_json("meta", "fleet")
            if fleet is None:
                fleet, root = self._initialise(store)
                head = Head()
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
                    kek,
                )
                head = Head.from_json(store.get_json("meta", "head"))
            adopt_tenants(store, self.now())
            parts.deployments.restore(store)
            parts.reports.restore(store)
            parts.snapshots.restore(store)
            parts.alerting.restore(store, started_at=self.now())
        except BaseException:
            store.close()
            raise
        self.ledger.attach(store, str(fleet), [root], head)

    def _warm(self) -> None:
        self.parts.deployments.warm()
        self.parts.delta_format.warm()

    def _initialise(self, store: Store) -> tuple[str, SigningKey]:
        fleet = self.config.fleet or DEFAULT_FLEET
        root = deltalog.load_or_create_root_key(self.data_dir, self.config.kek)
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
        logger.info("initialised fleet %r in %s", fleet, self.data_dir)
        return fleet, root

    # -- the driver -----------------------------------------------------------------------

    async def _drive(self) -> None:
        parts, ledger = self.parts, self.ledger
        while True:
            try:
                async with asyncio.timeout(self.config.tick_s):
                    await self._wake.wait()
            except TimeoutError:
                pass
            self._wake.clear()
            if parts.gossip is not None:
                try:
                    parts.gossip.maintain()
                except Exception:
                    logger.exception("gossip certificate renewal failed")
            try:
                if parts.deployments.active or self._heartbeat_due(ledger.head, ledger.now()):
                    await ledger.transact(self._advance)
            except Exception:
                logger.exception("rollout step failed; retrying on the next tick")
            try:
                if parts.vault.needs_distribution():
                    await ledger.transact(parts.vault.distribute)
            except Exception:
                logger.exception("secret distribution failed; retrying on the next tick")
            if parts.alerting.due(ledger.now()):
                try:
                    parts.alerting.refresh()
                except Exception:
                    logger.exception("alert evaluation failed; retrying on the next tick")
            parts.logs.start_retention()
            if self.audit_retention.due(ledger.now()):
                try:
                    await self.audit_retention.prune()
                except Exception:
                    logger.exception("audit log retention failed; retrying later")
            if parts.snapshots.due(ledger.now()):
                try:
                    await parts.snapshots.compact()
                except Exception:
                    logger.exception("delta log compaction failed; retrying later")

    def _advance(self, txn: Txn) -> None:
        """Step every running deployment; append a heartbeat when the tip gets old."""
        self.deployments.advance(txn)
        if self._heartbeat_due(txn.head, txn.now):
            txn.delta([], ALL_SITES)

    def _heartbeat_due(self, head: Head, now: float) -> bool:
        return self.ledger.heartbeat_due(head, now, self.config.heartbeat_interval_s)
