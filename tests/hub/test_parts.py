"""Each part of the hub on its own: a real LMDB store in a tmp dir, no ``Hub``, no server.

The parts (``central_hub.ledger``, ``accounts``, ``reports``, ``sites``, ``deployments``,
``alerting``, ``logs``) are built with only what they use, as ``central_hub.parts`` does.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from central_hub import tokens
from central_hub.accounts import Accounts, adopt_tenants
from central_hub.alerting import Alerting
from central_hub.alerts import Thresholds
from central_hub.deltalog import Head
from central_hub.deployments import Deployments
from central_hub.errors import ApiError
from central_hub.fleetview import parse_report, progress, progress_digest
from central_hub.ledger import Ledger, Txn
from central_hub.logs import HubLogs, LogLimits
from central_hub.placement import parse_policy
from central_hub.reports import PERSIST_EVERY_S, RENEW_S, Reports
from central_hub.sites import ENROLL_PREFIX, Sites, SiteTimes
from central_hub.store import Store
from central_hub.tokens import TokenRecord, TokenRequest
from meshorch.apps.spec import parse_app_spec, spec_digest
from meshorch.fleet.delta import Target, key_id, parse
from tests.hub.helpers import spec_text

KEY = SigningKey.generate()
TIMES = SiteTimes(enroll_ttl_s=60.0, site_stale_s=30.0, rejection_window_s=600.0)


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def open_ledger(data_dir: Path, clock: Clock) -> Ledger:
    """A ledger over a fresh store (fleet ``test``, the tenant ``default``)."""
    data_dir.mkdir(parents=True, exist_ok=True)
    ledger = Ledger(data_dir, clock, delta_ttl_s=3600.0)
    store = Store(data_dir / "hub.lmdb")
    adopt_tenants(store, clock())
    ledger.attach(store, "test", [KEY], Head())
    return ledger


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def ledger(tmp_path: Path, clock: Clock) -> AsyncIterator[Ledger]:
    ledger = open_ledger(tmp_path / "hub", clock)
    yield ledger
    await ledger.drain()
    await ledger.close_store()


def admin(now: float) -> TokenRecord:
    return tokens.new_token("admin", tokens.ALL_TENANTS, now)[1]


def report(site: str, applied: int, at: float, apps: dict[str, Any] | None = None) -> Any:
    raw = {
        "v": 1,
        "site": site,
        "time": at,
        "applied_version": applied,
        "applied_head": "",
        "rejections": [],
        "hosts": [{"host_id": "h1", "alive": True, "instances": []}],
        "apps": apps or {},
    }
    return parse_report(raw, site)


def parts(ledger: Ledger) -> tuple[Accounts, Reports, Deployments, Sites]:
    accounts = Accounts(ledger)
    reports = Reports(ledger)
    deployments = Deployments(ledger, accounts, reports, wave_timeout_s=60.0)
    return accounts, reports, deployments, Sites(ledger, reports, deployments, TIMES)


# -- the ledger ------------------------------------------------------------------------------


async def test_ledger_commits_a_delta_and_its_audit_entry_or_nothing(ledger: Ledger) -> None:
    appended: list[int] = []
    ledger.on_append = lambda: appended.append(ledger.head.version)
    waiting = asyncio.ensure_future(ledger.wait_for_deltas(0, 5.0, 10))

    def plan(txn: Txn) -> int:
        txn.changed("thing", "t1", None)
        return txn.delta([{"op": "app.delete", "name": "web"}], Target(sites=frozenset({"s1"})))

    assert await ledger.transact(plan) == 1
    head, envelopes = await waiting
    assert head == 1 and appended == [1]
    delta, _, sigs = parse(envelopes[0])
    assert (
        delta.version == 1 and delta.prev == Head().hash and [k for k, _ in sigs] == [key_id(KEY)]
    )

    def refused(txn: Txn) -> None:
        txn.delta([], Target(sites=frozenset({"s1"})))
        txn.changed("thing", "t2", None)
        raise ApiError(409, "no", "refused")

    with pytest.raises(ApiError):
        await ledger.transact(refused)
    assert ledger.head.version == 1 and len(ledger.deltas_after(0, 10)) == 1
    read = ledger.read_audit(admin(ledger.now()), 0, 10, None)
    assert [(e["seq"], e["object"]) for e in read["entries"]] == [
        (1, {"type": "thing", "id": "t1"})
    ]
    assert read["last"] == 1


async def test_ledger_refuses_changes_once_its_store_is_closed(ledger: Ledger) -> None:
    await ledger.close_store()
    with pytest.raises(ApiError) as caught:
        await ledger.transact(lambda txn: txn.put("meta", "x", 1))
    assert caught.value.status == 503


# -- accounts --------------------------------------------------------------------------------


async def test_accounts_a_deleted_tenant_takes_its_tokens(ledger: Ledger) -> None:
    accounts = Accounts(ledger)
    root = admin(ledger.now())
    # A parent must be a stored token (the hub stores its bootstrap admin so).
    ledger.store.commit([("tokens", root.id.encode(), orjson.dumps(root.to_json()))], sync=False)
    await accounts.create_tenant(root, "blue", "")
    wanted = TokenRequest(role="operator", tenant="blue", description="", expires_in_s=None)
    text, record = await accounts.create_token(root, wanted)
    assert accounts.authenticate(f"Bearer {text}") == record
    with pytest.raises(ApiError) as unknown:
        accounts.require_tenant("green")
    assert unknown.value.code == "unknown_tenant"
    answer = await accounts.delete_tenant(root, "blue")
    assert answer == {"deleted": "blue", "revoked_tokens": [record.id]}
    with pytest.raises(ApiError) as refused:
        accounts.authenticate(f"Bearer {text}")
    assert refused.value.status == 401


# -- reports ---------------------------------------------------------------------------------


async def test_reports_keep_the_newest_and_come_back_from_the_store(
    ledger: Ledger, clock: Clock
) -> None:
    woken: list[str] = []
    reports = Reports(ledger, on_report=lambda: woken.append("woken"))
    assert await reports.record("s1", report("s1", applied=3, at=clock()))
    assert not await reports.record("s1", report("s1", applied=2, at=clock() + 1))
    assert woken == ["woken"]
    # Saved in batches (a second after the first unsaved report), and at stop.
    assert ledger.store.keys("reports") == []
    await reports.close()
    again = Reports(ledger)
    again.restore(ledger.store)
    assert (again.latest("s1") or {})["applied_version"] == 3
    assert again.view_args("s2") == (None, None)


async def test_reports_are_saved_a_second_after_the_first_unsaved_one(
    ledger: Ledger, clock: Clock
) -> None:
    reports = Reports(ledger)
    for site in ("s1", "s2", "s3"):
        assert await reports.record(site, report(site, applied=1, at=clock()))
    assert ledger.store.keys("reports") == []
    await asyncio.sleep(PERSIST_EVERY_S + 0.5)
    assert ledger.store.keys("reports") == ["s1", "s2", "s3"]  # in one transaction
    await reports.close()


async def test_a_report_that_only_renews_the_last_reaches_listeners_once_per_renewal(
    ledger: Ledger, clock: Clock
) -> None:
    reports = Reports(ledger)
    told: list[tuple[str, int, float]] = []
    reports.listeners.append(lambda site, _old, new: told.append((site, 0, new["time"])))

    def sampled(applied: int, load: float) -> Any:
        sent = report("s1", applied=applied, at=clock())
        sent["hosts"][0]["resources"] = {"load1": load, "cpu_count": 2}
        return sent

    assert await reports.record("s1", sampled(1, 0.5))
    first_at = clock()
    clock.now += 3
    assert await reports.record("s1", sampled(1, 0.9))  # new samples only: a renewal
    assert len(told) == 1
    latest, received_at = reports.view_args("s1")
    assert latest is not None and latest["hosts"][0]["resources"]["load1"] == 0.9
    assert received_at == clock() and latest["time"] == clock()  # kept, and heard now
    clock.now += 3
    assert await reports.record("s1", sampled(2, 0.9))  # progress: told at once
    assert [at for *_, at in told] == [first_at, clock()]
    clock.now += RENEW_S - 1
    assert await reports.record("s1", sampled(2, 0.1))
    assert len(told) == 2
    clock.now += 1  # the last one told of is RENEW_S old: this one is told of
    assert await reports.record("s1", sampled(2, 0.2))
    assert len(told) == 3
    # A follower's mark (``central_hub.relay``): the kept report's time and when the site
    # was heard move, nothing else, and no listener is told; none for a site not kept.
    clock.now += 3
    kept = reports.latest("s1")
    assert kept is not None
    assert reports.seen("s1", clock() - 0.5, progress_digest(progress(kept)))
    latest, received_at = reports.view_args("s1")
    assert latest is not None and latest["time"] == clock() - 0.5 and received_at == clock()
    assert latest["hosts"][0]["resources"]["load1"] == 0.2 and len(told) == 3
    assert not reports.seen("s2", clock(), progress_digest(progress(kept)))
    # A mark renewing another report (one a former leader kept) renews nothing.
    other = progress_digest(progress(sampled(1, 0.2)))
    assert not reports.seen("s1", clock() + 1, other)
    assert reports.view_args("s1") == (latest, received_at)
    await reports.close()
    # Nor one of a report restored from an earlier run, which listeners were not told of.
    again = Reports(ledger)
    again.restore(ledger.store)
    assert again.latest("s1") is not None
    assert not again.seen(
        "s1", clock() + 1, progress_digest(progress(again.latest("s1") or {"hosts": []}))
    )


# -- sites -----------------------------------------------------------------------------------


async def test_sites_enrollment_token_works_once(ledger: Ledger) -> None:
    *_, sites = parts(ledger)
    made = await sites.register_site("s1", {"zone": "a"}, None)
    token = made["enroll_token"]
    assert token.startswith(ENROLL_PREFIX) and sites.site_public_key("s1") is None
    with pytest.raises(ApiError):
        await sites.enroll("s1", "ab" * 32, ENROLL_PREFIX + "0" * 48)
    await sites.enroll("s1", "ab" * 32, token)
    assert sites.site_public_key("s1") == "ab" * 32
    with pytest.raises(ApiError) as used:
        await sites.enroll("s1", "cd" * 32, token)
    assert used.value.code == "bad_enroll_token"
    assert [s["id"] for s in sites.list_sites()] == ["s1"]


async def test_sites_a_decommissioned_site_that_is_done_is_forgotten(
    ledger: Ledger, clock: Clock
) -> None:
    *_, reports, _, sites = parts(ledger)
    await sites.register_site("s1", {}, "ab" * 32)
    sent = await sites.decommission_site(admin(clock()), "s1")
    done = {**report("s1", sent["delta"], clock()), "decommission": {"state": "done"}}
    assert await sites.record_report("s1", done) == sent["delta"]
    assert sites.site_public_key("s1") is None and reports.latest("s1") is None


# -- deployments -----------------------------------------------------------------------------


async def test_deployments_a_dropped_site_lets_the_next_wave_start(ledger: Ledger) -> None:
    _, _, deployments, sites = parts(ledger)
    for site in ("s1", "s2"):
        await sites.register_site(site, {"zone": "a"}, "ab" * 32)
    spec = parse_app_spec(spec_text())
    policy = parse_policy({"match": {"zone": "a"}, "max_parallel": 1})
    root = admin(ledger.now())
    status, dep = await deployments.deploy(root, spec, spec_digest(spec), policy, None)
    assert status == 202 and dep["state"] == "running" and deployments.active == {"web"}
    first = [parse(e)[0] for _, e in ledger.deltas_after(0, 10)]
    assert [sorted(d.target.sites or ()) for d in first] == [["s1"]]
    again = await deployments.deploy(root, spec, spec_digest(spec), policy, None)
    assert again == (200, dep)

    await sites.delete_site("s1")
    deltas = [parse(e)[0] for _, e in ledger.deltas_after(1, 10)]
    assert [(d.ops[0]["op"], sorted(d.target.sites or ())) for d in deltas] == [("app.put", ["s2"])]
    assert deployments.get_app(root, "web")["sites"] == {"s2": None}


# -- alerting --------------------------------------------------------------------------------


async def test_alerting_fires_keeps_and_acknowledges(ledger: Ledger, clock: Clock) -> None:
    _, reports, _, sites = parts(ledger)
    await sites.register_site("s1", {}, "ab" * 32)
    alerting = Alerting(ledger, reports, sites, Thresholds(), hold_s=30.0)
    alerting.restore(ledger.store, started_at=clock())
    alerting.refresh()
    assert list(alerting.book.active) == ["site_offline:s1"]
    await ledger.drain()  # the firing is written
    root = admin(clock())
    acked = await alerting.acknowledge_alert(root, "site_offline:s1")
    assert acked["acknowledged_by"] == root.id

    after = Alerting(ledger, reports, sites, Thresholds(), hold_s=30.0)
    after.restore(ledger.store, started_at=clock())
    [kept] = after.list_alerts(root)
    assert kept["id"] == "site_offline:s1" and kept["acknowledged_by"] == root.id
    with pytest.raises(ApiError) as unknown:
        await after.acknowledge_alert(root, "site_offline:s9")
    assert unknown.value.status == 404

    await reports.record("s1", report("s1", ledger.head.version, clock()))
    alerting.refresh()
    assert alerting.book.active == {}


# -- fleet logs retention ----------------------------------------------------------------------


async def test_logs_retention_starts_once_per_period(ledger: Ledger, clock: Clock) -> None:
    logs = HubLogs(ledger, LogLimits(3600.0, None, logs_retention_every_s=60.0))
    logs.open()
    try:
        logs.start_retention()
        first = set(ledger.pending)
        assert len(first) == 1
        logs.start_retention()  # not due yet
        await ledger.drain()
        assert ledger.pending == set()
        logs.start_retention()
        assert ledger.pending == set()
        clock.now += 61.0
        logs.start_retention()
        assert len(ledger.pending) == 1 and ledger.pending != first
        await ledger.drain()
    finally:
        logs.close()


async def test_a_change_whose_caller_went_away_logs_its_failure_once(
    tmp_path: Path, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """A change carries on when its caller is cancelled (a client that hung up); its
    failure, which nobody else reads, is logged, not left as an unretrieved exception."""
    ledger = open_ledger(tmp_path, clock)
    committing = asyncio.Event()

    async def failing_apply(writes: Any, *, sync: bool) -> None:
        committing.set()
        await asyncio.sleep(0.05)
        raise ApiError(503, "hub_busy", "not applied")

    ledger.store.apply = failing_apply  # type: ignore[method-assign]
    unretrieved: list[dict[str, Any]] = []
    loop = asyncio.get_running_loop()
    loop.set_exception_handler(lambda _loop, context: unretrieved.append(context))
    try:
        caller = asyncio.create_task(ledger.transact(lambda txn: txn.put("meta", "k", 1)))
        await committing.wait()
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        with caplog.at_level("INFO", logger="central_hub.ledger"):
            await ledger.drain()
            await asyncio.sleep(0)
        gc.collect()  # an unretrieved exception is reported when its task is collected
        await asyncio.sleep(0)
    finally:
        loop.set_exception_handler(None)
    assert unretrieved == []
    assert "a change whose caller went away was not made: not applied" in caplog.text
