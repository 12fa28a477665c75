"""The rollout driver's cost per tick follows the reports, not the size of the deployment:
a running deployment is decoded once (not on every tick), and a change of progress alone
is written at most every ``PROGRESS_WRITE_S`` (with the newest progress, also when no
report follows), while a wave's end is written at once. A real hub, real site link."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from central_hub import Hub, waves
from central_hub.deployments import PROGRESS_WRITE_S
from central_hub.ledger import Txn
from tests.hub.conftest import MakeSite
from tests.hub.helpers import Operator, healthy, spec_text, wait_for

SITES = 24


async def test_a_running_deployment_is_read_once_and_its_progress_written_in_batches(
    hub: Hub, admin: Operator, make_site: MakeSite, monkeypatch: pytest.MonkeyPatch
) -> None:
    sites = [await make_site(f"s{i:02d}") for i in range(SITES)]
    decoded = 0
    written: list[float] = []
    from_json = waves.Deployment.from_json
    put = Txn.put

    def counting_from_json(data: Any) -> waves.Deployment:
        nonlocal decoded
        decoded += 1
        return from_json(data)

    def recording_put(txn: Txn, db: str, key: str, value: object) -> None:
        if db == "deployments":
            written.append(asyncio.get_running_loop().time())
        put(txn, db, key, value)

    monkeypatch.setattr(waves.Deployment, "from_json", staticmethod(counting_from_json))
    monkeypatch.setattr(Txn, "put", recording_put)
    dep = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 100}}, 202
    )
    assert dep["waves"] == [[site.id for site in sites]]
    for site in sites:
        await site.sync()
    decoded = 0
    await asyncio.sleep(1.0)  # about 5 driver ticks, no report
    assert decoded <= 1, f"a running deployment decoded {decoded} times in 1 s without a report"

    written.clear()
    loop = asyncio.get_running_loop()
    started = loop.time()
    for site in sites[:-1]:  # one report every 80 ms: progress changes on every tick
        status, _ = await site.report({"web": healthy("1.0")})
        assert status == 200
        await asyncio.sleep(0.08)
    reported_for = loop.time() - started
    most = int(reported_for / PROGRESS_WRITE_S) + 2
    assert len(written) <= most, (
        f"{len(written)} writes of the deployment in {reported_for:.1f}s of reports "
        f"(at most {most})"
    )
    # The newest progress is written within PROGRESS_WRITE_S (and a tick) of the last
    # report, although no report follows.
    shown = await wait_for(
        admin,
        dep["id"],
        lambda d: sum(p["state"] == "healthy" for p in d["progress"].values()) == SITES - 1,
        timeout_s=PROGRESS_WRITE_S + 2.0,
    )
    assert shown["state"] == "running" and shown["progress"][sites[-1].id]["state"] == ("updating")
    await sites[-1].report({"web": healthy("1.0")})
    done = await wait_for(admin, dep["id"], lambda d: d["state"] != "running")
    assert done["state"] == "succeeded"
    assert all(p["state"] == "healthy" for p in done["progress"].values())


async def test_a_deployment_changed_by_an_operator_is_read_again(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    """The driver's copy of a running deployment is dropped when the stored one changes
    (here a newer version supersedes it): nothing is stepped from a stale copy."""
    sites = [await make_site(f"s{i}") for i in range(3)]
    first = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 100}}, 202
    )
    for site in sites:
        await site.sync()
    await sites[0].report({"web": healthy("1.0")})
    await asyncio.sleep(0.5)  # the driver has stepped (and kept) the first deployment
    second = await admin.ok(
        "POST",
        "/v1/apps",
        {"spec": spec_text(version="2.0"), "placement": {"max_parallel": 100}},
        202,
    )
    superseded = await wait_for(admin, first["id"], lambda d: d["state"] != "running")
    assert superseded["state"] == "superseded"
    for site in sites:
        await site.sync()
        await site.report({"web": healthy("2.0")})
    done = await wait_for(admin, second["id"], lambda d: d["state"] != "running")
    assert done["state"] == "succeeded"


async def test_a_wave_counts_at_once_the_sites_already_at_its_version(
    hub: Hub, admin: Operator, make_site: MakeSite
) -> None:
    """A wave's start looks only at the sites whose report lists the version deployed (the
    others are updating, as the start left them): a site that already runs it healthy, or
    failed, counts at once, with no report after the deployment."""
    sites = [await make_site(f"s{i}") for i in range(3)]
    one_wave = {"max_parallel": 100}
    first = await admin.ok("POST", "/v1/apps", {"spec": spec_text(), "placement": one_wave}, 202)
    for site in sites:
        await site.sync()
        await site.report({"web": healthy("1.0")})
    await wait_for(admin, first["id"], lambda d: d["state"] == "succeeded")
    # The same version in waves of two: both waves find their sites healthy already.
    again = await admin.ok(
        "POST", "/v1/apps", {"spec": spec_text(), "placement": {"max_parallel": 2}}, 202
    )
    assert again["id"] != first["id"] and again["waves"] == [["s0", "s1"], ["s2"]]
    done = await wait_for(admin, again["id"], lambda d: d["state"] != "running")
    assert done["state"] == "succeeded" and len(done["deltas"]) == 2

    second = {"spec": spec_text(version="2.0"), "placement": one_wave}
    await admin.ok("POST", "/v1/apps", second, 202)
    failed = {**healthy("2.0"), "state": "failed", "message": "crash loop"}
    await sites[1].sync()
    await sites[1].report({"web": failed})
    retried = await admin.ok("POST", "/v1/apps", {**second, "placement": {"max_parallel": 50}}, 202)
    done = await wait_for(admin, retried["id"], lambda d: d["state"] != "running")
    assert done["state"] == "failed" and done["reason"] == "site s1 failed: crash loop"
