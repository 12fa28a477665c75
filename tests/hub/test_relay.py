"""The report relay (``central_hub.relay``): the push's authentication, what a report
answer carries, when a report must reach the leader at once, the push's shape, and what a
follower pushes for each report. The relay runs in real replicas in
tests/hub/test_soft_reports.py."""

from __future__ import annotations

import asyncio
import copy
from pathlib import Path
from typing import Any

import orjson
import pytest

from central_hub.fleetview import progress_digest
from central_hub.relay import (
    Push,
    ReportRelay,
    answer_of,
    parse_push,
    progress,
    relay_authentic,
    relay_header,
)
from central_hub.replay import NonceCache
from central_hub.reports import RENEW_S
from central_hub.store import Store

KEY = b"k" * 32


def test_a_push_is_authentic_only_unchanged_with_the_key_and_recent() -> None:
    body = b'{"v":1,"reports":[]}'
    header = relay_header(KEY, 1000.0, body)
    assert relay_authentic(KEY, header, body, 1010.0)
    assert not relay_authentic(KEY, header, body + b" ", 1010.0)
    assert not relay_authentic(b"x" * 32, header, body, 1010.0)
    assert not relay_authentic(KEY, header, body, 1031.0)  # too old
    assert not relay_authentic(KEY, header.replace("1000.000", "1005.000"), body, 1010.0)
    assert not relay_authentic(KEY, "nan " + header.split()[1], body, 1010.0)
    assert not relay_authentic(KEY, "", body, 1010.0)


def test_the_answer_is_what_the_leader_answers() -> None:
    report = {"applied_version": 7}
    assert answer_of(12, (9, False), report) == {"head": 12, "site_head": 9}
    assert answer_of(12, (None, False), report) == {"head": 12}
    assert answer_of(12, (9, True), report) == {"head": 7, "site_head": 7, "held": True}


def _report() -> dict[str, Any]:
    return {
        "v": 1, "site": "s", "time": 1.0, "applied_version": 3, "applied_head": "ab",
        "rejections": [], "apps": {"pos": {"version": "1", "state": "healthy"}},
        "hosts": [{"host_id": "h1", "alive": True, "instances": [],
                   "resources": {"load1": 0.5}}],
    }  # fmt: skip


def test_progress_ignores_the_time_and_resource_samples_only() -> None:
    base = _report()
    same = copy.deepcopy(base)
    same["time"] = 2.0
    same["hosts"][0]["resources"]["load1"] = 1.5
    assert progress(same) == progress(base)
    for change in (
        lambda r: r.update(applied_version=4),
        lambda r: r["apps"]["pos"].update(state="degraded"),
        lambda r: r["hosts"][0].update(alive=False),
        lambda r: r["rejections"].append({"reason": "x"}),
        lambda r: r.update(decommission={"state": "done"}),
        lambda r: r.update(secrets_public_key="00" * 32),
    ):
        changed = copy.deepcopy(base)
        change(changed)
        assert progress(changed) != progress(base), changed


@pytest.mark.parametrize(
    "body",
    [
        b"[]",
        b'{"v":2,"reports":[]}',
        b'{"v":1}',
        b'{"v":1,"reports":[{"site":"s","report":{},"nonce":"n"}]}',
        b'{"v":1,"reports":[{"site":1,"report":{},"nonce":"n","signed_at":1}]}',
        b'{"v":1,"reports":[{"site":"s","report":{},"nonce":"n","signed_at":true}]}',
        b'{"v":1,"reports":[],"seen":{}}',
        b'{"v":1,"reports":[],"seen":[["s","n",1,2]]}',
        b'{"v":1,"reports":[],"seen":[["s","n",1,2,3]]}',
        b'{"v":1,"reports":[],"seen":[["s","n",1,"later","d"]]}',
        b'{"v":1,"reports":[],"seen":[[1,"n",1,2,"d"]]}',
        b'{"v":1,"reports":[],"seen":[["s","n",false,2,"d"]]}',
    ],
)
def test_a_malformed_push_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_push(body)


def test_a_push_is_parsed() -> None:
    entry = {"site": "s", "report": _report(), "nonce": "ab", "signed_at": 1.5}
    # An older replica's push has no marks.
    assert parse_push(orjson.dumps({"v": 1, "reports": [entry]})) == Push([entry], [])
    marks = [["t", "cd", 2, 3.5, "ef"]]
    pushed = parse_push(orjson.dumps({"v": 1, "reports": [], "seen": marks}))
    assert pushed == Push([], [("t", "cd", 2.0, 3.5, "ef")])


async def test_a_follower_pushes_unchanged_reports_as_marks_and_in_full_now_and_then(
    tmp_path: Path,
) -> None:
    """The follower's choice per report (``ReportRelay._keep``), against a leader that
    answers pushes as ``merge`` does: a mark of a site whose report it keeps is answered,
    another is not."""
    pushes: list[Push] = []
    kept = {"s"}  # the sites whose report the leader keeps

    async def leader(body: bytes) -> dict[str, Any]:
        push = parse_push(body)
        pushes.append(push)
        answers = {entry["site"]: [7, False] for entry in push.reports}
        answers.update({site: [7, False] for site, *_ in push.seen if site in kept})
        return {"v": 1, "head": 9, "sites": answers}

    clock = [1000.0]
    relay = ReportRelay(
        "hub:1", Store(tmp_path / "store"), leader, lambda: clock[0], NonceCache(), 1 << 20,
        push_every_s=0.01,
    )  # fmt: skip
    await relay.start()
    try:

        async def report(seconds_later: float, applied: int = 3) -> tuple[dict[str, Any], Push]:
            clock[0] += seconds_later
            sent = {**_report(), "time": clock[0], "applied_version": applied}
            before = len(pushes)
            status, answer = await relay._keep("s", sent, f"n{clock[0]}", clock[0], clock[0])
            assert status == 200
            for _ in range(500):
                if len(pushes) > before:
                    break
                await asyncio.sleep(0.01)
            return answer, pushes[-1]

        answer, push = await report(0)  # the first: in full, answered after its push
        assert answer == {"head": 9, "site_head": 7} and [e["site"] for e in push.reports] == ["s"]
        answer, push = await report(3)  # unchanged: a mark, with the report's own time
        assert answer == {"head": 9, "site_head": 7}
        digest = progress_digest(progress({**_report(), "time": 0.0}))
        assert push.reports == [] and push.seen == [("s", "n1003.0", 1003.0, 1003.0, digest)]
        answer, push = await report(RENEW_S)  # unchanged, but its samples are old
        assert [e["site"] for e in push.reports] == ["s"] and push.seen == []
        kept.clear()  # a new leader, which keeps no report of the site
        answer, push = await report(3)
        assert push.reports == [] and [site for site, *_ in push.seen] == ["s"]
        answer, push = await report(3)  # not answered: this one goes in full
        assert [e["site"] for e in push.reports] == ["s"] and push.seen == []
        answer, push = await report(1, applied=4)  # progress: in full at once
        assert [e["report"]["applied_version"] for e in push.reports] == [4]
    finally:
        await relay.stop()
