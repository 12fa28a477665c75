"""Fleet alerts: the pure rules, then a real hub firing, acknowledging and clearing them
from real (signed) site reports, keeping them across restarts; and the hub's Prometheus
/metrics."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from central_hub import Hub
from central_hub.alerts import (
    Alert,
    AlertBook,
    Condition,
    Thresholds,
    conditions,
    record_key,
)
from central_hub.errors import BadStoredRecord
from central_hub.service import STORE_DIR
from central_hub.store import Store, put_json
from tests.hub.conftest import Clock, admin_token, hub_config
from tests.hub.helpers import Operator, Site, healthy, spec_text


def summary(
    site: str, health: str = "healthy", applied: int = 5, seen: float | None = 1.0
) -> dict[str, Any]:
    return {"id": site, "health": health, "applied_version": applied, "last_seen": seen}


def report(disk: float = 40.0, memory: float = 50.0, app_state: str = "healthy") -> dict[str, Any]:
    return {
        "apps": {"web": {"state": app_state, "message": "probe failed"}},
        "hosts": [
            {"host_id": "h1", "resources": {"disk_used_pct": disk, "memory_used_pct": memory}}
        ],
    }


def kinds(found: list[Condition]) -> list[str]:
    return sorted(c.id for c in found)


def test_conditions_from_the_fleet_view() -> None:
    t = Thresholds(disk_used_pct=90, memory_used_pct=95, lag_s=60)
    assert conditions([summary("s1")], {"s1": report()}, {}, 5, {}, 100.0, t) == []
    assert kinds(conditions([summary("s1", "unreachable")], {}, {}, 5, {}, 100.0, t)) == [
        "site_offline:s1"
    ]
    assert kinds(conditions([summary("s1", seen=None)], {}, {}, 5, {}, 100.0, t)) == [
        "site_offline:s1"
    ]
    # Never heard from since it was registered: awaiting its first report, not "silent".
    [waiting] = conditions([summary("s1", "unknown", seen=None)], {}, {}, 5, {}, 100.0, t)
    assert waiting.message == "site s1 is awaiting its first report"
    [silent] = conditions([summary("s1", "unreachable")], {}, {}, 5, {}, 100.0, t)
    assert silent.message == "site s1 is not heard from"
    found = conditions(
        [summary("s1")], {"s1": report(disk=91, memory=96, app_state="failed")}, {"web": "acme"}, 5,
        {}, 100.0, t,
    )  # fmt: skip
    assert kinds(found) == ["app_unhealthy:s1:web", "host_disk:s1:h1", "host_memory:s1:h1"]
    assert next(c for c in found if c.kind == "app_unhealthy").tenant == "acme"
    # Behind the head: only once it has lasted lag_s.
    assert conditions([summary("s1", applied=3)], {}, {}, 5, {"s1": 50.0}, 100.0, t) == []
    lagging = conditions([summary("s1", applied=3)], {}, {}, 5, {"s1": 30.0}, 100.0, t)
    assert kinds(lagging) == ["site_lagging:s1"] and "behind for 70 s" in lagging[0].message


def test_alerts_fire_stay_acknowledged_and_clear() -> None:
    book = AlertBook()
    disk = Condition("host_disk:s1:h1", "host_disk", "s1", "disk 91%")
    book.update([disk], now=10.0)
    assert [a.since for a in book.listing()] == [10.0]
    assert book.acknowledge("host_disk:s1:h1", "op1", 11.0) is not None
    assert book.acknowledge("nope", "op1", 11.0) is None
    book.update([Condition("host_disk:s1:h1", "host_disk", "s1", "disk 93%")], now=12.0)
    (alert,) = book.listing()
    assert alert.since == 10.0 and alert.acknowledged_by == "op1" and alert.message == "disk 93%"
    book.update([], now=13.0)
    assert book.active == {} and book.listing()[0].cleared_at == 13.0
    book.update([disk], now=20.0)  # back again: a new firing, not acknowledged
    assert book.listing()[0].since == 20.0 and book.listing()[0].acknowledged_by is None


def test_updates_say_what_to_store_and_restored_alerts_wait_for_news() -> None:
    book = AlertBook()
    disk = Condition("host_disk:s1:h1", "host_disk", "s1", "disk 91%")
    changes = book.update([disk], now=10.0)
    assert [a.id for a in changes.fired] == ["host_disk:s1:h1"] and changes.cleared == []
    assert book.update([disk], now=11.0) == type(changes)([], [])  # nothing new to store
    acked = book.acknowledge(disk.id, "op1", 12.0)
    assert acked is not None
    assert Alert.from_record(disk.id, acked.to_record()) == acked
    changes = book.update([], now=13.0)
    assert [a.id for a in changes.cleared] == [disk.id] and changes.fired == []

    # After a restart: kept while its condition holds, or while the hub has not heard
    # from its site and the hold lasts; cleared once it knows.
    offline = Alert("site_offline:s2", "site_offline", "s2", "s2 silent", 5.0, None, "op1", 6.0)
    book = AlertBook()
    book.restore([acked, offline], hold_until=100.0)
    assert book.update([disk], now=50.0).cleared == []  # disk holds; s2 not heard yet
    assert book.active[disk.id] == acked  # same since, still acknowledged
    assert [a.id for a in book.update([disk], 60.0, heard={"s2"}).cleared] == [offline.id]
    book.restore([offline], hold_until=100.0)
    assert [a.id for a in book.update([disk], 100.0).cleared] == [offline.id]  # hold over
    book.update([], now=101.0)
    assert book.active == {}


def test_a_stored_record_is_checked() -> None:
    good = Alert("host_disk:s1:h1", "host_disk", "s1", "m", 1.0).to_record()
    for key, bad in (
        ("host_disk:s1:h1", "garbage"),
        ("host_disk:s1:h1", {**good, "v": 99}),
        ("host_disk:s1:h1", {**good, "since": "yesterday"}),
        ("host_disk:s1:h1", {**good, "acknowledged_by": 7}),
        ("host_disk:s1:h1", {k: v for k, v in good.items() if k != "kind"}),
        ("other", good),
    ):
        with pytest.raises(BadStoredRecord):
            Alert.from_record(key, bad)
    # A very long id (host ids may be) is stored under a digest: LMDB keys are short.
    long = Alert("host_disk:s1:" + "h" * 600, "host_disk", "s1", "m", 1.0)
    key = record_key(long.id)
    assert key.startswith("sha256:") and len(key) < 100 and record_key("host_disk:s1:h1") != key
    assert Alert.from_record(key, long.to_record()) == long


async def alert_ids(admin: Operator, token: str | None = None) -> dict[str, dict[str, Any]]:
    status, answer = await admin.call("GET", "/v1/alerts", token=token)
    assert status == 200, answer
    return {a["id"]: a for a in answer["alerts"] if a["active"]}


async def test_hub_alerts_from_site_reports(
    clocked_hub: Hub, clock: Clock, session: aiohttp.ClientSession
) -> None:
    hub = clocked_hub
    admin = Operator(session, hub.url, hub.admin_token_path.read_text().strip())
    site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
    await admin.ok("POST", "/v1/sites", {"id": "shop-1", "public_key": site.public_key}, 201)
    assert "site_offline:shop-1" in await alert_ids(admin)  # registered, never heard from
    use = {"disk_used_pct": 97.0, "memory_used_pct": 20.0, "at": 1.0}
    hosts = [{"host_id": "h1", "alive": True, "instances": [], "resources": use}]
    status, answer = await site.report({}, hosts=hosts)
    assert status == 200, answer
    active = await alert_ids(admin)
    assert set(active) == {"host_disk:shop-1:h1"}
    assert "97% used" in active["host_disk:shop-1:h1"]["message"]

    status, acked = await admin.call("POST", "/v1/alerts/host_disk:shop-1:h1/ack")
    assert status == 200 and acked["acknowledged"]
    viewer = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "*"}, 201)
    status, _ = await admin.call(
        "POST", "/v1/alerts/host_disk:shop-1:h1/ack", token=viewer["token"]
    )
    assert status == 403
    status, _ = await admin.call("POST", "/v1/alerts/unknown/ack")
    assert status == 404

    use["disk_used_pct"] = 50.0
    await site.report({}, hosts=hosts)
    assert await alert_ids(admin) == {}
    status, answer = await admin.call("GET", "/v1/alerts")
    cleared = [a for a in answer["alerts"] if a["id"] == "host_disk:shop-1:h1"]
    assert cleared and not cleared[0]["active"] and cleared[0]["cleared_at"] is not None

    # An unhealthy app is its tenant's alert; a tenant token sees only its own.
    await admin.ok("POST", "/v1/tenants", {"id": "acme"}, 201)
    await admin.ok("POST", "/v1/apps", {"spec": spec_text("web"), "tenant": "acme"}, 202)
    failed = {**healthy("1.0"), "state": "failed", "message": "crash loop"}
    await site.report({"web": failed}, hosts=hosts)
    assert "app_unhealthy:shop-1:web" in await alert_ids(admin)
    acme = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "acme"}, 201)
    other = await admin.ok("POST", "/v1/tokens", {"role": "viewer", "tenant": "default"}, 201)
    assert set(await alert_ids(admin, acme["token"])) == {"app_unhealthy:shop-1:web"}
    assert await alert_ids(admin, other["token"]) == {}

    # Silent past the stale window: offline again.
    clock.advance(hub.config.site_stale_s + 1)
    assert "site_offline:shop-1" in await alert_ids(admin)

    async with session.get(hub.url + "/metrics") as response:
        assert response.status == 200
        text = await response.text()
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }
    assert samples[("meshorch_hub_delta_head", ())] == hub.head.version
    assert samples[("meshorch_hub_alerts_active", (("kind", "site_offline"),))] == 1
    assert any(name == "meshorch_hub_api_request_seconds_count" for name, _ in samples)


async def test_acknowledgements_survive_a_restart(
    tmp_path: Path, session: aiohttp.ClientSession
) -> None:
    data_dir = tmp_path / "hub"
    disk, offline, memory = "host_disk:shop-1:h1", "site_offline:shop-2", "host_memory:shop-1:h1"
    long_host = "h" * 450  # its alert's id is too long for an LMDB key
    long_disk = f"host_disk:shop-1:{long_host}"
    use = {"disk_used_pct": 97.0, "memory_used_pct": 99.0, "at": 1.0}
    full = {"disk_used_pct": 99.0, "at": 1.0}
    hosts = [
        {"host_id": "h1", "alive": True, "instances": [], "resources": use},
        {"host_id": long_host, "alive": True, "instances": [], "resources": full},
    ]
    async with Hub(hub_config(data_dir)) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        site = Site(session, hub.url, "shop-1", hub.fleet, hub.root_key)
        await admin.ok("POST", "/v1/sites", {"id": "shop-1", "public_key": site.public_key}, 201)
        await admin.ok("POST", "/v1/sites", {"id": "shop-2"}, 201)  # never heard from
        await site.report({}, hosts=hosts)
        assert set(await alert_ids(admin)) == {disk, offline, memory, long_disk}
        use["memory_used_pct"] = 20.0  # memory clears before the restart
        await site.report({}, hosts=hosts)
        first = await alert_ids(admin)
        assert set(first) == {disk, offline, long_disk}
        for alert_id in (disk, offline, long_disk):
            await admin.ok("POST", f"/v1/alerts/{alert_id}/ack")
        acked = await alert_ids(admin)

    async with Hub(hub_config(data_dir)) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        again = await alert_ids(admin)
        assert set(again) == {disk, offline, long_disk}  # the cleared one does not come back
        for alert_id in (disk, offline, long_disk):
            kept, before = again[alert_id], acked[alert_id]
            assert kept["acknowledged"] and kept["acknowledged_by"] == before["acknowledged_by"]
            assert (kept["since"], kept["acknowledged_at"]) == (
                before["since"],
                before["acknowledged_at"],
            )
        # The disk gets fixed: cleared now, and forgotten by the store.
        site.url = hub.url
        use["disk_used_pct"] = full["disk_used_pct"] = 50.0
        await site.report({}, hosts=hosts)
        assert set(await alert_ids(admin)) == {offline}

    async with Hub(hub_config(data_dir)) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        assert set(await alert_ids(admin)) == {offline}
        assert (await alert_ids(admin))[offline]["acknowledged"]


async def test_a_bad_stored_alert_is_skipped_with_a_warning(
    tmp_path: Path, session: aiohttp.ClientSession, caplog: pytest.LogCaptureFixture
) -> None:
    data_dir = tmp_path / "hub"
    async with Hub(hub_config(data_dir)) as hub:
        admin = Operator(session, hub.url, admin_token(hub))
        await admin.ok("POST", "/v1/sites", {"id": "shop-2"}, 201)
        assert "site_offline:shop-2" in await alert_ids(admin)  # evaluated now
        await admin.ok("POST", "/v1/alerts/site_offline:shop-2/ack")
    store = Store(data_dir / STORE_DIR)
    try:
        store.commit(
            [
                ("alerts", b"host_disk:shop-2:h1", b"\xff not json"),
                put_json("alerts", "host_memory:shop-2:h1", {"v": 1, "id": "nonsense"}),
            ],
            sync=True,
        )
    finally:
        store.close()
    with caplog.at_level(logging.WARNING, logger="central_hub.service"):
        async with Hub(hub_config(data_dir)) as hub:
            admin = Operator(session, hub.url, admin_token(hub))
            kept = await alert_ids(admin)
    assert set(kept) == {"site_offline:shop-2"} and kept["site_offline:shop-2"]["acknowledged"]
    skipped = [r.getMessage() for r in caplog.records if "stored alert" in r.getMessage()]
    assert len(skipped) == 2 and any("host_disk:shop-2:h1" in m for m in skipped)
