"""The pure parts of the report relay (``central_hub.relay``): the push's authentication,
what a report answer carries, when a report must reach the leader at once, the push's
shape. The relay itself runs in real replicas: tests/hub/test_soft_reports.py."""

from __future__ import annotations

import copy
from typing import Any

import orjson
import pytest

from central_hub.relay import answer_of, parse_push, progress, relay_authentic, relay_header

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
    ],
)
def test_a_malformed_push_is_refused(body: bytes) -> None:
    with pytest.raises(ValueError):
        parse_push(body)


def test_a_push_is_parsed() -> None:
    entry = {"site": "s", "report": _report(), "nonce": "ab", "signed_at": 1.5}
    assert parse_push(orjson.dumps({"v": 1, "reports": [entry]})) == [entry]
