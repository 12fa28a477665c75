"""The per-report work of the hub is O(1) in the number of sites: the deadline structure,
the per-site alert book, the incremental alert pass and the vault's pending set."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from central_hub.alerting import Alerting
from central_hub.alerts import AlertBook, Condition, Thresholds
from central_hub.deadlines import Deadlines
from central_hub.ledger import Ledger
from central_hub.vault import parse_report_secrets
from central_hub.vault import parse_secret_request as secret
from central_hub.vault_service import VaultService
from meshorch.fleet.delta import parse
from tests.hub.test_parts import Clock, admin, open_ledger, parts, report


def test_deadlines_give_each_expired_key_once_in_order() -> None:
    d: Deadlines[str] = Deadlines()
    d.schedule("a", 10.0)
    d.schedule("b", 5.0)
    d.schedule("c", 20.0)
    assert d.expired(4.9) == []
    assert d.expired(10.0) == ["b", "a"]
    assert d.expired(100.0) == ["c"]
    assert d.expired(1000.0) == [] and len(d) == 0


def test_deadlines_move_later_and_earlier_without_duplicates() -> None:
    d: Deadlines[str] = Deadlines()
    d.schedule("a", 10.0)
    for n in range(100):  # a site reporting often: its deadline moves later each time
        d.schedule("a", 10.0 + n)
    assert len(d._heap) == 1  # later moves push nothing
    assert d.expired(50.0) == []  # the old entry came up and went back at 109
    assert d.expired(109.0) == ["a"]
    d.schedule("b", 30.0)
    d.schedule("b", 3.0)  # earlier: a new entry, the later one is skipped
    assert d.expired(3.0) == ["b"]
    assert d.expired(100.0) == []
    d.schedule("c", 1.0)
    d.cancel("c")
    assert d.expired(100.0) == [] and "c" not in d


def test_deadlines_limit_leaves_the_rest_for_the_next_pass() -> None:
    d: Deadlines[int] = Deadlines()
    for n in range(10):
        d.schedule(n, float(n))
    assert d.expired(100.0, limit=4) == [0, 1, 2, 3]
    assert d.expired(100.0) == [4, 5, 6, 7, 8, 9]


def test_update_site_touches_only_that_sites_alerts() -> None:
    book = AlertBook()
    a = Condition("site_offline:a", "site_offline", "a", "a is not heard from")
    b = Condition("site_offline:b", "site_offline", "b", "b is not heard from")
    book.update([a, b], 1.0)
    changes = book.update_site("a", [], 2.0, heard=True)
    assert [c.id for c in changes.cleared] == ["site_offline:a"] and not changes.fired
    assert list(book.active) == ["site_offline:b"]
    changes = book.update_site("a", [a], 3.0, heard=True)
    assert [c.id for c in changes.fired] == ["site_offline:a"]
    assert sorted(book.active) == ["site_offline:a", "site_offline:b"]


class CountingSites:
    """``Sites`` with a count of the sites the alerts read."""

    def __init__(self, sites: Any) -> None:
        self.inner = sites
        self.listeners = sites.listeners
        self.read: list[str] = []

    def summary(self, site_id: str) -> dict[str, Any] | None:
        self.read.append(site_id)
        return self.inner.summary(site_id)  # type: ignore[no-any-return]

    def site_ids(self) -> list[str]:
        return self.inner.site_ids()  # type: ignore[no-any-return]


@pytest.fixture
async def ledger(tmp_path: Path, clock: Clock) -> AsyncIterator[Ledger]:
    ledger = open_ledger(tmp_path / "hub", clock)
    yield ledger
    await ledger.drain()
    await ledger.close_store()


@pytest.fixture
def clock() -> Clock:
    return Clock()


async def test_an_alert_pass_reads_only_the_sites_that_changed_or_fell_due(
    ledger: Ledger, clock: Clock
) -> None:
    _, reports, _, sites = parts(ledger)
    counting = CountingSites(sites)
    alerting = Alerting(ledger, reports, counting, Thresholds(), hold_s=30.0, stale_s=30.0)
    for n in range(50):
        await sites.register_site(f"s{n}", {}, "ab" * 32)
        await reports.record(f"s{n}", report(f"s{n}", ledger.head.version, clock()))
    alerting.restore(ledger.store, started_at=clock())
    alerting.refresh()  # the first pass looks at every site once
    assert len(counting.read) == 50 and alerting.book.active == {}

    counting.read.clear()
    alerting.refresh()
    assert counting.read == []  # nothing changed, nothing due: O(0)
    clock.now += 3
    await reports.record("s7", report("s7", ledger.head.version, clock()))
    alerting.refresh()
    assert counting.read == []  # the same report again: a renewal, nothing to evaluate
    failed = {"pos": {"version": "1", "desired": 1, "ready": 0, "state": "failed"}}
    await reports.record("s7", report("s7", ledger.head.version, clock(), apps=failed))
    alerting.refresh()
    assert counting.read == ["s7"]  # one report that moved something: one site evaluated
    assert sorted(alerting.book.active) == ["app_unhealthy:s7:pos"]
    await reports.record("s7", report("s7", ledger.head.version, clock()))
    alerting.refresh()
    assert alerting.book.active == {}
    counting.read.clear()

    counting.read.clear()
    clock.now += 20
    for n in range(10):  # these ten keep reporting; the others go silent
        await reports.record(f"s{n}", report(f"s{n}", ledger.head.version, clock()))
    alerting.refresh()
    assert sorted(counting.read) == sorted(f"s{n}" for n in range(10))
    counting.read.clear()
    clock.now += 15  # 38 s after the others' last report: past the 30 s stale window
    alerting.refresh()
    assert len(counting.read) == 40  # exactly the sites whose deadline passed
    assert sorted(alerting.book.active) == sorted(f"site_offline:s{n}" for n in range(10, 50))
    counting.read.clear()
    alerting.refresh()
    assert counting.read == []  # offline sites wait for a report, no deadline

    await reports.record("s20", report("s20", ledger.head.version, clock()))
    alerting.refresh()
    assert counting.read == ["s20"] and "site_offline:s20" not in alerting.book.active
    await sites.delete_site("s21")
    alerting.refresh()
    assert "site_offline:s21" not in alerting.book.active


async def test_a_site_behind_the_head_lags_when_its_deadline_passes(
    ledger: Ledger, clock: Clock
) -> None:
    _, reports, _, sites = parts(ledger)
    await sites.register_site("s1", {}, "ab" * 32)
    root = admin(clock())
    await sites.decommission_site(root, "s1")  # a delta: the head is now 1
    alerting = Alerting(ledger, reports, sites, Thresholds(lag_s=60.0), hold_s=30.0)
    alerting.restore(ledger.store, started_at=clock())
    for _ in range(4):  # it keeps reporting version 0
        await reports.record("s1", report("s1", 0, clock()))
        alerting.refresh()
        clock.now += 20
    assert list(alerting.book.active) == ["site_lagging:s1"]


async def test_vault_checks_nothing_per_report_when_no_secrets_key_changed(
    ledger: Ledger, clock: Clock, tmp_path: Path
) -> None:
    _, reports, _, sites = parts(ledger)
    vault = VaultService(ledger, reports)
    vault.open()
    for n in range(5):
        await sites.register_site(f"s{n}", {"zone": "a"}, "ab" * 32)
        sites.listeners.append(vault.site_changed)
    assert not vault.needs_distribution()  # the first look: every site, nothing to send
    status, _ = await vault.put_secret(admin(clock()), secret({"name": "db", "value": "pw"}))
    assert status == 201

    def no_full_scan(db: str) -> list[Any]:
        raise AssertionError(f"a full scan of {db} per report")

    real = ledger.store.values_json
    ledger.store.values_json = no_full_scan  # type: ignore[method-assign]
    try:
        for _ in range(3):
            await reports.record("s1", report("s1", 0, clock()))  # no secrets key: no change
            assert not vault.needs_distribution()
        key = "ab" * 32
        await reports.record("s2", {**report("s2", 0, clock()), **parse_report_secrets(
            {"secrets_public_key": key})})  # fmt: skip
        assert vault.needs_distribution()  # s2 alone is looked at
        await ledger.transact(vault.distribute)
        assert not vault.needs_distribution()
    finally:
        ledger.store.values_json = real  # type: ignore[method-assign]
    [(_, envelope)] = ledger.deltas_after(0, 10)
    delta = parse(envelope)[0]
    assert delta.ops[0]["op"] == "secret.put" and delta.target.sites == frozenset({"s2"})
