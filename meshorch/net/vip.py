"""A virtual IP on a LAN interface: claimed by one host at a time, announced by gratuitous ARP.

``Vip.claim`` adds the address to the device (``ip addr replace``: repeating it
is harmless) and then broadcasts a few gratuitous ARP packets, spaced
``GARP_INTERVAL_S`` apart, so neighbours that cached the previous holder's MAC
for this address switch to ours at once instead of after their ARP entry goes
stale (tens of seconds on Linux). ``Vip.release`` deletes the address (absent is
fine). Who should hold the VIP is decided elsewhere; this is only the adapter.

Gratuitous ARP is sent from a raw ``AF_PACKET`` socket bound to the device (no
arping needed): per round one ARP request and one ARP reply, both with sender
and target protocol address = the VIP and sender hardware address = the
device's MAC, to the Ethernet broadcast address. Linux neighbours accept either
to update an existing entry; other stacks prefer one or the other.

A host prefix (``/32``) is the cleanest VIP: it adds no route. The LAN's prefix
(``/24``) works too: added after the host's own address it is a secondary one,
and deleting a secondary address leaves the primary alone.

Needs root (CAP_NET_ADMIN, CAP_NET_RAW) and ``ip`` from iproute2. ``netns``
runs everything in a named network namespace (``ip netns exec``; the raw socket
is opened in it with ``meshorch.net.netns``) and is meant for tests that
drive namespaces from outside; an agent in its host's namespace leaves it None.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging
import re
import socket
import struct
import subprocess
from collections.abc import Sequence

from meshorch.errors import ConfigurationError, ServiceError
from meshorch.net.netns import in_netns

logger = logging.getLogger(__name__)

GARP_COUNT = 3
GARP_INTERVAL_S = 0.1
COMMAND_TIMEOUT_S = 10.0

ETH_P_ARP = 0x0806
ETH_P_IP = 0x0800
BROADCAST_MAC = b"\xff" * 6
ARP_REQUEST = 1
ARP_REPLY = 2
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.=+-]{1,15}$")


class VipError(ServiceError):
    """Claiming, releasing or announcing a VIP failed (the message has the command's error)."""


# -- pure helpers -------------------------------------------------------------------------


def parse_mac(text: str) -> bytes:
    """``aa:bb:cc:dd:ee:ff`` -> 6 bytes."""
    parts = text.strip().split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9a-fA-F]{2}", p) for p in parts):
        raise ValueError(f"not an Ethernet MAC address: {text!r}")
    return bytes(int(p, 16) for p in parts)


def garp_frame(mac: bytes, ip: ipaddress.IPv4Address, op: int) -> bytes:
    """A broadcast Ethernet frame with a gratuitous ARP ``op`` (request or reply) for ``ip``."""
    if len(mac) != 6:
        raise ValueError(f"a MAC address is 6 bytes, got {len(mac)}")
    if op not in (ARP_REQUEST, ARP_REPLY):
        raise ValueError(f"ARP op must be request (1) or reply (2), got {op}")
    ethernet = BROADCAST_MAC + mac + struct.pack("!H", ETH_P_ARP)
    # Target hardware address: zero in a request (RFC 5227 announcement), broadcast in a reply.
    target_mac = b"\x00" * 6 if op == ARP_REQUEST else BROADCAST_MAC
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op) + mac + ip.packed + target_mac + ip.packed
    return ethernet + arp


def addresses_from_ip_json(text: str) -> list[ipaddress.IPv4Interface | ipaddress.IPv6Interface]:
    """The addresses in `ip -j addr show dev DEV` output."""
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise VipError(f"`ip -j addr` output is not JSON: {exc}") from exc
    found: list[ipaddress.IPv4Interface | ipaddress.IPv6Interface] = []
    for link in data if isinstance(data, list) else []:
        for info in link.get("addr_info", []) if isinstance(link, dict) else []:
            try:
                found.append(ipaddress.ip_interface(f"{info['local']}/{info['prefixlen']}"))
            except (KeyError, TypeError, ValueError) as exc:
                raise VipError(f"bad addr_info entry in `ip -j addr` output: {info!r}") from exc
    return found


# -- adapter ------------------------------------------------------------------------------


class Vip:
    """One VIP (``address_cidr``, IPv4) on ``device``, optionally inside ``netns``."""

    def __init__(self, address_cidr: str, device: str, *, netns: str | None = None) -> None:
        try:
            iface = ipaddress.ip_interface(address_cidr)
        except ValueError as exc:
            raise ConfigurationError(f"VIP {address_cidr!r} is not an address/prefix") from exc
        if not isinstance(iface, ipaddress.IPv4Interface):
            # IPv6 would need unsolicited neighbour advertisements instead of ARP.
            raise ConfigurationError(f"VIP {address_cidr!r}: only IPv4 is supported")
        if not _IFNAME_RE.match(device):
            raise ConfigurationError(f"bad interface name {device!r}")
        if netns is not None and not _IFNAME_RE.match(netns.replace("/", "")):
            raise ConfigurationError(f"bad network namespace name {netns!r}")
        self.interface = iface
        self.address_cidr = str(iface)
        self.device = device
        self.netns = netns

    def __repr__(self) -> str:
        where = f" in {self.netns}" if self.netns else ""
        return f"Vip({self.address_cidr} on {self.device}{where})"

    async def claim(self) -> None:
        """Hold the VIP (idempotent) and announce it with gratuitous ARP."""
        await self.add()
        await self.announce()

    async def add(self) -> None:
        """Put the VIP on the device (idempotent), without announcing it: a caller can
        bind listeners to it first, then ``announce``."""
        await self._ip("addr", "replace", self.address_cidr, "dev", self.device)
        logger.info("claimed %r", self)

    async def release(self) -> None:
        """Stop holding the VIP; no-op if it is not on the device."""
        code, _, err = await self._run_ip("addr", "del", self.address_cidr, "dev", self.device)
        if code != 0 and not _address_absent(err):
            raise VipError(f"{self!r}: ip addr del failed: {err.strip() or code}")
        if code == 0:
            logger.info("released %r", self)

    async def held(self) -> bool:
        out = await self._ip("-j", "addr", "show", "dev", self.device)
        return self.interface in addresses_from_ip_json(out)

    async def announce(self, count: int = GARP_COUNT, interval_s: float = GARP_INTERVAL_S) -> None:
        """Broadcast ``count`` rounds of gratuitous ARP (request + reply), ``interval_s`` apart."""
        sock = await asyncio.to_thread(_packet_socket, self.device, self.netns)
        try:
            # getsockname() on a bound AF_PACKET socket gives the device's hardware address.
            mac = bytes(sock.getsockname()[4])[:6]
            ip = self.interface.ip
            assert isinstance(ip, ipaddress.IPv4Address)
            frames = [garp_frame(mac, ip, ARP_REQUEST), garp_frame(mac, ip, ARP_REPLY)]
            for round_ in range(count):
                if round_:
                    await asyncio.sleep(interval_s)
                for frame in frames:
                    sock.send(frame)
        except OSError as exc:
            raise VipError(f"{self!r}: sending gratuitous ARP failed: {exc}") from exc
        finally:
            sock.close()
        logger.debug("announced %r from %s (%d rounds)", self, mac.hex(":"), count)

    # -- command plumbing

    async def _run_ip(self, *args: str) -> tuple[int, str, str]:
        argv: Sequence[str] = ["ip", *args]
        if self.netns:
            argv = ["ip", "netns", "exec", self.netns, *argv]
        # subprocess.run in a thread, as netmesh.wireguard does: uvloop's subprocesses
        # inherit descriptors opened without close-on-exec.
        try:
            done = await asyncio.to_thread(
                subprocess.run,
                list(argv),
                stdin=subprocess.DEVNULL,
                capture_output=True,
                text=True,
                timeout=COMMAND_TIMEOUT_S,
                close_fds=True,
                check=False,
            )
        except subprocess.TimeoutExpired:
            raise VipError(f"{self!r}: {' '.join(argv)} timed out") from None
        except OSError as exc:
            raise VipError(f"{self!r}: cannot run {' '.join(argv)}: {exc}") from exc
        return done.returncode, done.stdout, done.stderr

    async def _ip(self, *args: str) -> str:
        code, out, err = await self._run_ip(*args)
        if code != 0:
            raise VipError(f"{self!r}: ip {' '.join(args)} failed: {err.strip() or code}")
        return out


def _address_absent(stderr: str) -> bool:
    # Older iproute2 passes on EADDRNOTAVAIL; newer kernels say it in extack.
    return "Cannot assign requested address" in stderr or "Address not found" in stderr


def _packet_socket(device: str, netns: str | None) -> socket.socket:
    """A raw ARP socket bound to ``device`` (in ``netns`` if given)."""
    if netns is None:
        return _bound_packet_socket(device)
    try:
        return in_netns(netns, lambda: _bound_packet_socket(device))
    except OSError as exc:
        raise VipError(f"cannot enter {netns} for a packet socket on {device}: {exc}") from exc


def _bound_packet_socket(device: str) -> socket.socket:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ARP))
    except OSError as exc:
        raise VipError(f"cannot open a packet socket (needs CAP_NET_RAW): {exc}") from exc
    try:
        sock.bind((device, ETH_P_ARP))
    except OSError as exc:
        sock.close()
        raise VipError(f"cannot bind a packet socket to {device}: {exc}") from exc
    return sock
