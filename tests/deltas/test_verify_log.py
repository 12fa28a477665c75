"""The offline check of an exported delta log (meshorch.fleet.verify_log), on chains built
with real keys: each way a log can be wrong is reported with its line, version and reason."""

from __future__ import annotations

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.fleet import delta as d
from meshorch.fleet.verify_log import LogReport, verify_log
from tests.deltas.conftest import NOW, TTL, Log

APP = {"op": "app.put", "tenant": "t1", "spec": {"name": "web", "version": "2.0"}}
SHOP = d.Target(sites=frozenset({"shop-1"}))
OTHER = d.Target(sites=frozenset({"shop-2"}))


def chain(root: SigningKey, form: int = d.DELTA_V2) -> Log:
    log = Log(root, form)
    log.append([APP], SHOP)
    log.append([{"op": "app.delete", "tenant": "t1", "name": "old"}], OTHER)
    log.append([])
    log.append([{"op": "site.lockdown"}], SHOP)
    return log


def check(lines: list[bytes], root: SigningKey, **kw: object) -> LogReport:
    return verify_log(lines, d.key_id(root), NOW + 10, **kw)  # type: ignore[arg-type]


def where(report: LogReport) -> tuple[str, int | None, int | None]:
    assert report.problem is not None, "the log verified"
    return report.problem.reason, report.problem.version, report.problem.line


@pytest.mark.parametrize("form", d.DELTA_FORMATS)
def test_a_whole_log_verifies_and_says_what_each_delta_did(root: SigningKey, form: int) -> None:
    log = chain(root, form)
    report = check(log.envelopes, root, head=4, head_hash=log.head)
    assert report.ok, report.problem
    assert [e.delta.version for e in report.entries] == [1, 2, 3, 4]
    assert report.anchor == "genesis" and report.anchoring == "start"
    assert report.entries[0].actions == ["app.put t1/web version 2.0"]
    assert report.entries[1].actions == ["app.delete t1/old"]
    assert report.entries[2].actions == ["heartbeat (no operations)"]
    assert report.entries[3].actions == ["site.lockdown"]
    assert report.head == log.head


def test_a_tampered_line_is_a_bad_signature_at_its_version(root: SigningKey) -> None:
    log = chain(root, d.DELTA_V1)
    lines = list(log.envelopes)
    lines[0] = lines[0].replace(b"2.0", b"6.6")  # the body says another version
    assert where(check(lines, root)) == ("bad_signature", 1, 1)


def test_tampered_operations_of_format_2_do_not_match_their_signed_hash(
    root: SigningKey,
) -> None:
    lines = list(chain(root).envelopes)
    lines[0] = lines[0].replace(b"2.0", b"6.6")  # only the ops string: not signed itself
    assert where(check(lines, root)) == ("ops_mismatch", 1, 1)


def test_a_reordered_pair_is_out_of_order(root: SigningKey) -> None:
    lines = list(chain(root).envelopes)
    lines[1], lines[2] = lines[2], lines[1]
    report = check(lines, root)
    assert where(report) == ("out_of_order", 3, 2)
    assert "before version 2 (line 3)" in str(report.problem)
    assert [e.delta.version for e in report.entries] == [1]  # verified up to there


def test_missing_and_repeated_versions(root: SigningKey) -> None:
    lines = list(chain(root).envelopes)
    assert where(check([lines[0], lines[3]], root)) == ("gap", 4, 2)
    assert "version 2 to 3 missing" in str(check([lines[0], lines[3]], root).problem)
    assert where(check([lines[0], lines[1], lines[1]], root)) == ("duplicate", 2, 3)
    assert where(check([lines[0], lines[1], lines[1], lines[2]], root)) == ("duplicate", 2, 3)
    assert where(check([lines[0], lines[1], lines[0], lines[2]], root)) == ("duplicate", 1, 3)


def test_a_wrong_root_key_or_a_log_forged_with_another_key(root: SigningKey) -> None:
    lines = chain(root).envelopes
    stranger = SigningKey(b"s" * 32)
    assert where(check(lines, stranger)) == ("wrong_root", 1, 1)
    forged = chain(stranger).envelopes  # a whole log signed by a key that is not the root
    assert where(check(forged, root)) == ("wrong_root", 1, 1)


def test_rotations_the_root_key_at_the_start_or_now(root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    log = chain(root)
    log.append([{"op": d.ROTATE_OP, "new_key": d.key_id(new)}], keys=[root, new])
    log.key = new
    log.append([APP], SHOP)
    for key in (root, new):  # the key then, or the key now
        report = check(log.envelopes, key)
        assert report.ok, report.problem
        assert report.anchoring == ("start" if key is root else "end")
        assert report.trusted_at_end == {d.key_id(new)}
    assert report.entries[4].actions == [f"root.rotate to key {d.key_id(new)}"]
    # After the rotation the old key is no longer trusted.
    log.key = root
    log.append([])
    assert where(check(log.envelopes, root)) == ("unknown_key", 7, 7)
    # A rotation not signed by its new key.
    bad = Log(root)
    bad.append([{"op": d.ROTATE_OP, "new_key": d.key_id(new)}], keys=[root])
    assert where(check(bad.envelopes, root)) == ("bad_signature", 1, 1)


def test_a_truncated_log(root: SigningKey) -> None:
    log = chain(root)
    lines = list(log.envelopes)
    assert where(check(lines[:2], root, head=4)) == ("truncated", 2, 2)
    assert check(lines[:2], root).ok  # without the head, a shorter log is a log
    cut = [*lines[:3], lines[3][: len(lines[3]) // 2]]  # the last line cut mid-way
    reason, version, line = where(check(cut, root))
    assert (reason, version, line) == ("malformed", None, 4)
    other = "ab" * 32
    assert where(check(lines, root, head=4, head_hash=other)) == ("past_head", 4, 4)


def test_expiry_as_of_a_time(root: SigningKey) -> None:
    log = Log(root)
    log.append([APP], SHOP, now=NOW)
    log.append([], now=NOW + TTL / 2)
    key = d.key_id(root)
    assert verify_log(log.envelopes, key, NOW + TTL - 1).ok
    # Delta 1 expired, delta 2 is fresh: it vouches for delta 1 (as at a site).
    assert verify_log(log.envelopes, key, NOW + TTL + 1).ok
    report = verify_log(log.envelopes, key, NOW + 2 * TTL)
    assert where(report) == ("expired", 1, 1)
    assert [e.delta.version for e in report.entries] == [1, 2]


def test_a_log_that_starts_later_is_anchored_at_its_first_prev(root: SigningKey) -> None:
    lines = chain(root).envelopes
    report = check(lines[2:], root)
    assert report.ok and report.anchor == "first_prev" and report.first_version == 3
    forged = orjson.loads(lines[0])
    body = orjson.loads(forged["body"])
    body["prev"] = "11" * 32  # a version 1 that does not start at the genesis
    first = d.Delta(
        fleet=body["fleet"], version=1, prev=body["prev"], issued_at=NOW, expires_at=NOW + TTL,
        target=d.ALL_SITES, ops=(),
    )  # fmt: skip
    envelope, _ = d.sign(first, [root])
    assert where(check([envelope], root)) == ("chain_mismatch", 1, 1)


def test_a_sites_view(root: SigningKey) -> None:
    log = chain(root)
    view = [d.view_for(raw, "shop-1") for raw in log.envelopes]
    assert view[1] != log.envelopes[1]  # delta 2 is for shop-2: shop-1 sees its header
    assert where(check(view, root)) == ("ops_missing", 2, 2)
    assert "give the site" in str(check(view, root).problem)
    report = check(view, root, site="shop-1")
    assert report.ok, report.problem
    assert report.entries[1].actions == ["operations not in this view (for sites shop-2)"]
    # A header of a delta for the site itself is refused: its operations were dropped.
    dropped = [d.view_for(raw, "shop-2") for raw in log.envelopes]
    assert where(check(dropped, root, site="shop-1")) == ("ops_missing", 1, 1)


def test_garbage_and_empty_logs(root: SigningKey) -> None:
    assert where(check([], root))[0] == "empty"
    assert where(check([b"\n", b"  "], root))[0] == "empty"
    assert where(check([b"not json"], root)) == ("malformed", None, 1)
    assert where(check([b"x" * (d.MAX_DELTA_BYTES + 1)], root)) == ("too_large", None, 1)
    lines = chain(root).envelopes
    assert where(check([lines[0], b"[1, 2]"], root)) == ("malformed", None, 2)
