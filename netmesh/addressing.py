"""Overlay address plan of a site (pure).

The plan is called from inside a replicated state machine, so everything
here is deterministic: same network, same ``taken`` set, same answer on every
host. No clock, no randomness, no I/O.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterator, Set
from dataclasses import dataclass
from ipaddress import IPv4Address, IPv4Interface, IPv4Network

from netmesh.errors import (
    AddressInUseError,
    AddressPoolExhausted,
    InvalidAddressError,
)

DEFAULT_OVERLAY_NETWORK = IPv4Network("10.99.0.0/16")


@dataclass(frozen=True, slots=True)
class AddressPlan:
    """Host addresses of one site's overlay network.

    The network and broadcast addresses are never handed out. With
    ``reserve_first`` (the default) the first host address (e.g. 10.99.0.1)
    is kept back too, for a future gateway or service address, so it is
    not worth renumbering hosts later.
    """

    network: IPv4Network = DEFAULT_OVERLAY_NETWORK
    reserve_first: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.network, IPv4Network):
            raise InvalidAddressError(f"network must be an IPv4Network, got {self.network!r}")
        # /31 and /32 have no network/broadcast pair; a site needs more room anyway.
        if self.network.prefixlen > 30:
            raise InvalidAddressError(f"overlay network {self.network} is too small (max /30)")

    @classmethod
    def from_cidr(cls, cidr: str, *, reserve_first: bool = True) -> AddressPlan:
        """Build a plan from text such as ``"10.99.0.0/16"`` (host bits must be zero)."""
        try:
            network = IPv4Network(cidr, strict=True)
        except ValueError as exc:
            raise InvalidAddressError(f"not an IPv4 network: {cidr!r}: {exc}") from exc
        return cls(network=network, reserve_first=reserve_first)

    @property
    def reserved(self) -> frozenset[IPv4Address]:
        """Addresses of the network that are never allocated."""
        addrs = {self.network.network_address, self.network.broadcast_address}
        if self.reserve_first:
            addrs.add(self.network.network_address + 1)
        return frozenset(addrs)

    @property
    def capacity(self) -> int:
        """How many hosts the plan can hold."""
        return self.network.num_addresses - len(self.reserved)

    def _usable(self) -> Iterator[IPv4Address]:
        first = self.network.network_address + (2 if self.reserve_first else 1)
        last = self.network.broadcast_address - 1
        # Integer walk instead of network.hosts(): no per-call list on a /8.
        for value in range(int(first), int(last) + 1):
            yield IPv4Address(value)

    def contains(self, address: IPv4Address | str) -> bool:
        """True if ``address`` is an allocatable host address of this plan."""
        try:
            addr = _as_address(address)
        except InvalidAddressError:
            return False
        return addr in self.network and addr not in self.reserved

    def validate(self, address: IPv4Address | str, taken: Set[IPv4Address]) -> IPv4Address:
        """Check a proposed address; return it parsed, or raise.

        Raises InvalidAddressError (not ours, reserved, malformed) or
        AddressInUseError (already in ``taken``).
        """
        addr = _as_address(address)
        if addr not in self.network:
            raise InvalidAddressError(f"{addr} is outside the overlay network {self.network}")
        if addr in self.reserved:
            raise InvalidAddressError(f"{addr} is reserved in {self.network}")
        if addr in taken:
            raise AddressInUseError(f"{addr} is already allocated")
        return addr

    def allocate(self, taken: Set[IPv4Address]) -> IPv4Address:
        """Return the lowest usable address not in ``taken``.

        Raises AddressPoolExhausted when every usable address is taken.
        """
        # Only count addresses of this plan: stray entries must not fake exhaustion.
        in_plan = sum(1 for a in taken if a in self.network and a not in self.reserved)
        if in_plan >= self.capacity:
            raise AddressPoolExhausted(f"all {self.capacity} addresses of {self.network} are taken")
        for addr in self._usable():
            if addr not in taken:
                return addr
        raise AddressPoolExhausted(f"all {self.capacity} addresses of {self.network} are taken")

    def interface_cidr(self, address: IPv4Address | str) -> str:
        """Address with the plan's prefix, for the WireGuard interface (``10.99.0.2/16``)."""
        addr = _as_address(address)
        return str(IPv4Interface((addr, self.network.prefixlen)))

    @staticmethod
    def host_route(address: IPv4Address | str) -> str:
        """A peer's allowed-ips entry for its overlay address (``10.99.0.2/32``)."""
        return f"{_as_address(address)}/32"


def _as_address(address: IPv4Address | str) -> IPv4Address:
    if isinstance(address, IPv4Address):
        return address
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError as exc:
        raise InvalidAddressError(f"not an IP address: {address!r}") from exc
    if not isinstance(parsed, IPv4Address):
        raise InvalidAddressError(f"not an IPv4 address: {address!r}")
    return parsed
