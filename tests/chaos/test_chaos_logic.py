"""The chaos suite's pure parts: schedules, role resolution, invariants, report, plot."""

from __future__ import annotations

import itertools
import random
import xml.etree.ElementTree as ET
from pathlib import Path
from typing import Any

import orjson
import pytest

from meshorch.chaos.faults import FaultError, resolve_roles
from meshorch.chaos.invariants import (
    check_acknowledged_writes,
    check_events,
    check_linearizable,
    check_recovery,
    judge_power_cut,
    op_counts,
    overall,
)
from meshorch.chaos.report import FaultRecord, ScenarioReport, timeline_svg
from meshorch.chaos.runner import app_converged, leader_of, missing_links, site_healthy, site_whole
from meshorch.chaos.scenarios import SCENARIOS, plan_scenario
from meshorch.chaos.workload import build_parser, classify_answer, run_workload

HOSTS = ("s1-h1", "s1-h2", "s1-h3")


@pytest.mark.parametrize("name", list(SCENARIOS))
@pytest.mark.parametrize("duration", [8.0, 15.0, 600.0])
def test_schedules_are_seeded_inside_the_run_and_never_overlap(name: str, duration: float) -> None:
    for seed in range(5):
        faults = plan_scenario(name, seed, duration)
        assert faults == plan_scenario(name, seed, duration)
        assert faults
        for f in faults:
            assert 0 < f.start_s < f.end_s < duration
        for a, b in itertools.pairwise(faults):
            assert a.end_s <= b.start_s
    assert {plan_scenario(name, s, duration) for s in range(8)} != {
        plan_scenario(name, 0, duration)
    }


def test_flapping_flaps() -> None:
    assert len(plan_scenario("uplink-flapping", 1, 20.0)) >= 3


def test_unknown_scenario_and_bad_duration() -> None:
    with pytest.raises(ValueError, match="kill-leader"):
        plan_scenario("nope", 1, 10)
    with pytest.raises(ValueError, match="positive"):
        plan_scenario("kill-leader", 1, 0)


def test_roles_resolve_to_distinct_hosts() -> None:
    rng = random.Random(1)
    assert resolve_roles(("leader",), HOSTS, "s1-h2", "s1", rng) == ("s1-h2",)
    for _ in range(20):
        follower = resolve_roles(("follower",), HOSTS, "s1-h2", "s1", rng)[0]
        assert follower != "s1-h2"
        a, b = resolve_roles(("follower", "follower"), HOSTS, "s1-h2", "s1", rng)
        assert len({a, b, "s1-h2"}) == 3
    assert resolve_roles(("site",), HOSTS, None, "s1", rng) == ("s1",)
    assert resolve_roles(("leader",), HOSTS, None, "s1", rng)[0] in HOSTS
    with pytest.raises(FaultError, match="no host left"):
        resolve_roles(("follower", "follower", "follower"), HOSTS, "s1-h1", "s1", rng)


def rec(
    i: int, kind: str, call: float, ret: float | None, value: str | None, status: str = "ok"
) -> dict[str, Any]:
    return {
        "id": i,
        "client": f"c{i % 2}",
        "host": "h",
        "key": "k" if kind != "event" else "t/a/s",
        "kind": kind,
        "call_s": call,
        "end_s": ret if ret is not None else call + 8,
        "return_s": ret if status == "ok" else None,
        "value": value,
        "status": status,
    }


def test_acknowledged_writes_must_be_readable_or_superseded() -> None:
    records = [
        rec(1, "put", 0, 1, "a"),
        rec(2, "put", 2, 3, "b"),
        rec(3, "put", 2.5, None, "c", "unknown"),
        rec(4, "put", 4, None, "d", "fail"),
    ]
    for final, status in (("b", "pass"), ("c", "pass"), ("a", "fail"), ("d", "fail")):
        reads = [rec(9, "get", 10, 11, final)]
        result = check_acknowledged_writes(records, reads, ["k"])
        assert result.status == status, (final, result)
    missing = check_acknowledged_writes(records, [], ["k"])
    assert missing.status == "fail" and "no final read" in missing.detail


def test_failed_operations_are_left_out_of_the_history() -> None:
    records = [rec(1, "put", 0, 1, "a"), rec(2, "put", 2, None, "b", "fail"),
               rec(3, "get", 3, 4, "a")]  # fmt: skip
    result, verdict = check_linearizable(records)
    assert result.status == "pass" and verdict.ops == 2
    records.append(rec(4, "get", 5, 6, "b"))
    result, _ = check_linearizable(records)
    assert result.status == "fail"
    assert "#4" in result.detail


def test_events_exactly_once() -> None:
    produced = [
        rec(1, "event", 0, 1, "e1"),
        rec(2, "event", 0, None, "e2", "unknown"),
        rec(3, "event", 0, None, "e3", "fail"),
    ]
    assert check_events(produced, ["e1"]).status == "pass"
    assert check_events(produced, ["e1", "e2"]).status == "pass"
    assert "missing" in check_events(produced, []).detail
    assert "more than once" in check_events(produced, ["e1", "e1"]).detail
    assert "never produced" in check_events(produced, ["e1", "zz"]).detail
    assert "refused but stored" in check_events(produced, ["e1", "e3"]).detail
    assert check_events(produced, None).status == "unknown"
    assert check_events([], None).status == "pass"
    at_hub = check_events(produced, [], name="events_at_hub_exactly_once")
    assert at_hub.name == "events_at_hub_exactly_once" and at_hub.status == "fail"


def test_recovery_bound_and_overall() -> None:
    assert check_recovery("r", 3.0, 10).status == "pass"
    assert check_recovery("r", 11.0, 10).status == "fail"
    assert check_recovery("r", None, 10).status == "fail"
    results = [check_recovery("a", 1, 10), check_recovery("b", None, 10)]
    assert overall(results) == "fail"
    assert overall(results[:1]) == "pass"


def test_a_power_cut_is_judged_by_the_durability_mode() -> None:
    """durability=power: a lost acknowledged write fails the run; process: allowed, and
    the report counts it."""
    records = [rec(1, "put", 0, 1, "a"), rec(2, "put", 2, 3, "b"), rec(3, "event", 0, 1, "e1"),
               rec(4, "event", 2, 3, "e2")]  # fmt: skip
    lost_read = [rec(9, "get", 10, 11, "a")]  # the acknowledged "b" is gone
    results = [
        check_acknowledged_writes(records, lost_read, ["k"]),
        check_events(records, ["e1"]),
        check_recovery("site_recovered", 3.0, 10),
    ]
    assert [r.status for r in results] == ["fail", "fail", "pass"]

    power = judge_power_cut(results, "power", records, lost_read, ["k"], ["e1"])
    assert overall(power) == "fail"
    assert power[-1].status == "fail"
    assert power[-1].detail.startswith("durability=power: acknowledged writes lost: 2")

    process = judge_power_cut(results, "process", records, lost_read, ["k"], ["e1"])
    assert overall(process) == "pass"
    assert [r.status for r in process] == ["allowed", "allowed", "pass", "allowed"]
    assert process[-1].detail.startswith(
        "durability=process: acknowledged writes lost: 2 (allowed)"
    )

    kept_read = [rec(9, "get", 10, 11, "b")]
    kept = [
        check_acknowledged_writes(records, kept_read, ["k"]),
        check_events(records, ["e1", "e2"]),
    ]
    for mode in ("power", "process"):
        judged = judge_power_cut(kept, mode, records, kept_read, ["k"], ["e1", "e2"])
        assert judged[-1].status == "pass" and "lost: 0" in judged[-1].detail, judged
    # Not a loss: a recovery that failed, a key not read, an event stored twice.
    slow = [check_recovery("site_recovered", None, 10)]
    assert overall(judge_power_cut(slow, "process", records, kept_read, ["k"], None)) == "fail"
    unread = [check_acknowledged_writes(records, [], ["k"])]
    assert overall(judge_power_cut(unread, "process", records, [], ["k"], None)) == "fail"
    for mode in ("power", "process"):  # nothing read: not "0 lost", unknown
        judged = judge_power_cut([], mode, records, [], ["k"], None)
        assert judged[-1].status == "unknown" and "not read" in judged[-1].detail, judged
    twice = [check_events(records, ["e1", "e2", "e2"])]
    judged = judge_power_cut(twice, "process", records, kept_read, ["k"], ["e1", "e2", "e2"])
    assert overall(judged) == "fail"


def status(host: str, *, leader: str, ready: bool = True) -> dict[str, Any]:
    return {"host_id": host, "leader": leader, "is_leader": host == leader, "ready": ready}


def test_site_health_from_a_probe() -> None:
    statuses = {h: status(h, leader="s1-h1") for h in HOSTS}
    good: dict[str, Any] = {"status": statuses, "fleet": {"connected": True}}
    assert site_healthy(good, fleet=True)
    assert leader_of(good) == "s1-h1"
    down = {**good, "status": {**statuses, "s1-h3": None}}
    assert not site_healthy(down, fleet=False)
    split = {"status": {h: status(h, leader=h) for h in HOSTS}}
    assert not site_healthy(split, fleet=False)
    assert not site_healthy({**good, "fleet": {"connected": False}}, fleet=True)
    assert site_healthy({**good, "fleet": None}, fleet=False)
    assert not site_healthy({}, fleet=False)
    assert app_converged({"instances": [{"ready": True}, {"ready": True}]})
    assert not app_converged({"instances": [{"ready": True}, {"ready": False}]})
    assert not app_converged(None)


def test_a_site_is_whole_only_with_every_raft_link_up() -> None:
    members = [{"host_id": h, "raft": f"{h}:7800"} for h in HOSTS]
    every = [m["raft"] for m in members]
    statuses = {
        h: {**status(h, leader="s1-h1"), "members": members, "reachable": every} for h in HOSTS
    }
    whole: dict[str, Any] = {"status": statuses}
    assert site_whole(whole, fleet=False) and missing_links(whole) == []
    cut = dict(statuses)
    cut["s1-h2"] = {**statuses["s1-h2"], "reachable": [r for r in every if "h3" not in r]}
    broken = {"status": cut}
    assert site_healthy(broken, fleet=False)  # ready, one leader: healthy all the same
    assert not site_whole(broken, fleet=False)
    assert missing_links(broken) == ["s1-h2 -> s1-h3:7800"]


def test_report_json_and_timeline_svg() -> None:
    report = ScenarioReport("kill-leader", 3, 10.0, 0.0, t0=100.0)
    report.faults = [FaultRecord("kill", ("leader",), 2, 5, ("s1-h1",), 2.1, 5.2, 1.5)]
    records = [
        rec(1, "put", 100.5, 101.0, "a"),
        rec(2, "get", 103.0, None, None, "unknown"),
        rec(3, "put", 104.0, 104.1, "b", "fail"),
    ]
    report.op_counts = op_counts(records)
    report.invariants = [check_linearizable(records)[0], check_recovery("r", 1.5, 10)]
    doc = report.to_json()
    assert doc["verdict"] == "pass" and doc["recovery_max_s"] == 1.5
    assert doc["operations"]["put"] == {"ok": 1, "fail": 1, "unknown": 0}
    assert doc["faults"][0]["targets"] == ["s1-h1"]
    svg = timeline_svg(report, records)
    root = ET.fromstring(svg)  # well-formed
    assert root.tag.endswith("svg")
    assert svg.count("<line") >= 3 and "kill s1-h1" in svg
    assert "#c62828" in svg and "#f9a825" in svg and "#2e7d32" in svg
    assert "kill-leader seed=3" in report.summary()


def test_compare_and_set_records() -> None:
    records = [
        {**rec(1, "put_if_absent", 0, 1, "a"), "applied": True},
        {**rec(2, "put_if_absent", 2, 3, "b"), "applied": False},
        {**rec(3, "put_if_absent", 4, None, "c", "unknown"), "applied": None},
        rec(4, "get", 5, 6, "a"),
    ]
    result, _ = check_linearizable(records)
    assert result.status == "pass", result.detail
    final = [rec(9, "get", 10, 11, "b")]
    assert check_acknowledged_writes(records, final, ["k"]).status == "fail"
    for value in ("a", "c"):
        final = [rec(9, "get", 10, 11, value)]
        assert check_acknowledged_writes(records, final, ["k"]).status == "pass"
    records[1]["applied"] = True  # a second CAS cannot apply over a present value
    assert check_linearizable(records)[0].status == "fail"


def test_answers_are_classified_by_what_they_say_about_the_write() -> None:
    error = b'{"error": {"code": "not_committed", "message": "x"}}'
    assert classify_answer("put", 200, b"{}") == ("ok", "")
    assert classify_answer("get", 404, b"") == ("ok", "")
    assert classify_answer("put", 503, error) == ("fail", "503 not_committed")
    assert classify_answer("put", 400, b"garbage")[0] == "fail"
    assert classify_answer("put", 504, b"{}")[0] == "unknown"
    assert classify_answer("delete", 500, b"{}")[0] == "unknown"


async def test_a_resent_request_that_cannot_connect_is_unknown_not_failed(tmp_path: Path) -> None:
    """aiohttp resends a PUT once when the connection drops. If the server took the first
    attempt and then died, the resend is refused: that must not be read as "not applied"."""
    import asyncio

    async def take_and_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        server.close()  # gone: the resend will be refused
        writer.transport.abort()

    server = await asyncio.start_server(take_and_die, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = tmp_path / "h.jsonl"
    args = build_parser().parse_args(
        ["run", "--hosts", f"127.0.0.1:{port}", "--key-prefix", "t", "--keys", "1",
         "--clients", "1", "--duration", "0.01", "--out", str(out)]
    )  # fmt: skip
    with open(out, "w") as fh:
        await run_workload(args, fh)
    (record,) = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    assert record["kind"] == "put"  # the first operation of seed 0
    assert record["status"] == "unknown", record
    assert "resent" in record["detail"]


async def test_a_session_resend_refused_leaves_the_write_unknown(tmp_path: Path) -> None:
    """A write under a client session whose connection drops is resent to another host; if
    that one refuses the connection too (the whole site down), the first attempt may still
    have been applied: unknown, not failed."""
    import asyncio

    async def answer_then_die(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode().lower()
        if "x-meshorch-client:" in head:  # the first write under the session: take it, die
            server.close()
            writer.transport.abort()
            return
        length = next((int(line.split(":")[1]) for line in head.split("\r\n")
                       if line.startswith("content-length:")), 0)  # fmt: skip
        await reader.readexactly(length)
        body = b'{"index": 5}'
        head_out = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nX-Meshorch-Index: 5\r\n"
        writer.write(head_out + b"Connection: close\r\nContent-Length: %d\r\n\r\n" % len(body))
        writer.write(body)
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(answer_then_die, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    out = tmp_path / "h.jsonl"
    args = build_parser().parse_args(
        ["run", "--hosts", f"127.0.0.1:{port}", "--key-prefix", "t", "--keys", "1",
         "--clients", "1", "--duration", "1.0", "--retries", "1", "--out", str(out)]
    )  # fmt: skip
    with open(out, "w") as fh:
        await run_workload(args, fh)
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    resent = [r for r in records if r["resent"]]
    assert resent, records
    assert resent[0]["status"] == "unknown", resent[0]
    assert "earlier attempt" in resent[0]["detail"]
