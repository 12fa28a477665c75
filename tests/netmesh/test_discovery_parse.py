"""TXT record parsing and the pure PeerTable behind SiteDiscovery."""

from __future__ import annotations

import pytest

from netmesh import (
    DiscoveredPeer,
    PeerTable,
    RemoteRecordError,
    generate_keypair,
    parse_peer_record,
    record_properties,
)
from netmesh.discovery import service_instance_name

PK = generate_keypair().public_key_b64


def props(**overrides: str | None) -> dict[bytes, bytes | None]:
    base: dict[str, str | None] = {
        "site": "alpha",
        "host": "h1",
        "join": "192.168.10.11:7100",
        "pk": PK,
        "v": "1",
    }
    base.update(overrides)
    return {k.encode(): (None if v is None else v.encode()) for k, v in base.items()}


def test_parse_good_record() -> None:
    peer = parse_peer_record(props(), addresses=["192.168.10.11"], service_name="h1@alpha.x")
    assert peer == DiscoveredPeer(
        site="alpha",
        host="h1",
        join_endpoint="192.168.10.11:7100",
        public_key_b64=PK,
        version="1",
        addresses=("192.168.10.11",),
        service_name="h1@alpha.x",
    )


def test_record_properties_round_trip() -> None:
    made = record_properties(site="beta", host="h-2", join_endpoint="10.0.0.2:1", public_key_b64=PK)
    peer = parse_peer_record({k.encode(): v.encode() for k, v in made.items()})
    assert (peer.site, peer.host, peer.join_endpoint, peer.public_key_b64) == (
        "beta",
        "h-2",
        "10.0.0.2:1",
        PK,
    )


def test_extra_properties_are_ignored() -> None:
    extra = props()
    extra[b"future"] = b"whatever"
    assert parse_peer_record(extra).host == "h1"


@pytest.mark.parametrize(
    "overrides",
    [
        {"pk": None},
        {"site": None},
        {"v": "2"},
        {"v": None},
        {"join": "192.168.10.11"},
        {"join": "name.local:7100"},
        {"join": "192.168.10.11:99999"},
        {"pk": "AAAA"},
        {"host": "bad host"},
        {"host": ""},
        {"site": "-alpha"},
    ],
)
def test_malformed_records_raise(overrides: dict[str, str | None]) -> None:
    with pytest.raises(RemoteRecordError):
        parse_peer_record(props(**overrides))


def test_non_utf8_is_malformed() -> None:
    bad = props()
    bad[b"host"] = b"\xff\xfe"
    with pytest.raises(RemoteRecordError):
        parse_peer_record(bad)


def test_table_keeps_own_site_only_and_counts() -> None:
    table = PeerTable(site="alpha", self_host="h1")
    assert table.observe("h1@alpha", props()) is not None  # ourselves: stored, not listed
    assert table.observe("h2@alpha", props(host="h2")) is not None
    assert table.observe("h3@beta", props(site="beta", host="h3")) is None
    assert table.observe("junk", props(pk="garbage")) is None
    assert set(table.peers()) == {"h2"}
    assert table.foreign_count == 1
    assert table.malformed_count == 1


def test_table_update_remove_and_site_change() -> None:
    table = PeerTable(site="alpha")
    table.observe("h2@alpha", props(host="h2"))
    table.observe("h2@alpha", props(host="h2", join="192.168.10.12:7100"))
    assert table.peers()["h2"].join_endpoint == "192.168.10.12:7100"
    # A record that turns malformed or moves to another site is dropped.
    table.observe("h2@alpha", props(host="h2", site="beta"))
    assert table.peers() == {}
    table.observe("h3@alpha", props(host="h3"))
    assert table.remove("h3@alpha") is not None
    assert table.remove("h3@alpha") is None
    assert table.peers() == {}


def test_table_duplicate_host_is_order_independent() -> None:
    a, b = PeerTable(site="alpha"), PeerTable(site="alpha")
    first = props(host="h2", join="192.168.10.2:1")
    second = props(host="h2", join="192.168.10.3:1")
    a.observe("x1", first)
    a.observe("x2", second)
    b.observe("x2", second)
    b.observe("x1", first)
    assert a.peers() == b.peers()


def test_service_instance_name() -> None:
    assert service_instance_name("alpha", "h1") == "h1@alpha._meshorch._tcp.local."
