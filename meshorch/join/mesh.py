"""The site mesh of an agent: membership, WireGuard peers, mDNS advertising.

``prepare_membership`` decides how this host belongs to its site before Raft
starts: from its data dir after a restart, by bootstrapping a new site, or by
joining through mDNS discovery and a join token. ``MeshService`` then keeps
the WireGuard interface equal to the members in the replicated state (adding
and dropping peers as hosts join or are revoked) and advertises the agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import os
import secrets
import socket
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from meshorch.errors import ConfigurationError
from meshorch.join.protocol import (
    JoinAnswer,
    JoinRefused,
    JoinRequest,
    JoinToken,
    SiteIdentity,
    unwrap_answer,
)
from meshorch.state.tables import MemberRecord
from netmesh import (
    AddressPlan,
    DiscoveryTimeout,
    KeyPair,
    NetmeshError,
    unseal,
)
from raft.durable import write_durably

if TYPE_CHECKING:
    from netmesh.discovery import DiscoveredPeer
    from netmesh.wireguard import InterfaceSpec, PeerSpec

logger = logging.getLogger(__name__)

MEMBERSHIP_FILE = "mesh.json"
PENDING_IDENTITY_FILE = "site-identity.pending"
DEFAULT_OVERLAY_NETWORK = "10.99.0.0/16"
DEFAULT_RAFT_PORT = 7800
DEFAULT_WG_PORT = 51820
KEEPALIVE_S = 25
RECONCILE_INTERVAL_S = 0.3
RESYNC_INTERVAL_S = 10.0
# Rounds over the peers while they answer 503 (busy) or 504 (no commit: the site's leader
# was lost, e.g. while another host's join changes the membership): retry later.
JOIN_ROUNDS = 10
JOIN_RETRY_S = 2.0


@dataclass(frozen=True)
class MeshSettings:
    """How an agent joins and runs its site's mesh (the agent's mesh flags)."""

    lan_ip: str
    wg_interface: str = "meshorch0"
    wg_port: int = DEFAULT_WG_PORT
    raft_port: int = DEFAULT_RAFT_PORT
    overlay_network: str = DEFAULT_OVERLAY_NETWORK
    join_token: str | None = None
    bootstrap: bool = False
    discovery_timeout_s: float = 10.0


@dataclass(frozen=True)
class Membership:
    """This host's place in the mesh, kept in the data dir across restarts."""

    site: str
    host_id: str
    overlay_ip: str
    overlay_network: str
    raft_port: int
    raft_members: tuple[str, ...]
    initial_peers: tuple[dict[str, Any], ...]

    @property
    def raft_address(self) -> str:
        return f"{self.overlay_ip}:{self.raft_port}"

    @property
    def prefix_len(self) -> int:
        return ipaddress.ip_network(self.overlay_network).prefixlen

    def save(self, data_dir: Path) -> None:
        write_durably(data_dir / MEMBERSHIP_FILE, orjson.dumps(self.__dict__ | {"v": 1}))

    @staticmethod
    def load(data_dir: Path) -> Membership | None:
        path = data_dir / MEMBERSHIP_FILE
        if not path.exists():
            return None
        data = orjson.loads(path.read_bytes())
        data.pop("v", None)
        data["raft_members"] = tuple(data["raft_members"])
        data["initial_peers"] = tuple(data["initial_peers"])
        return Membership(**data)


def detect_lan_ip() -> str:
    """The address this host uses towards the mDNS group: its LAN address."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("224.0.0.251", 5353))
        return str(probe.getsockname()[0])


# -- pure: the desired interface -------------------------------------------------------


def peer_specs(peers: Sequence[dict[str, Any] | MemberRecord], self_host: str) -> list[PeerSpec]:
    from netmesh.wireguard import PeerSpec  # WireGuard: loaded in mesh mode only

    specs = []
    for peer in peers:
        data = peer.to_json() if isinstance(peer, MemberRecord) else peer
        if data.get("host_id") == self_host or not data.get("wg_public_key"):
            continue
        specs.append(
            PeerSpec(
                public_key=str(data["wg_public_key"]),
                endpoint=data.get("wg_endpoint"),
                allowed_ips=(f"{data['overlay_ip']}/32",),
                persistent_keepalive_s=KEEPALIVE_S,
            )
        )
    return sorted(specs, key=lambda p: p.public_key)


def desired_interface(
    settings: MeshSettings,
    keypair: KeyPair,
    membership: Membership,
    members: Sequence[MemberRecord],
) -> InterfaceSpec:
    """The WireGuard interface this host should have, given the site's members.

    Until this host sees its own record in the replicated state (it is still
    catching up), the peers handed over in the join answer stand in.
    """
    from netmesh.wireguard import InterfaceSpec  # WireGuard: loaded in mesh mode only

    known = any(m.host_id == membership.host_id for m in members)
    peers = members if known else membership.initial_peers
    return InterfaceSpec(
        name=settings.wg_interface,
        private_key_b64=keypair.private_key_b64,
        listen_port=settings.wg_port,
        address_cidr=f"{membership.overlay_ip}/{membership.prefix_len}",
        peers=tuple(peer_specs(peers, membership.host_id)),
    )


# -- before Raft starts: bootstrap, join or resume -----------------------------------------


@dataclass(frozen=True)
class Prepared:
    membership: Membership
    password: str | None  # None: use the copy in the data dir


def bootstrap_membership(
    site: str, host_id: str, settings: MeshSettings, data_dir: Path
) -> Prepared:
    """A new site: first overlay address, a fresh identity and cluster password."""
    plan = AddressPlan.from_cidr(settings.overlay_network)
    overlay_ip = str(plan.allocate(set()))
    identity = SiteIdentity.generate(secrets.token_bytes(32))
    pending = data_dir / PENDING_IDENTITY_FILE
    fd = os.open(pending, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(identity.encode())
    membership = Membership(
        site,
        host_id,
        overlay_ip,
        str(plan.network),
        settings.raft_port,
        (f"{overlay_ip}:{settings.raft_port}",),
        (),
    )
    logger.info("bootstrapping site %s: overlay %s, this host %s", site, plan.network, overlay_ip)
    return Prepared(membership, secrets.token_urlsafe(32))


async def join_membership(
    site: str,
    host_id: str,
    settings: MeshSettings,
    keypair: KeyPair,
    api_port: int,
    token_text: str,
    now: Callable[[], float] = time.time,
) -> Prepared:
    """Find the site by mDNS, present the token, unseal the answer."""
    from netmesh.discovery import SiteDiscovery  # zeroconf: loaded in mesh mode only

    token = JoinToken.parse(token_text)
    if token.site != site:
        raise ConfigurationError(f"the join token is for site {token.site!r}, not {site!r}")
    async with SiteDiscovery(site, settings.lan_ip) as discovery:
        logger.info("looking for hosts of site %s on %s", site, settings.lan_ip)
        try:
            peers = await discovery.wait_for_peers(1, settings.discovery_timeout_s)
        except DiscoveryTimeout as exc:
            raise ConfigurationError(
                f"no host of site {site!r} answered on the LAN within "
                f"{settings.discovery_timeout_s:g}s (mDNS on {settings.lan_ip})"
            ) from exc
    request = JoinRequest(
        site=site,
        token_id=token.token_id,
        host_id=host_id,
        wg_public_key=keypair.public_key_b64,
        wg_endpoint=f"{settings.lan_ip}:{settings.wg_port}",
        api=f"{settings.lan_ip}:{api_port}",
        timestamp=now(),
        nonce=secrets.token_hex(16),
    ).with_proof(token.secret)
    last_error = "no peer answered"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=15)) as session:
        for attempt in range(JOIN_ROUNDS):
            answered, last_error, busy = await _ask_peers(session, peers, request, token, keypair)
            if answered is not None:
                return answered
            if busy and attempt + 1 < JOIN_ROUNDS:
                # A peer was busy (503: e.g. changing the cluster password) or could not
                # commit (504: no leader for a moment): wait.
                logger.info("could not join yet (%s); retrying", last_error)
                await asyncio.sleep(JOIN_RETRY_S)
                continue
            break
    raise ConfigurationError(f"could not join site {site}: {last_error}")


async def _ask_peers(
    session: aiohttp.ClientSession,
    peers: Mapping[str, DiscoveredPeer],
    request: JoinRequest,
    token: JoinToken,
    keypair: KeyPair,
) -> tuple[Prepared | None, str, bool]:
    """The first peer's answer; None when no peer gave one, with why the last did not and
    whether some peer was busy (503, or 504 when the site could not commit: worth another
    round: the same host asking again is admitted as the same member, and a single-use
    token spent by the first try is refused with a clear error)."""
    last_error, busy = "no peer answered", False
    for peer in sorted(peers.values(), key=lambda p: p.host):
        url = f"http://{peer.join_endpoint}/v1/join"
        try:
            async with session.post(url, data=orjson.dumps(request.to_json())) as response:
                body = await response.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            last_error = f"{peer.host}: {exc}"
            continue
        if response.status == 200:
            return _opened_answer(body, request, token, keypair), "", False
        error = body.get("error", {}) if isinstance(body, dict) else {}
        if 400 <= response.status < 500:
            raise JoinRefused(
                str(error.get("code", "refused")),
                f"site {request.site} refused the join: {error.get('message', response.status)}",
            )
        last_error = f"{peer.host}: {response.status} {error.get('message', '')}"
        busy = busy or response.status in (503, 504)
    return None, last_error, busy


def _opened_answer(body: Any, request: JoinRequest, token: JoinToken, keypair: KeyPair) -> Prepared:
    sealed = unwrap_answer(body, token.fingerprint)
    try:
        answer = JoinAnswer.decode(unseal(sealed, keypair))
    except (NetmeshError, ValueError, KeyError) as exc:
        raise JoinRefused("bad_answer", f"cannot open the join answer: {exc}") from exc
    if answer.site != request.site or answer.host_id != request.host_id:
        raise JoinRefused("bad_answer", "the join answer is for another host")
    logger.info("joined site %s as %s (overlay %s)", answer.site, answer.host_id, answer.overlay_ip)
    membership = Membership(
        answer.site,
        answer.host_id,
        answer.overlay_ip,
        answer.overlay_network,
        answer.raft_port,
        answer.raft_members,
        answer.peers,
    )
    return Prepared(membership, answer.cluster_password)


async def discover_existing_site(site: str, settings: MeshSettings) -> bool:
    """Whether some host of ``site`` already answers on the LAN."""
    from netmesh.discovery import SiteDiscovery  # zeroconf: loaded in mesh mode only

    async with SiteDiscovery(site, settings.lan_ip) as discovery:
        try:
            await discovery.wait_for_peers(1, settings.discovery_timeout_s)
        except DiscoveryTimeout:
            return False
    return True


# -- while running: keep WireGuard in step with the members --------------------------------


class MeshService:
    """Reconciles the WireGuard interface and advertises the agent over mDNS."""

    def __init__(
        self,
        settings: MeshSettings,
        keypair: KeyPair,
        membership: Membership,
        members: Callable[[], list[MemberRecord]],
        on_revoked: Callable[[], None],
        api_port: int,
    ) -> None:
        from netmesh.discovery import SiteDiscovery  # zeroconf: loaded in mesh mode only
        from netmesh.wireguard import WireGuardInterface

        self.settings = settings
        self.keypair = keypair
        self.membership = membership
        self._members = members
        self._on_revoked = on_revoked
        self._api_port = api_port
        self.interface = WireGuardInterface(settings.wg_interface)
        self._discovery = SiteDiscovery(membership.site, settings.lan_ip)
        self._task: asyncio.Task[None] | None = None
        self._last_spec: InterfaceSpec | None = None
        self._last_sync = 0.0
        self._seen_self = False

    async def start(self) -> None:
        """Bring the interface up with the peers known now, so Raft can connect."""
        await self.reconcile_once()
        await self._discovery.start()
        await self._discovery.advertise(
            host=self.membership.host_id,
            join_endpoint=f"{self.settings.lan_ip}:{self._api_port}",
            public_key_b64=self.keypair.public_key_b64,
        )
        self._task = asyncio.create_task(self._loop(), name="mesh-reconcile")

    async def stop(self, delete_interface: bool = True) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self._discovery.stop()
        if delete_interface:
            with contextlib.suppress(NetmeshError):
                await self.interface.delete()

    async def reconcile_once(self) -> None:
        members = self._members()
        mine = any(m.host_id == self.membership.host_id for m in members)
        if mine:
            self._seen_self = True
        elif self._seen_self:
            logger.warning("this host was removed from site %s", self.membership.site)
            self._on_revoked()
            return
        spec = desired_interface(self.settings, self.keypair, self.membership, members)
        now = time.monotonic()
        if spec == self._last_spec and now - self._last_sync < RESYNC_INTERVAL_S:
            return
        actions = await self.interface.reconcile(spec)
        if actions:
            logger.info("wireguard: %s", ", ".join(type(a).__name__ for a in actions))
        self._last_spec = spec
        self._last_sync = now

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(RECONCILE_INTERVAL_S)
            try:
                await self.reconcile_once()
            except NetmeshError as exc:
                logger.error("wireguard reconcile failed (will retry): %s", exc)
