"""WireGuard mesh substrate: keys, overlay addresses, interface reconciler, mDNS discovery.

Knows nothing of applications. The pieces:

- ``keys``: Curve25519 key pairs in WireGuard's base64, key files, sealed boxes,
  fingerprints for pinning.
- ``addressing``: the pure, deterministic overlay address plan of a site.
- ``wireguard``: ``plan_changes`` (pure diff of observed vs desired interface)
  and ``WireGuardInterface`` (applies it with ``wg``/``ip``; kernel WireGuard
  or wireguard-go).
- ``discovery``: ``SiteDiscovery``, zeroconf advertising and browsing of the
  agents of one site.

Every error is a ``NetmeshError``; see ``netmesh.errors`` for the tree.
"""

from typing import TYPE_CHECKING

from netmesh.addressing import DEFAULT_OVERLAY_NETWORK, AddressPlan
from netmesh.errors import (
    AddressError,
    AddressInUseError,
    AddressPoolExhausted,
    BackendUnavailableError,
    CommandError,
    DiscoveryError,
    DiscoveryTimeout,
    InvalidAddressError,
    InvalidKeyError,
    KeyFileError,
    KeyMaterialError,
    NetmeshError,
    RemoteRecordError,
    StateParseError,
    UnsealError,
    WireGuardError,
)
from netmesh.keys import (
    KeyPair,
    fingerprint,
    generate_keypair,
    keypair_from_private,
    load_or_create_keypair,
    public_key_from_private,
    seal,
    unseal,
)

if TYPE_CHECKING:
    from netmesh.discovery import (
        PROTOCOL_VERSION,
        SERVICE_TYPE,
        DiscoveredPeer,
        PeerTable,
        SiteDiscovery,
        parse_peer_record,
        record_properties,
    )
    from netmesh.wireguard import (
        Action,
        AddAddress,
        AddPeer,
        CreateInterface,
        InterfaceSpec,
        InterfaceState,
        PeerSpec,
        PeerState,
        PeerStatus,
        RemoveAddress,
        RemovePeer,
        SetListenPort,
        SetPrivateKey,
        SetUp,
        UpdatePeer,
        WireGuardInterface,
        interface_state,
        parse_ip_addr_json,
        parse_wg_dump,
        plan_changes,
    )

# Discovery is imported when first used: zeroconf is heavy and only mesh mode browses mDNS.
_DISCOVERY_NAMES = frozenset(
    {
        "PROTOCOL_VERSION",
        "SERVICE_TYPE",
        "DiscoveredPeer",
        "PeerTable",
        "SiteDiscovery",
        "parse_peer_record",
        "record_properties",
    }
)


# The interface reconciler too: only mesh mode has a WireGuard interface.
_WIREGUARD_NAMES = frozenset(
    {
        "Action",
        "AddAddress",
        "AddPeer",
        "CreateInterface",
        "InterfaceSpec",
        "InterfaceState",
        "PeerSpec",
        "PeerState",
        "PeerStatus",
        "RemoveAddress",
        "RemovePeer",
        "SetListenPort",
        "SetPrivateKey",
        "SetUp",
        "UpdatePeer",
        "WireGuardInterface",
        "interface_state",
        "parse_ip_addr_json",
        "parse_wg_dump",
        "plan_changes",
    }
)


def __getattr__(name: str) -> object:
    if name in _DISCOVERY_NAMES:
        from netmesh import discovery

        return getattr(discovery, name)
    if name in _WIREGUARD_NAMES:
        from netmesh import wireguard

        return getattr(wireguard, name)
    raise AttributeError(f"module 'netmesh' has no attribute {name!r}")


__all__ = [
    "DEFAULT_OVERLAY_NETWORK",
    "PROTOCOL_VERSION",
    "SERVICE_TYPE",
    "Action",
    "AddAddress",
    "AddPeer",
    "AddressError",
    "AddressInUseError",
    "AddressPlan",
    "AddressPoolExhausted",
    "BackendUnavailableError",
    "CommandError",
    "CreateInterface",
    "DiscoveredPeer",
    "DiscoveryError",
    "DiscoveryTimeout",
    "InterfaceSpec",
    "InterfaceState",
    "InvalidAddressError",
    "InvalidKeyError",
    "KeyFileError",
    "KeyMaterialError",
    "KeyPair",
    "NetmeshError",
    "PeerSpec",
    "PeerState",
    "PeerStatus",
    "PeerTable",
    "RemoteRecordError",
    "RemoveAddress",
    "RemovePeer",
    "SetListenPort",
    "SetPrivateKey",
    "SetUp",
    "SiteDiscovery",
    "StateParseError",
    "UnsealError",
    "UpdatePeer",
    "WireGuardError",
    "WireGuardInterface",
    "fingerprint",
    "generate_keypair",
    "interface_state",
    "keypair_from_private",
    "load_or_create_keypair",
    "parse_ip_addr_json",
    "parse_peer_record",
    "parse_wg_dump",
    "plan_changes",
    "public_key_from_private",
    "record_properties",
    "seal",
    "unseal",
]
