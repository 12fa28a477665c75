"""Protocol versions of a site, and the features that wait for every host (pure).

Hosts of one site may run different meshorch releases while an upgrade goes host by host
(docs/upgrades.md). Each host records in the replicated state the site protocol it speaks
(``PROTOCOL``); a feature whose messages an older host cannot understand is used only once
every host speaks at least the protocol that brought it (``require``). A host that does not
record a protocol speaks 1.

Protocols:

    1  the first release
    2  Raft ``Append`` operations (event streams, docs/streams.md): a host on 1 cannot decode
       them and would skip the entry, so its state would drift from the others'
    3  peer requests signed by the sending host (``meshorch.state.peer_auth``): until every
       host signs, the peer routes still take unsigned requests
    4  client sessions (``raft.sessions``): KV writes carry a Raft ``Session`` operation,
       which a host on 3 cannot decode; until every host speaks 4 they go without one
    5  format 2 fleet deltas (per-site views, ``meshorch.fleet.delta``): a host on 4 refuses
       them, so the hub issues them only once every host of every site reports 5
       (``central_hub.deltaformat``); nothing on the site waits for it
    6  images pulled from a registry (``meshorch.images.registry``): their catalogue record
       names several blobs, which a host on 5 would take for one archive; pulls wait
    7  Merkle targets of fleet deltas (``meshorch.fleet.merkle``): a host on 6 refuses
       them, so the hub names many sites by a Merkle root only once every host of every
       site reports 7 (``central_hub.deltaformat``); nothing on the site waits for it
"""

from __future__ import annotations

from collections.abc import Mapping

from meshorch.errors import ServiceError

PROTOCOL = 7
FEATURES: dict[str, int] = {
    "streams": 2,
    "peer_auth": 3,
    "sessions": 4,
    "delta_v2": 5,
    "oci_images": 6,
    "merkle_targets": 7,
}


class FeatureUnavailable(ServiceError):
    """A feature some host of the site does not support yet (an upgrade is under way)."""

    code = "upgrade_in_progress"


def site_protocol(protocols: Mapping[str, int]) -> int:
    """The protocol every host speaks (hosts -> the protocol each recorded)."""
    return min(protocols.values(), default=PROTOCOL)


def require(feature: str, protocols: Mapping[str, int]) -> None:
    """Raise ``FeatureUnavailable`` naming the hosts that hold ``feature`` back."""
    needed = FEATURES[feature]
    behind = sorted(host for host, protocol in protocols.items() if protocol < needed)
    if behind:
        raise FeatureUnavailable(
            f"{feature} needs every host on site protocol {needed}; "
            f"{', '.join(behind)} still run an older release (upgrade in progress?)"
        )
