"""Reports and site health (pure)."""

from __future__ import annotations

from typing import Any

import pytest

from central_hub import fleetview
from central_hub.fleetview import ReportError, parse_report, site_detail, site_health


def report(**changes: Any) -> dict[str, Any]:
    data: dict[str, Any] = {
        "v": 1, "site": "shop-1", "time": 1000.0, "applied_version": 3, "applied_head": "ab",
        "rejections": [],
        "hosts": [{"host_id": "h1", "alive": True, "instances": [
            {"app": "web", "instance_id": "web-0", "service": "web", "version": "1",
             "state": "running", "ready": True, "restarts": 2}]}],
        "apps": {"web": {"version": "1", "desired": 1, "ready": 1, "state": "healthy",
                         "message": ""}},
        "extra": "ignored",
    }  # fmt: skip
    data.update(changes)
    return parse_report(data, "shop-1")


def health(parsed: dict[str, Any] | None, last_seen: float | None, now: float = 1000.0) -> str:
    return site_health(parsed, last_seen, now, stale_s=30.0, rejection_window_s=600.0)


def test_health() -> None:
    assert health(None, None) == "unknown"
    assert health(report(), 990.0) == "healthy"
    assert health(report(), 969.0) == "unreachable"
    sick = {"web": {"version": "1", "state": "progressing"}}
    assert health(report(apps=sick), 990.0) == "degraded"
    dead = [{"host_id": "h1", "alive": False, "instances": []}]
    assert health(report(hosts=dead), 990.0) == "degraded"
    rejected = [{"reason": "expired", "message": "m", "version": 4, "at": 900.0}]
    assert health(report(rejections=rejected), 990.0) == "degraded"
    assert health(report(rejections=rejected), 990.0, now=1600.0) == "unreachable"
    assert health(report(rejections=rejected), 1590.0, now=1600.0) == "healthy"


def test_reports_keep_known_fields_and_list_every_problem() -> None:
    parsed = report()
    assert "extra" not in parsed
    detail = site_detail({"id": "shop-1", "labels": {}}, parsed, 990.0, 1000.0, 30.0, 600.0)
    assert detail["hosts"][0]["instances"][0]["restarts"] == 2
    with pytest.raises(ReportError) as info:
        report(v=2, time="now", applied_version=-1, hosts=[{"alive": "yes"}], apps=[])
    problems = "\n".join(info.value.problems)
    for fragment in ("v:", "time:", "applied_version:", "hosts[0].host_id", "hosts[0].alive",
                     "apps:"):  # fmt: skip
        assert fragment in problems
    with pytest.raises(ReportError):
        parse_report({**report(), "site": "shop-2"}, "shop-1")
    with pytest.raises(ReportError):
        parse_report("garbage", "shop-1")


def test_a_report_overtaken_in_flight_is_stale_only_for_a_moment() -> None:
    newer = {"applied_version": 5, "time": 100.0}
    assert fleetview.is_stale_report({"applied_version": 4, "time": 101.0}, newer, 50.0, 51.0)
    assert fleetview.is_stale_report({"applied_version": 5, "time": 99.0}, newer, 50.0, 51.0)
    assert not fleetview.is_stale_report({"applied_version": 5, "time": 100.5}, newer, 50.0, 51.0)
    assert not fleetview.is_stale_report({"applied_version": 6, "time": 1.0}, newer, 50.0, 51.0)
    # A site rebuilt from scratch (version 0) is heard again after the window.
    assert not fleetview.is_stale_report({"applied_version": 0, "time": 9.0}, newer, 50.0, 60.0)


def test_counts_from_the_report() -> None:
    def inst(app: str, ready: bool) -> dict[str, Any]:
        state = "running" if ready else "starting"
        return {"app": app, "instance_id": f"{app}-{ready}", "service": "s", "version": "1",
                "state": state, "ready": ready, "restarts": 0}  # fmt: skip

    app = {"version": "1", "desired": 1, "ready": 1, "message": ""}
    parsed = report(
        hosts=[
            {"host_id": "h1", "alive": True, "instances": [inst("web", True), inst("db", True)]},
            {"host_id": "h2", "alive": False, "instances": [inst("web", False)]},
        ],
        apps={"web": {**app, "state": "progressing"}, "db": {**app, "state": "healthy"}},
    )
    counts = fleetview.site_counts(parsed, 990.0, 1000.0, 30.0)
    assert counts == {
        "source": "report",
        "hosts": {"total": 2, "up": 1},
        "apps": {"total": 2, "healthy": 1},
        "instances": {"total": 3, "ready": 2},
    }
    # A stale report still counts (unreachable, but the last news); a tenant's view.
    mine = fleetview.site_counts(parsed, 900.0, 1000.0, 30.0, visible_apps={"web"})
    assert mine is not None and mine["hosts"] == {"total": 2, "up": 1}
    assert (mine["apps"], mine["instances"]) == (
        {"total": 1, "healthy": 0},
        {"total": 2, "ready": 1},
    )
    assert fleetview.site_counts(None, None, 1000.0, 30.0) is None  # never heard from
    summary = fleetview.site_summary({"id": "shop-1", "labels": {}}, None, None, 1000.0, 30, 600)
    assert summary["counts"] is None
    detail = site_detail({"id": "shop-1", "labels": {}}, parsed, 990.0, 1000.0, 30.0, 600.0)
    assert detail["counts"] == counts
