"""Which resolver a container is given: the site DNS, where a container can reach it."""

from __future__ import annotations

from typing import Any, cast

from meshorch.net.app_network import DNS_ZONE, AppNetwork, NetworkSettings


def network(dns: str) -> AppNetwork:
    # Only the settings matter here: no state, no members.
    return AppNetwork(
        cast(Any, None),
        cast(Any, None),
        host_id="h1",
        overlay_ip="10.99.0.1",
        runtime="podman",
        settings=NetworkSettings(dns=dns),
    )


def test_a_container_gets_the_site_dns_unless_it_listens_on_loopback() -> None:
    assert network("auto").dns_servers("podman") == ("10.99.0.1",)
    assert network("auto").dns_search("podman") == (DNS_ZONE,)
    assert network("10.1.0.11:53").dns_servers("podman") == ("10.1.0.11",)
    # A container's loopback is its own network's: there it would ask itself.
    assert network("127.0.0.1:53").dns_servers("podman") == ()
    assert network("127.0.0.1:53").dns_search("podman") == ()
    assert network("off").dns_servers("podman") == ()
    assert network("auto").dns_servers("process") == ()  # the process runtime: the host's
