"""WireGuard interface reconciler: a pure diff plus a thin `wg`/`ip` adapter.

The control plane hands over a complete ``InterfaceSpec`` (like tailscale's
network map); ``plan_changes`` compares it with the observed
``InterfaceState`` and returns the actions that close the gap, and
``WireGuardInterface`` applies them. Applying a plan and planning again gives
an empty plan, so calling ``reconcile`` on every change (or on a timer) is
cheap and safe.

Backends: kernel WireGuard when ``ip link add NAME type wireguard`` works,
else the userspace ``wireguard-go NAME`` (it daemonizes and ends when its
link is deleted). ``wg`` and ``ip`` configure both the same way.

wireguard-go keeps its control socket at ``/var/run/wireguard/NAME.sock``,
which network namespaces share: two namespaces on one machine cannot both run
a wireguard-go interface of the same name, so lab hosts need distinct names.

Its size: one reconciler for two backends (kernel WireGuard and wireguard-go) and the
addressing and routes of the interface; the plan itself is pure in ``netmesh.addressing``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol

from netmesh.errors import (
    BackendUnavailableError,
    CommandError,
    InvalidKeyError,
    StateParseError,
    WireGuardError,
)
from netmesh.keys import decode_key, public_key_from_private

logger = logging.getLogger(__name__)

Backend = Literal["kernel", "userspace"]
BackendChoice = Literal["auto", "kernel", "userspace"]

_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")
_NONE = "(none)"


# --------------------------------------------------------------------------- specs


def normalize_endpoint(endpoint: str) -> str:
    """Return ``ip:port`` (``[v6]:port``) in canonical form, or raise ValueError.

    Only IP literals: `wg show` reports resolved addresses, so a host name
    would never compare equal and the peer would be rewritten on every pass.
    """
    host, sep, port_text = endpoint.rpartition(":")
    if not sep or not host:
        raise ValueError(f"endpoint {endpoint!r} is not ip:port")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    ip = ipaddress.ip_address(host)
    if not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"endpoint {endpoint!r} has a bad port")
    port = int(port_text)
    return f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"


def _normalize_allowed_ips(allowed: Sequence[str]) -> tuple[str, ...]:
    # wg stores networks with host bits cleared; compare in that form, order-free.
    nets = {ipaddress.ip_network(a.strip(), strict=False) for a in allowed if a.strip()}
    return tuple(str(n) for n in sorted(nets, key=lambda n: (n.version, n)))


def _check_key(key_b64: str, what: str) -> None:
    try:
        decode_key(key_b64)
    except InvalidKeyError as exc:
        raise WireGuardError(f"{what}: {exc}") from exc


@dataclass(frozen=True, slots=True)
class PeerSpec:
    """Desired configuration of one peer.

    Normalized on construction (canonical endpoint, sorted allowed-ips) so two
    specs that mean the same compare equal. ``endpoint=None`` leaves whatever
    endpoint WireGuard has learnt from the peer's own packets.
    """

    public_key: str
    endpoint: str | None = None
    allowed_ips: tuple[str, ...] = ()
    persistent_keepalive_s: int | None = None

    def __post_init__(self) -> None:
        _check_key(self.public_key, "peer public key")
        try:
            endpoint = None if self.endpoint is None else normalize_endpoint(self.endpoint)
            allowed = _normalize_allowed_ips(self.allowed_ips)
        except ValueError as exc:
            raise WireGuardError(f"peer {self.public_key}: {exc}") from exc
        keepalive = self.persistent_keepalive_s
        if keepalive is not None and not 0 < keepalive < 65536:
            raise WireGuardError(f"persistent keepalive must be 1..65535 s or None: {keepalive}")
        # Frozen dataclass: normalizing in place needs object.__setattr__.
        object.__setattr__(self, "endpoint", endpoint)
        object.__setattr__(self, "allowed_ips", allowed)


@dataclass(frozen=True, slots=True)
class InterfaceSpec:
    """Desired state of one WireGuard interface (complete: unknown peers are removed).

    ``listen_port=0`` lets WireGuard pick a port and is then not compared.
    """

    name: str
    private_key_b64: str = field(repr=False)
    listen_port: int
    address_cidr: str
    peers: tuple[PeerSpec, ...] = ()

    def __post_init__(self) -> None:
        if not _IFNAME_RE.match(self.name):
            raise WireGuardError(f"bad interface name {self.name!r} (max 15 chars)")
        _check_key(self.private_key_b64, "interface private key")
        if not 0 <= self.listen_port < 65536:
            raise WireGuardError(f"bad listen port {self.listen_port}")
        try:
            address = str(ipaddress.ip_interface(self.address_cidr))
        except ValueError as exc:
            raise WireGuardError(f"bad interface address {self.address_cidr!r}") from exc
        object.__setattr__(self, "address_cidr", address)
        keys = [p.public_key for p in self.peers]
        if len(set(keys)) != len(keys):
            raise WireGuardError("duplicate peer public keys in interface spec")
        if public_key_from_private(self.private_key_b64) in keys:
            raise WireGuardError("interface spec lists itself as a peer")


# --------------------------------------------------------------------------- observed state


@dataclass(frozen=True, slots=True)
class PeerState:
    """A peer as `wg show dump` reports it."""

    public_key: str
    endpoint: str | None
    allowed_ips: tuple[str, ...]
    latest_handshake_s: int  # unix time; 0 = never
    rx_bytes: int
    tx_bytes: int
    persistent_keepalive_s: int | None
    has_preshared_key: bool = False


@dataclass(frozen=True, slots=True)
class WgDump:
    """Parsed `wg show IFACE dump`."""

    private_key_b64: str | None = field(repr=False)
    public_key_b64: str | None
    listen_port: int
    fwmark: int | None
    peers: tuple[PeerState, ...]


@dataclass(frozen=True, slots=True)
class LinkInfo:
    """Parsed `ip -j addr show dev IFACE`: addresses we manage and the UP flag."""

    addresses: tuple[str, ...]
    is_up: bool


@dataclass(frozen=True, slots=True)
class InterfaceState:
    """Observed state of a WireGuard interface."""

    name: str
    private_key_b64: str | None = field(repr=False)
    public_key_b64: str | None
    listen_port: int
    addresses: tuple[str, ...]
    is_up: bool
    peers: tuple[PeerState, ...]


def _parse_int(text: str, what: str) -> int:
    try:
        return int(text, 0)
    except ValueError as exc:
        raise StateParseError(f"bad {what} {text!r} in wg dump") from exc


def _parse_peer_line(fields: list[str]) -> PeerState:
    pub, psk, endpoint, allowed, handshake, rx, tx, keepalive = fields
    try:
        allowed_ips = () if allowed == _NONE else _normalize_allowed_ips(allowed.split(","))
        ep = None if endpoint == _NONE else normalize_endpoint(endpoint)
    except ValueError as exc:
        raise StateParseError(f"bad peer line in wg dump: {exc}") from exc
    return PeerState(
        public_key=pub,
        endpoint=ep,
        allowed_ips=allowed_ips,
        latest_handshake_s=_parse_int(handshake, "latest handshake"),
        rx_bytes=_parse_int(rx, "rx bytes"),
        tx_bytes=_parse_int(tx, "tx bytes"),
        persistent_keepalive_s=(
            None if keepalive in ("off", "0") else _parse_int(keepalive, "keepalive")
        ),
        has_preshared_key=psk != _NONE,
    )


def parse_wg_dump(text: str) -> WgDump:
    """Parse the output of `wg show IFACE dump` (one interface)."""
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise StateParseError("empty wg dump")
    head = lines[0].split("\t")
    if len(head) != 4:
        raise StateParseError(f"wg dump interface line has {len(head)} fields, expected 4")
    private, public, port, fwmark = head
    peers = []
    for line in lines[1:]:
        fields = line.split("\t")
        if len(fields) != 8:
            raise StateParseError(f"wg dump peer line has {len(fields)} fields, expected 8")
        peers.append(_parse_peer_line(fields))
    return WgDump(
        private_key_b64=None if private == _NONE else private,
        public_key_b64=None if public == _NONE else public,
        listen_port=_parse_int(port, "listen port"),
        fwmark=None if fwmark == "off" else _parse_int(fwmark, "fwmark"),
        peers=tuple(peers),
    )


def parse_ip_addr_json(text: str) -> LinkInfo:
    """Parse `ip -j addr show dev IFACE`; IPv6 link-local addresses are ignored."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise StateParseError(f"ip -j addr output is not JSON: {exc}") from exc
    if not isinstance(data, list) or len(data) != 1 or not isinstance(data[0], dict):
        raise StateParseError("ip -j addr output is not a one-link list")
    link = data[0]
    flags = link.get("flags", [])
    addresses: list[str] = []
    for info in link.get("addr_info", []):
        try:
            iface = ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}")
        except (KeyError, TypeError, ValueError) as exc:
            raise StateParseError(f"bad addr_info entry {info!r}") from exc
        # The kernel adds fe80:: to tun links by itself; it is not ours to manage.
        if iface.ip.is_link_local and iface.version == 6:
            continue
        addresses.append(str(iface))
    return LinkInfo(addresses=tuple(addresses), is_up=isinstance(flags, list) and "UP" in flags)


def interface_state(name: str, dump_text: str, ip_json_text: str) -> InterfaceState:
    """Combine `wg show dump` and `ip -j addr show` into an InterfaceState."""
    dump = parse_wg_dump(dump_text)
    link = parse_ip_addr_json(ip_json_text)
    return InterfaceState(
        name=name,
        private_key_b64=dump.private_key_b64,
        public_key_b64=dump.public_key_b64,
        listen_port=dump.listen_port,
        addresses=link.addresses,
        is_up=link.is_up,
        peers=dump.peers,
    )


# --------------------------------------------------------------------------- actions


@dataclass(frozen=True, slots=True)
class CreateInterface:
    name: str


@dataclass(frozen=True, slots=True)
class SetPrivateKey:
    name: str
    private_key_b64: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class SetListenPort:
    name: str
    port: int


@dataclass(frozen=True, slots=True)
class AddAddress:
    name: str
    cidr: str


@dataclass(frozen=True, slots=True)
class RemoveAddress:
    name: str
    cidr: str


@dataclass(frozen=True, slots=True)
class AddPeer:
    name: str
    peer: PeerSpec


@dataclass(frozen=True, slots=True)
class UpdatePeer:
    name: str
    peer: PeerSpec


@dataclass(frozen=True, slots=True)
class RemovePeer:
    name: str
    public_key: str


@dataclass(frozen=True, slots=True)
class SetUp:
    name: str


Action = (
    CreateInterface
    | SetPrivateKey
    | SetListenPort
    | AddAddress
    | RemoveAddress
    | AddPeer
    | UpdatePeer
    | RemovePeer
    | SetUp
)


def _peer_matches(current: PeerState, desired: PeerSpec) -> bool:
    if current.allowed_ips != desired.allowed_ips:
        return False
    if current.persistent_keepalive_s != desired.persistent_keepalive_s:
        return False
    # No desired endpoint: accept whatever roaming has taught WireGuard.
    return desired.endpoint is None or current.endpoint == desired.endpoint


def plan_changes(current: InterfaceState | None, desired: InterfaceSpec) -> list[Action]:
    """Actions that take ``current`` (None: no such link) to ``desired``.

    Order: create, key, port, peer removals, peer additions/updates, address
    removals, address addition, link up. Empty when nothing differs.
    """
    name = desired.name
    actions: list[Action] = []
    if current is None:
        actions.append(CreateInterface(name))
        current = InterfaceState(
            name=name,
            private_key_b64=None,
            public_key_b64=None,
            listen_port=0,
            addresses=(),
            is_up=False,
            peers=(),
        )
    if current.private_key_b64 != desired.private_key_b64:
        actions.append(SetPrivateKey(name, desired.private_key_b64))
    if desired.listen_port and current.listen_port != desired.listen_port:
        actions.append(SetListenPort(name, desired.listen_port))

    wanted = {p.public_key: p for p in desired.peers}
    have = {p.public_key: p for p in current.peers}
    actions.extend(RemovePeer(name, key) for key in sorted(have.keys() - wanted.keys()))
    for peer in desired.peers:
        existing = have.get(peer.public_key)
        if existing is None:
            actions.append(AddPeer(name, peer))
        elif not _peer_matches(existing, peer):
            actions.append(UpdatePeer(name, peer))

    actions.extend(
        RemoveAddress(name, cidr) for cidr in current.addresses if cidr != desired.address_cidr
    )
    if desired.address_cidr not in current.addresses:
        actions.append(AddAddress(name, desired.address_cidr))
    if not current.is_up:
        actions.append(SetUp(name))
    return actions


@dataclass(frozen=True, slots=True)
class PeerStatus:
    """Liveness of one peer: last handshake (unix time, None if never) and endpoint."""

    public_key: str
    endpoint: str | None
    latest_handshake_s: int | None
    rx_bytes: int
    tx_bytes: int


def peer_statuses(dump: WgDump) -> dict[str, PeerStatus]:
    """Per-peer status keyed by public key, from a parsed dump."""
    return {
        p.public_key: PeerStatus(
            public_key=p.public_key,
            endpoint=p.endpoint,
            latest_handshake_s=p.latest_handshake_s or None,
            rx_bytes=p.rx_bytes,
            tx_bytes=p.tx_bytes,
        )
        for p in dump.peers
    }


# --------------------------------------------------------------------------- adapter


@dataclass(frozen=True, slots=True)
class CommandResult:
    returncode: int
    stdout: str
    stderr: str


class CommandRunner(Protocol):
    """Runs one command; injected so the adapter can be tested without root."""

    async def __call__(
        self,
        argv: Sequence[str],
        *,
        input_bytes: bytes | None,
        env: Mapping[str, str] | None,
        timeout_s: float,
    ) -> CommandResult: ...


async def run_subprocess(
    argv: Sequence[str],
    *,
    input_bytes: bytes | None,
    env: Mapping[str, str] | None,
    timeout_s: float,
) -> CommandResult:
    """Default CommandRunner: ``subprocess.run`` in a worker thread.

    Not the event loop's subprocess support: uvloop's lets the child inherit
    descriptors the process opened without close-on-exec (LMDB's, for one),
    and the wireguard-go daemon would then hold our pipes open for ever.
    """
    return await asyncio.to_thread(_run_blocking, list(argv), input_bytes, env, timeout_s)


def _run_blocking(
    argv: list[str], input_bytes: bytes | None, env: Mapping[str, str] | None, timeout_s: float
) -> CommandResult:
    try:
        completed = subprocess.run(
            argv,
            input=input_bytes,
            stdin=None if input_bytes is not None else subprocess.DEVNULL,
            capture_output=True,
            env=dict(env) if env is not None else None,
            timeout=timeout_s,
            close_fds=True,
            # Own session: a daemon forked by wireguard-go must not share our
            # process group and get our terminal's signals.
            start_new_session=True,
            check=False,
        )
    except subprocess.TimeoutExpired:
        return CommandResult(returncode=-9, stdout="", stderr=f"timed out after {timeout_s} s")
    except OSError as exc:
        return CommandResult(returncode=127, stdout="", stderr=str(exc))
    return CommandResult(
        returncode=completed.returncode,
        stdout=completed.stdout.decode("utf-8", "replace"),
        stderr=completed.stderr.decode("utf-8", "replace"),
    )


def _link_missing(stderr: str) -> bool:
    return "does not exist" in stderr or "Cannot find device" in stderr


class WireGuardInterface:
    """Applies InterfaceSpecs to one WireGuard link with `wg` and `ip`.

    Runs in the caller's network namespace, or in ``netns`` (commands get an
    ``ip netns exec NS`` prefix; meant for tests and the lab).
    """

    def __init__(
        self,
        name: str,
        *,
        netns: str | None = None,
        backend: BackendChoice = "auto",
        wireguard_go: str | None = None,
        command_timeout_s: float = 30.0,
        runner: CommandRunner | None = None,
    ) -> None:
        if not _IFNAME_RE.match(name):
            raise WireGuardError(f"bad interface name {name!r} (max 15 chars)")
        self.name = name
        self.netns = netns
        self._backend_choice: BackendChoice = backend
        self._wireguard_go = wireguard_go
        self._timeout_s = command_timeout_s
        self._runner: CommandRunner = runner or run_subprocess
        self.backend: Backend | None = None  # which backend created the link (if we did)
        # One change at a time: interleaved plans would act on stale state.
        self._lock = asyncio.Lock()

    # -- command plumbing

    def _argv(self, argv: Sequence[str]) -> list[str]:
        prefix = ["ip", "netns", "exec", self.netns] if self.netns else []
        return [*prefix, *argv]

    async def _run(
        self,
        argv: Sequence[str],
        *,
        input_bytes: bytes | None = None,
        env: Mapping[str, str] | None = None,
        check: bool = True,
    ) -> CommandResult:
        full = self._argv(argv)
        result = await self._runner(
            full, input_bytes=input_bytes, env=env, timeout_s=self._timeout_s
        )
        logger.debug("ran %s -> %d", full, result.returncode)
        if check and result.returncode != 0:
            raise CommandError(full, result.returncode, result.stderr)
        return result

    # -- observation

    async def state(self) -> InterfaceState | None:
        """Observed state, or None if the link does not exist in this namespace."""
        # Ask `ip` first: the wireguard-go socket directory is shared between
        # namespaces, so `wg show` alone could describe another namespace's link.
        link = await self._run(["ip", "-j", "addr", "show", "dev", self.name], check=False)
        if link.returncode != 0:
            if _link_missing(link.stderr):
                return None
            raise CommandError(
                self._argv(["ip", "-j", "addr", "show", "dev", self.name]),
                link.returncode,
                link.stderr,
            )
        dump = await self._run(["wg", "show", self.name, "dump"])
        return interface_state(self.name, dump.stdout, link.stdout)

    async def plan(self, spec: InterfaceSpec) -> list[Action]:
        """What ``reconcile(spec)`` would do now."""
        self._check_spec(spec)
        return plan_changes(await self.state(), spec)

    async def peers_status(self) -> dict[str, PeerStatus]:
        """Per-peer latest handshake and endpoint, keyed by public key."""
        dump = await self._run(["wg", "show", self.name, "dump"])
        return peer_statuses(parse_wg_dump(dump.stdout))

    # -- changes

    async def reconcile(self, spec: InterfaceSpec) -> list[Action]:
        """Bring the link to ``spec``; return the actions that were applied."""
        async with self._lock:
            actions = await self.plan(spec)
            await self.apply(actions)
        if actions:
            logger.info("reconciled %s: %d change(s)", self.name, len(actions))
        return actions

    async def apply(self, actions: Sequence[Action]) -> None:
        """Apply actions in order; each one is safe to repeat."""
        for action in actions:
            logger.debug("applying %r", action)
            await self._apply_one(action)

    async def delete(self) -> None:
        """Remove the link (which also ends wireguard-go); no-op if absent."""
        async with self._lock:
            result = await self._run(["ip", "link", "del", "dev", self.name], check=False)
        if result.returncode != 0 and not _link_missing(result.stderr):
            raise CommandError(
                self._argv(["ip", "link", "del", "dev", self.name]),
                result.returncode,
                result.stderr,
            )
        if result.returncode == 0:
            logger.info("deleted WireGuard link %s", self.name)

    def _check_spec(self, spec: InterfaceSpec) -> None:
        if spec.name != self.name:
            raise WireGuardError(f"spec is for {spec.name!r}, this adapter manages {self.name!r}")

    async def _apply_one(self, action: Action) -> None:
        name = self.name
        match action:
            case CreateInterface():
                await self._create()
            case SetPrivateKey(private_key_b64=key):
                # Through stdin: a key in argv would show up in ps and /proc.
                await self._run(
                    ["wg", "set", name, "private-key", "/dev/stdin"],
                    input_bytes=(key + "\n").encode("ascii"),
                )
            case SetListenPort(port=port):
                await self._run(["wg", "set", name, "listen-port", str(port)])
            case AddPeer(peer=peer) | UpdatePeer(peer=peer):
                await self._run(["wg", "set", name, *_peer_args(peer)])
            case RemovePeer(public_key=key):
                await self._run(["wg", "set", name, "peer", key, "remove"])
            case AddAddress(cidr=cidr):
                await self._run(["ip", "addr", "replace", cidr, "dev", name])
            case RemoveAddress(cidr=cidr):
                result = await self._run(["ip", "addr", "del", cidr, "dev", name], check=False)
                if result.returncode != 0 and "Cannot assign" not in result.stderr:
                    raise CommandError(
                        self._argv(["ip", "addr", "del", cidr, "dev", name]),
                        result.returncode,
                        result.stderr,
                    )
            case SetUp():
                await self._run(["ip", "link", "set", "dev", name, "up"])

    async def _link_exists(self) -> bool:
        result = await self._run(["ip", "link", "show", "dev", self.name], check=False)
        return result.returncode == 0

    async def _create(self) -> None:
        if await self._link_exists():
            return
        problems: list[str] = []
        if self._backend_choice in ("auto", "kernel"):
            result = await self._run(
                ["ip", "link", "add", "dev", self.name, "type", "wireguard"], check=False
            )
            if result.returncode == 0:
                self.backend = "kernel"
                logger.info("created %s with kernel WireGuard", self.name)
                return
            problems.append(f"kernel WireGuard: {result.stderr.strip() or result.returncode}")
        if self._backend_choice in ("auto", "userspace"):
            problem = await self._create_userspace()
            if problem is None:
                self.backend = "userspace"
                logger.info("created %s with wireguard-go", self.name)
                return
            problems.append(f"wireguard-go: {problem}")
        raise BackendUnavailableError(
            f"cannot create WireGuard interface {self.name}: " + "; ".join(problems)
        )

    async def _create_userspace(self) -> str | None:
        """Start wireguard-go; return None on success, else why it failed."""
        binary = self._wireguard_go or shutil.which("wireguard-go")
        if binary is None:
            return "not found on PATH (install the wireguard-go package)"
        # With LOG_LEVEL set the daemon would keep our stdout/stderr pipes open
        # and communicate() would wait for it forever; the FOREGROUND variable
        # would stop it from daemonizing at all.
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("LOG_LEVEL", "WG_PROCESS_FOREGROUND", "WG_TUN_FD", "WG_UAPI_FD")
        }
        result = await self._run([binary, self.name], env=env, check=False)
        if result.returncode != 0:
            return _last_line(result.stderr) or f"exit status {result.returncode}"
        # The parent exits once the daemon holds the tun device; check it is there.
        if not await self._link_exists():
            return "exited 0 but the link does not exist"
        return None


def _peer_args(peer: PeerSpec) -> list[str]:
    args = ["peer", peer.public_key]
    if peer.endpoint is not None:
        args += ["endpoint", peer.endpoint]
    # An empty allowed-ips argument clears the list, which is what an empty tuple means.
    args += ["allowed-ips", ",".join(peer.allowed_ips)]
    keepalive = peer.persistent_keepalive_s
    args += ["persistent-keepalive", str(keepalive) if keepalive else "off"]
    return args


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # wireguard-go prints a boxed banner first; the error is at the end.
    return lines[-1] if lines else ""
