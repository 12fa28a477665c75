"""Overlay address plan: lowest free, never duplicate, reserved, exhaustion."""

from __future__ import annotations

import random
from ipaddress import IPv4Address, IPv4Network

import pytest

from netmesh import (
    AddressInUseError,
    AddressPlan,
    AddressPoolExhausted,
    InvalidAddressError,
)


def test_default_plan_starts_after_reserved_first() -> None:
    plan = AddressPlan()
    assert plan.network == IPv4Network("10.99.0.0/16")
    assert plan.allocate(set()) == IPv4Address("10.99.0.2")


def test_without_reserved_first() -> None:
    plan = AddressPlan(IPv4Network("10.1.0.0/24"), reserve_first=False)
    assert plan.allocate(set()) == IPv4Address("10.1.0.1")
    assert plan.capacity == 254


def test_allocation_is_lowest_free_and_fills_holes() -> None:
    plan = AddressPlan.from_cidr("10.5.0.0/24")
    taken = {IPv4Address("10.5.0.2"), IPv4Address("10.5.0.3"), IPv4Address("10.5.0.5")}
    assert plan.allocate(taken) == IPv4Address("10.5.0.4")


def test_sequential_allocation_never_duplicates_then_exhausts() -> None:
    plan = AddressPlan.from_cidr("192.168.50.0/28")
    taken: set[IPv4Address] = set()
    for _ in range(plan.capacity):
        addr = plan.allocate(taken)
        assert addr not in taken
        assert plan.contains(addr)
        taken.add(addr)
    assert len(taken) == 13  # 16 - network - broadcast - reserved first
    assert IPv4Address("192.168.50.0") not in taken
    assert IPv4Address("192.168.50.1") not in taken
    assert IPv4Address("192.168.50.15") not in taken
    with pytest.raises(AddressPoolExhausted):
        plan.allocate(taken)


def test_foreign_taken_addresses_do_not_fake_exhaustion() -> None:
    plan = AddressPlan.from_cidr("10.0.0.0/30")  # one usable address: 10.0.0.2
    stray = {IPv4Address("172.16.0.1"), IPv4Address("10.0.0.1"), IPv4Address("10.0.0.3")}
    assert plan.allocate(stray) == IPv4Address("10.0.0.2")


def test_matches_brute_force_reference() -> None:
    plan = AddressPlan.from_cidr("10.9.0.0/26")
    usable = [IPv4Address(int(IPv4Address("10.9.0.0")) + i) for i in range(2, 63)]
    rng = random.Random(1234)
    for _ in range(200):
        taken = set(rng.sample(usable, rng.randrange(0, len(usable))))
        expected = min(a for a in usable if a not in taken)
        assert plan.allocate(taken) == expected
        assert plan.allocate(set(taken)) == expected  # deterministic


@pytest.mark.parametrize(
    ("address", "error"),
    [
        ("10.99.0.0", InvalidAddressError),
        ("10.99.0.1", InvalidAddressError),
        ("10.99.255.255", InvalidAddressError),
        ("10.98.0.7", InvalidAddressError),
        ("not-an-ip", InvalidAddressError),
        ("fd00::1", InvalidAddressError),
        ("10.99.0.7", AddressInUseError),
    ],
)
def test_validate_rejects(address: str, error: type[Exception]) -> None:
    plan = AddressPlan()
    with pytest.raises(error):
        plan.validate(address, {IPv4Address("10.99.0.7")})


def test_validate_accepts_free_address() -> None:
    plan = AddressPlan()
    assert plan.validate("10.99.3.4", {IPv4Address("10.99.0.7")}) == IPv4Address("10.99.3.4")


def test_contains() -> None:
    plan = AddressPlan()
    assert plan.contains("10.99.0.2")
    assert plan.contains(IPv4Address("10.99.254.254"))
    assert not plan.contains("10.99.0.1")
    assert not plan.contains("10.100.0.2")
    assert not plan.contains("garbage")


def test_bad_networks_rejected() -> None:
    with pytest.raises(InvalidAddressError):
        AddressPlan.from_cidr("10.99.0.1/16")  # host bits set
    with pytest.raises(InvalidAddressError):
        AddressPlan.from_cidr("10.0.0.0/31")
    with pytest.raises(InvalidAddressError):
        AddressPlan.from_cidr("nonsense")


def test_interface_cidr_and_host_route() -> None:
    plan = AddressPlan()
    assert plan.interface_cidr("10.99.0.2") == "10.99.0.2/16"
    assert plan.host_route("10.99.0.2") == "10.99.0.2/32"
