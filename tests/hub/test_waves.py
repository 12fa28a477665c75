"""The rollout core with injected time (pure)."""

from __future__ import annotations

from collections.abc import Sequence

import orjson
import pytest

from central_hub import waves
from central_hub.waves import AppStatus, Deployment


def started(plan: Sequence[Sequence[str]], now: float = 100.0) -> tuple[Deployment, list[str]]:
    return waves.start("dep-1", "web", "2.0", "d" * 64, "default", {}, plan, now)


HEALTHY = AppStatus("2.0", "healthy")


def test_the_next_wave_waits_for_every_site_of_the_current_one() -> None:
    dep, first = started([["a", "b"], ["c"]])
    assert first == ["a", "b"] and dep.progress["c"].state == "pending"
    dep, issue = waves.step(dep, {"a": HEALTHY, "b": None}, 110.0, 600.0)
    assert issue == [] and dep.wave == 0
    assert dep.progress["a"].state == "healthy" and dep.progress["b"].state == "updating"
    # an old version reported healthy does not count
    dep, issue = waves.step(dep, {"a": HEALTHY, "b": AppStatus("1.0", "healthy")}, 120.0, 600.0)
    assert issue == []
    dep, issue = waves.step(dep, {"a": HEALTHY, "b": HEALTHY}, 130.0, 600.0)
    assert issue == ["c"] and dep.wave == 1 and dep.wave_started_at == 130.0
    dep, issue = waves.step(dep, {"c": AppStatus("2.0", "progressing")}, 140.0, 600.0)
    assert issue == [] and dep.state == "running"
    dep, issue = waves.step(dep, {"c": HEALTHY}, 150.0, 600.0)
    assert issue == [] and dep.state == "succeeded" and dep.updated_at == 150.0


def test_a_failed_site_stops_the_rollout() -> None:
    dep, _ = started([["a", "b"], ["c"]])
    failed = AppStatus("2.0", "failed", "rolled back: crash loop")
    dep, issue = waves.step(dep, {"a": HEALTHY, "b": failed}, 110.0, 600.0)
    assert issue == [] and dep.state == "failed"
    assert dep.reason == "site b failed: rolled back: crash loop"
    assert waves.step(dep, {"a": HEALTHY, "b": HEALTHY}, 120.0, 600.0) == (dep, [])


def test_a_failure_of_another_version_does_not_count() -> None:
    dep, _ = started([["a"]])
    dep, _ = waves.step(dep, {"a": AppStatus("1.0", "failed", "old")}, 110.0, 600.0)
    assert dep.state == "running"


def test_timeout_names_the_sites_still_waited_for() -> None:
    dep, _ = started([["a", "b", "c"]], now=100.0)
    statuses = {"a": HEALTHY, "b": None, "c": AppStatus("2.0", "progressing")}
    dep, _ = waves.step(dep, statuses, 699.0, 600.0)
    assert dep.state == "running"
    dep, _ = waves.step(dep, statuses, 700.0, 600.0)
    assert dep.state == "failed" and dep.reason == "timeout waiting for sites b, c"


def test_each_wave_has_its_own_timeout() -> None:
    dep, _ = started([["a"], ["b"]], now=0.0)
    dep, issue = waves.step(dep, {"a": HEALTHY}, 500.0, 600.0)
    assert issue == ["b"]
    dep, _ = waves.step(dep, {"b": None}, 1000.0, 600.0)
    assert dep.state == "running"  # 500 s into the second wave
    dep, _ = waves.step(dep, {"b": None}, 1100.0, 600.0)
    assert dep.state == "failed"


def test_superseding_stops_a_running_deployment_only() -> None:
    dep, _ = started([["a"]])
    stopped = waves.supersede(dep, "superseded by dep-2", 120.0)
    assert stopped.state == "superseded" and stopped.reason == "superseded by dep-2"
    assert waves.step(stopped, {"a": HEALTHY}, 130.0, 600.0) == (stopped, [])
    done, _ = waves.step(dep, {"a": HEALTHY}, 110.0, 600.0)
    assert waves.supersede(done, "x", 120.0) is done


def test_no_site_means_done_at_once() -> None:
    dep, first = started([])
    assert first == [] and dep.state == "succeeded"


def test_dropping_the_last_site_of_a_wave_starts_the_next() -> None:
    dep, _ = started([["a"], ["b", "c"]])
    dep, issue = waves.drop_site(dep, "a", 150.0)
    assert issue == ["b", "c"] and dep.waves == (("b", "c"),) and dep.wave == 0
    assert dep.wave_started_at == 150.0
    dep, issue = waves.drop_site(dep, "b", 160.0)
    assert issue == [] and dep.waves == (("c",),)
    dep, issue = waves.drop_site(dep, "c", 170.0)
    assert dep.state == "succeeded"


def test_deployments_round_trip_through_json() -> None:
    dep, _ = started([["a", "b"], ["c"]])
    dep, _ = waves.step(dep, {"a": HEALTHY, "b": AppStatus("2.0", "failed", "x")}, 1.0, 600.0)
    assert Deployment.from_json(dep.to_json()) == dep  # a record stored before to_record
    assert Deployment.from_json(orjson.loads(orjson.dumps(dep.to_record()))) == dep


def test_a_record_stores_each_sites_state_as_a_letter() -> None:
    dep, _ = started([["a", "b", "c"], ["d"]])
    dep, _ = waves.step(
        dep,
        {"a": HEALTHY, "b": AppStatus("2.0", "progressing", "pulling"), "c": None},
        1.0,
        600.0,
    )
    record = dep.to_record()
    assert "progress" not in record
    assert record["states"] == ["huu", "p"] and record["messages"] == {"b": "pulling"}
    assert dep.to_json()["progress"]["b"] == {"state": "updating", "message": "pulling"}
    assert Deployment.from_json(record) == dep


def test_a_large_deployments_record_is_a_fraction_of_what_the_api_shows() -> None:
    sites = [f"shop-{i:05d}" for i in range(10_000)]
    dep, _ = started([sites[:100], sites[100:]])
    stored, shown = len(orjson.dumps(dep.to_record())), len(orjson.dumps(dep.to_json()))
    assert stored * 4 < shown, (stored, shown)


def test_a_record_whose_states_do_not_match_its_waves_is_refused() -> None:
    dep, _ = started([["a", "b"], ["c"]])
    short = {**dep.to_record(), "states": ["uu", ""]}
    with pytest.raises(ValueError):
        Deployment.from_json(short)
    unknown = {**dep.to_record(), "states": ["ux", "p"]}
    with pytest.raises(KeyError):
        Deployment.from_json(unknown)


def test_a_step_over_the_sites_that_reported_equals_a_step_over_the_wave() -> None:
    """The driver steps only the sites whose report changed: the others keep their
    progress, so the outcome is the one of a step over the whole wave."""
    wave = [f"s{i}" for i in range(50)]
    dep, _ = started([wave, ["last"]])
    statuses: dict[str, AppStatus | None] = {site: None for site in wave}
    for round_, now in enumerate((110.0, 120.0, 130.0, 140.0, 150.0)):
        changed = wave[round_ * 10 : round_ * 10 + 10]
        statuses.update({site: HEALTHY for site in changed})
        whole, whole_issue = waves.step(dep, statuses, now, 600.0)
        part, part_issue = waves.step(dep, statuses, now, 600.0, changed)
        assert (part, part_issue) == (whole, whole_issue)
        dep = part
    assert dep.wave == 1 and whole_issue == ["last"]


def test_a_step_that_changes_nothing_returns_the_deployment_itself() -> None:
    dep, _ = started([["a", "b"], ["c"]])
    dep, _ = waves.step(dep, {"a": HEALTHY, "b": None}, 110.0, 600.0)
    same, issue = waves.step(dep, {"a": HEALTHY, "b": None}, 120.0, 600.0)
    assert same is dep and issue == []
    assert waves.step(dep, {}, 130.0, 600.0, sites=[])[0] is dep
    moved, _ = waves.step(
        dep, {"b": AppStatus("2.0", "progressing", "pulling")}, 140.0, 600.0, ["b"]
    )
    assert moved is not dep and moved.progress["b"].message == "pulling"
    assert moved.updated_at == 140.0 and moved.progress["a"] is dep.progress["a"]


def test_a_wave_just_started_is_stepped_by_the_sites_at_its_version() -> None:
    """Every site of a wave that just started is updating: a step over the sites that
    report the version deployed has the outcome of a step over the whole wave."""
    wave = [f"s{i}" for i in range(20)]
    dep, _ = started([["a"], wave])
    dep, issue = waves.step(dep, {"a": HEALTHY}, 110.0, 600.0)
    assert issue == wave
    statuses: dict[str, AppStatus | None] = {
        "s3": HEALTHY,
        "s9": AppStatus("1.0", "healthy"),  # another version: updating
    }
    for at_version in (["s3"], ["s3", "s7"]):
        if "s7" in at_version:
            statuses["s7"] = AppStatus("2.0", "failed", "crash loop")
        whole = waves.step(dep, statuses, 120.0, 600.0)
        assert waves.step(dep, statuses, 120.0, 600.0, at_version) == whole
    assert whole[0].state == "failed" and whole[0].reason == "site s7 failed: crash loop"
    every = {site: HEALTHY for site in wave}
    done = waves.step(dep, every, 120.0, 600.0, wave)
    assert done == waves.step(dep, every, 120.0, 600.0) and done[0].state == "succeeded"
    assert waves.step(dep, {}, 800.0, 600.0, [])[0].state == "failed"  # its own timeout
