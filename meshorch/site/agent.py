"""The agent: one per host. Runs the site's Raft member and serves the site API.

Two ways to belong to a site:

* static: ``--raft`` and ``--peer`` name the Raft addresses (loopback demos,
  tests, hosts without WireGuard);
* mesh: the agent bootstraps a site or joins one found by mDNS with a join
  token; Raft then runs only on its WireGuard overlay address.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from meshorch.apps.controller import SiteController
from meshorch.apps.image_gc import GcSettings, ImageCollector
from meshorch.apps.image_pulls import LeaderImagePulls
from meshorch.apps.pressure import PressureGuard
from meshorch.apps.reconciler import HostReconciler
from meshorch.apps.records import HOSTRES_PREFIX, encode_hostinfo, host_protocols, hostinfo_key
from meshorch.apps.resources import sample
from meshorch.apps.settings import WorkloadSettings, make_runtime
from meshorch.dirlock import DataDirLock
from meshorch.errors import ConfigurationError
from meshorch.fleet import decommission
from meshorch.fleet.records import LinkRecords
from meshorch.fleet.site_link import SiteLink
from meshorch.fleet.upgrade import AgentUpgrades, wheel_cache
from meshorch.images.service import SiteImages
from meshorch.join.admission import Admission, SiteNetwork
from meshorch.join.mesh import (
    MEMBERSHIP_FILE,
    PENDING_IDENTITY_FILE,
    Membership,
    MeshService,
    MeshSettings,
    Prepared,
    bootstrap_membership,
    discover_existing_site,
    join_membership,
)
from meshorch.join.password_rotation import PasswordRotation
from meshorch.net.app_network import AppNetwork, NetworkSettings
from meshorch.runtime import Runtime
from meshorch.secrets.service import SiteSecrets
from meshorch.site.access import load_or_create_bootstrap
from meshorch.site.api import build_app
from meshorch.site.config import (
    MAX_SOCKET_PATH,
    AgentConfig,
    check_identity,
    lock_data_dir,
    resolve_password,
    store_password,
)
from meshorch.site.guard import Guard
from meshorch.site.host_api import HostRoutes
from meshorch.site.http import SiteServices
from meshorch.site.metrics import AgentCollector
from meshorch.state.peer_auth import PeerSigner, load_or_create_key
from meshorch.state.roster import Roster
from meshorch.state.tables import (
    APPS_TABLE,
    SITE_IDENTITY_KEY,
    SITE_NETWORK_KEY,
    SITE_TABLES,
    SYSTEM_TABLE,
    MemberRecord,
)
from meshorch.streams.capture import LogCapture
from meshorch.streams.model import NewEvent, StreamName
from meshorch.streams.site import SiteStreams
from netmesh import KeyPair, load_or_create_keypair
from raft import Put, RaftConfig, RaftNode, local_preset
from raft.errors import ProposalError

logger = logging.getLogger(__name__)

RESOURCES_EVERY_S = 10.0

REGISTER_RETRY_S = 0.5


class Agent:
    """Async context manager: ``async with Agent(config) as agent: ...``.

    The one place that builds the agent's services and hands each what it uses: the
    replicated state (``meshorch.state.ports.SiteState``, the Raft node), the roster of
    the site's hosts, and the other services it works with. None of them sees the agent.
    """

    def __init__(
        self,
        config: AgentConfig,
        mesh: MeshSettings | None = None,
        workloads: WorkloadSettings | None = None,
        network: NetworkSettings | None = None,
        data_dir_lock: DataDirLock | None = None,
    ) -> None:
        """``data_dir_lock``: the data dir's lock, taken by the caller (``lock_data_dir``)
        and left to it; without it, ``start`` takes it and ``stop`` releases it."""
        config.validate()
        self.config = config
        self._data_dir_lock = data_dir_lock
        self._own_lock: DataDirLock | None = None
        self.workloads = workloads or WorkloadSettings()
        self.network_settings = network
        self.mesh_settings = mesh
        self.membership: Membership | None = None
        self.mesh: MeshService | None = None
        self.keypair: KeyPair | None = None
        self.password = ""
        self.revoked = asyncio.Event()
        self._raft: RaftNode | None = None
        self._runner: web.AppRunner | None = None
        self._tasks: set[asyncio.Task[Any]] = set()
        self.runtime: Runtime | None = None
        self.log_capture: LogCapture | None = None
        # Built by start(), once the Raft node exists:
        self.roster: Roster
        self.images: SiteImages
        self.secrets: SiteSecrets
        self.streams: SiteStreams
        self.password_rotation: PasswordRotation
        self.site_link: SiteLink
        self.upgrades: AgentUpgrades
        self.network: AppNetwork
        self.signer: PeerSigner

    @property
    def raft(self) -> RaftNode:
        if self._raft is None:
            raise RuntimeError("the agent is not started")
        return self._raft

    async def __aenter__(self) -> Agent:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        if self._data_dir_lock is None or not self._data_dir_lock.held:
            # Before anything else in the data dir: another agent may be running on it.
            self._own_lock = self._data_dir_lock = lock_data_dir(self.config.data_dir)
        try:
            await self._start()
        except BaseException:
            self._release_own_lock()
            raise

    def _release_own_lock(self) -> None:
        if self._own_lock is not None:
            self._own_lock.release()
            self._own_lock = self._data_dir_lock = None

    async def _start(self) -> None:
        config = self.config
        if self.mesh_settings is None:
            check_identity(config, config.raft_address)
            assert config.raft_address is not None
            self.password = config.password or resolve_password(config.data_dir, None, True)
            raft_address, partners = config.raft_address, config.peers
        else:
            check_identity(config, None)
            prepared = await self._prepare_mesh(self.mesh_settings)
            self.membership = prepared.membership
            raft_address = prepared.membership.raft_address
            partners = tuple(m for m in prepared.membership.raft_members if m != raft_address)

        preset = local_preset() if config.preset == "local" else {}
        raft = self._raft = RaftNode(
            RaftConfig(
                self_address=raft_address,
                partners=partners,
                data_dir=config.data_dir / "raft",
                password=self.password,
                tables=SITE_TABLES,
                durability=config.durability,
                **preset,  # type: ignore[arg-type]
            )
        )
        roster = self.roster = Roster(raft, raft.reachable, config.host_id)
        self.signer = PeerSigner(config.host_id, load_or_create_key(config.data_dir))
        if self.mesh_settings is not None and self.membership is not None:
            assert self.keypair is not None
            self.mesh = MeshService(
                self.mesh_settings,
                self.keypair,
                self.membership,
                roster.members,
                self.on_revoked,
                config.api_port,
            )
            # WireGuard first: Raft binds to the overlay address.
            await self.mesh.start()
        await raft.start()
        self.runtime = make_runtime(self.workloads.runtime, config.data_dir)
        self._build_services(raft, roster, self.runtime)
        bootstrap = None
        if config.operator_token_file is not None:
            _, bootstrap = load_or_create_bootstrap(config.operator_token_file, time.time())
        app = build_app(self._api_services(raft, roster), Guard(raft, bootstrap))
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await self._listen_on_socket(config.socket_path)
        await web.TCPSite(self._runner, config.api_host, config.api_port).start()
        if self.membership is not None and config.api_host not in ("0.0.0.0", "::"):
            # Peers reach each other's API over the overlay (image copies, for one).
            overlay_ip = self.membership.overlay_ip
            await web.TCPSite(self._runner, overlay_ip, config.api_port).start()
        self.spawn(self._register_self(), "register-self")
        self.spawn(self.images.run(), "image-sync")
        self.spawn(self.secrets.run(), "secrets")
        self.spawn(self.password_rotation.run(), "cluster-password")
        # Application output goes to the site's streams (tenant/app/logs).
        self.log_capture = LogCapture(
            self.runtime, config.data_dir / "log-capture", self._store_logs
        )
        await self.log_capture.start()
        reconciler = HostReconciler(
            raft,
            config.host_id,
            self.runtime,
            secrets=self.secrets,
            images=self.images,
            network=self.network,
            capture=self.log_capture,
        )
        self.spawn(reconciler.run(), "reconcile")
        self.spawn(self.network.run(), "site-network")
        self.spawn(decommission.run(raft), "decommission")
        self.spawn(self.upgrades.run(), "agent-upgrade")
        self.spawn(self._publish_resources(), "host-resources")
        pressure = PressureGuard(
            raft,
            config.host_id,
            config.data_dir,
            self.workloads.host_info(config.host_id),
            self.workloads.evict_at_pct,
        )
        self.spawn(pressure.run(), "pressure")
        self.image_gc = ImageCollector(
            raft,
            config.host_id,
            self.images,
            self.runtime,
            GcSettings(
                self.workloads.image_grace_s,
                self.workloads.image_store_max_bytes,
                self.workloads.evict_at_pct,
            ),
        )
        self.spawn(self.image_gc.run(), "image-gc")
        self.spawn(SiteController(raft, roster, self.streams).run(), "controller")
        pulls = LeaderImagePulls(
            raft, self.images, self.secrets.value, self.workloads.plain_http_registries
        )
        self.spawn(pulls.run(), "image-pulls")
        self.spawn(self.site_link.run(), "fleet-link")
        self.spawn(self.streams.run_retention(lambda: raft.status().is_leader), "stream-retention")
        logger.info(
            "agent %s of site %s: api http://%s, raft %s",
            config.host_id,
            config.site,
            config.api_address,
            raft_address,
        )

    async def _listen_on_socket(self, path: Path) -> None:
        """The operator surface on this host: a Unix socket only its owner may open."""
        assert self._runner is not None
        if len(os.fsencode(path)) > MAX_SOCKET_PATH:
            logger.warning("no operator socket: %s is longer than a socket path may be", path)
            return
        path.unlink(missing_ok=True)  # left by an agent that did not stop cleanly
        old_umask = os.umask(0o177)  # created 0600: no window where others may connect
        try:
            await web.UnixSite(self._runner, str(path)).start()
        finally:
            os.umask(old_umask)
        os.chmod(path, 0o600)

    def _build_services(self, raft: RaftNode, roster: Roster, runtime: Runtime) -> None:
        config = self.config
        sign = self.signer.headers
        self.images = SiteImages(config.data_dir / "images", config.host_id, raft, roster, sign)
        self.secrets = SiteSecrets(
            raft, roster, host_id=config.host_id, data_dir=config.data_dir, sign=sign
        )
        self.streams = SiteStreams(raft, config.host_id, lambda: host_protocols(raft.view))
        secrets = self.secrets
        self.password_rotation = PasswordRotation(
            raft,
            roster,
            config.host_id,
            host_key=lambda: secrets.host_key,
            host_public_keys=lambda: secrets.snapshot().hostkeys,
            store_password=lambda password: store_password(config.data_dir, password),
        )
        self.upgrades = AgentUpgrades(
            raft,
            roster,
            LinkRecords(raft),
            site_id=config.site,
            host_id=config.host_id,
            data_dir=config.data_dir,
            sign=sign,
        )
        self.site_link = SiteLink(
            raft,
            roster,
            site_id=config.site,
            flag_config=config.fleet_link(),
            secrets=self.secrets,
            streams=self.streams,
            gossip_address=(config.api_host, config.api_port),
            upgrade_state=self.upgrades.state,
        )
        self.network = AppNetwork(
            raft,
            roster,
            host_id=config.host_id,
            overlay_ip=None if self.membership is None else self.membership.overlay_ip,
            runtime=runtime.name,
            agent_ports=self._agent_ports(raft.status().self_address),
            settings=self.network_settings,
        )

    def _agent_ports(self, raft_address: str) -> tuple[tuple[str, int], ...]:
        """What no workload may reach: the API (and gossip on its port), Raft, WireGuard."""
        api = self.config.api_port
        ports = [("tcp", api), ("udp", api), ("tcp", int(raft_address.rpartition(":")[2]))]
        if self.mesh_settings is not None:
            ports.append(("udp", self.mesh_settings.wg_port))
        return tuple(ports)

    def _api_services(self, raft: RaftNode, roster: Roster) -> SiteServices:
        config = self.config
        return SiteServices(
            site_id=config.site,
            host_id=config.host_id,
            raft_address=config.raft_address,
            node=raft,
            members=roster,
            admission=Admission(
                raft,
                roster,
                config.site,
                lambda: None if self.password_rotation.under_way() else raft.passwords()[0],
                self.spawn,
                self.signer.headers,
            ),
            password_rotation=self.password_rotation,
            secrets=self.secrets,
            images=self.images,
            streams=self.streams,
            link=self.site_link,
            hosts=HostRoutes(raft, roster, wheel_cache(config.data_dir)),
            metrics=AgentCollector(raft, roster, self.site_link, self.streams, config.data_dir),
            on_revoked=self.on_revoked,
        )

    async def stop(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._runner is not None:
            await self._runner.cleanup()
        if self.runtime is not None:
            await self.runtime.close()
        if self.log_capture is not None:
            await self.log_capture.stop()  # the last lines, while Raft still runs
        if self._raft is not None:
            await self._raft.stop()
        if self.mesh is not None:
            await self.mesh.stop()
        self._release_own_lock()

    async def _publish_resources(self) -> None:
        """This host's CPU, memory and disk use in the site state, for the leader's report
        (the hub alerts on thresholds)."""
        key = HOSTRES_PREFIX + self.config.host_id.encode()
        while True:
            await asyncio.sleep(RESOURCES_EVERY_S)
            try:
                use = sample(self.config.data_dir, time.time())
                await self.raft.propose([Put(APPS_TABLE, key, orjson.dumps(use.to_json()))])
            except (ProposalError, OSError) as exc:
                logger.debug("host resources not published: %s", exc)

    async def _store_logs(self, stream: StreamName, events: list[NewEvent]) -> None:
        await self.streams.produce(stream, events)  # raises on failure: retried later

    def spawn(self, coroutine: Coroutine[Any, Any, Any], name: str) -> None:
        """Run a background task owned by the agent (cancelled at stop)."""
        task = asyncio.create_task(coroutine, name=name)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- mesh --------------------------------------------------------------------

    async def _prepare_mesh(self, settings: MeshSettings) -> Prepared:
        config = self.config
        data_dir = config.data_dir
        self.keypair = load_or_create_keypair(data_dir)
        membership = Membership.load(data_dir)
        if membership is not None:
            logger.info("resuming as %s of site %s", membership.overlay_ip, membership.site)
            prepared = Prepared(membership, None)
        elif settings.join_token:
            prepared = await join_membership(
                config.site,
                config.host_id,
                settings,
                self.keypair,
                config.api_port,
                settings.join_token,
            )
        elif settings.bootstrap or not await discover_existing_site(config.site, settings):
            prepared = bootstrap_membership(config.site, config.host_id, settings, data_dir)
        else:
            raise ConfigurationError(
                f"site {config.site!r} already has hosts on this LAN: pass --join-token "
                "(from `meshorch token create` on one of them) to join it"
            )
        if prepared.password is not None:
            store_password(data_dir, prepared.password)
        self.password = prepared.password or resolve_password(data_dir, None, True)
        prepared.membership.save(data_dir)
        return prepared

    def on_revoked(self) -> None:
        """This host was cut from its site: forget the membership and stop."""
        if self.revoked.is_set():
            return
        logger.error("this host was revoked from site %s; stopping", self.config.site)
        # A restart must go through admission again (which refuses a revoked host).
        (self.config.data_dir / MEMBERSHIP_FILE).unlink(missing_ok=True)
        self.revoked.set()

    # -- replicated state ----------------------------------------------------------

    def _self_record(self) -> MemberRecord:
        config = self.config
        if self.membership is None:
            assert config.raft_address is not None
            return MemberRecord(
                config.host_id,
                config.raft_address,
                config.api_address,
                peer_key=self.signer.public_key_hex,
            )
        assert self.keypair is not None and self.mesh_settings is not None
        lan_ip = self.mesh_settings.lan_ip
        return MemberRecord(
            host_id=config.host_id,
            raft=self.membership.raft_address,
            api=f"{lan_ip}:{config.api_port}",
            wg_public_key=self.keypair.public_key_b64,
            overlay_ip=self.membership.overlay_ip,
            wg_endpoint=f"{lan_ip}:{self.mesh_settings.wg_port}",
            peer_key=self.signer.public_key_hex,
        )

    async def _register_self(self) -> None:
        """Record this host (and, on a new site, its identity) in the replicated state."""
        me = self._self_record()
        host = self.workloads.host_info(self.config.host_id)
        info = Put(APPS_TABLE, hostinfo_key(host.host_id), encode_hostinfo(host))
        pending = self._pending_site_writes()
        while True:
            current = self.raft.view.get(SYSTEM_TABLE, me.key())
            known = self.raft.view.get(APPS_TABLE, info.key)
            if (
                not pending
                and current is not None
                and MemberRecord.decode(current.value) == me
                and known is not None
                and known.value == info.value
            ):
                return
            try:
                await self.raft.propose([*pending, Put(SYSTEM_TABLE, me.key(), me.encode()), info])
                logger.info("registered %s in the site state", me.host_id)
                (self.config.data_dir / PENDING_IDENTITY_FILE).unlink(missing_ok=True)
                pending = []
            except ProposalError as exc:
                logger.debug("registration not committed yet: %s", exc)
                await asyncio.sleep(REGISTER_RETRY_S)

    def _pending_site_writes(self) -> list[Put]:
        """A bootstrapping host writes the site identity, network and its address claim."""
        path: Path = self.config.data_dir / PENDING_IDENTITY_FILE
        if self.membership is None or not path.exists():
            return []
        network = SiteNetwork(self.membership.overlay_network, self.membership.raft_port)
        claim = b"ipam/" + self.membership.overlay_ip.encode()
        return [
            Put(SYSTEM_TABLE, SITE_IDENTITY_KEY, path.read_bytes(), expect_index=0),
            Put(SYSTEM_TABLE, SITE_NETWORK_KEY, network.encode(), expect_index=0),
            Put(SYSTEM_TABLE, claim, self.config.host_id.encode(), expect_index=0),
        ]
