"""The delta verifier: every attack is refused with its reason and the state stays put."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.fleet import delta as d
from tests.deltas.conftest import FLEET, NOW, TTL, Log, fresh_state


@pytest.fixture
def log(root: SigningKey) -> Log:
    return Log(root)


def rejected(raw: bytes, state: d.TrustState, now: float = NOW) -> str:
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(raw, state, now)
    return info.value.reason


def test_chain_applies_in_order(log: Log, root: SigningKey) -> None:
    state = fresh_state(root)
    for i in range(3):
        delta, state = d.verify(log.append([{"op": "app.delete", "name": f"a{i}"}]), state, NOW)
        assert delta.version == i + 1
    assert state.version == 3
    assert state.head == log.head


def test_replay_of_applied_delta(log: Log, root: SigningKey) -> None:
    raw = log.append()
    _, state = d.verify(raw, fresh_state(root), NOW)
    assert rejected(raw, state) == "replay"


def test_rollback_to_older_version(log: Log, root: SigningKey) -> None:
    old = log.append()
    result = d.verify_batch([old, log.append(), log.append()], fresh_state(root), NOW)
    assert result.state is not None and result.state.version == 3
    assert rejected(old, result.state) == "rollback"


def test_expired_delta(log: Log, root: SigningKey) -> None:
    raw = log.append(now=NOW - 2 * TTL)
    assert rejected(raw, fresh_state(root)) == "expired"


def test_expired_chain_accepted_through_fresh_tip(log: Log, root: SigningKey) -> None:
    stale = [log.append(now=NOW - 2 * TTL) for _ in range(3)]
    tip = log.append(now=NOW)
    result = d.verify_batch([*stale, tip], fresh_state(root), NOW)
    assert result.rejected is None
    assert [x.version for x in result.accepted] == [1, 2, 3, 4]


def test_stale_suffix_is_cut_at_last_fresh_delta(log: Log, root: SigningKey) -> None:
    fresh = log.append(now=NOW)
    stale = log.append(now=NOW - 2 * TTL)
    result = d.verify_batch([fresh, stale], fresh_state(root), NOW)
    assert [x.version for x in result.accepted] == [1]
    assert result.rejected is not None and result.rejected.reason == "expired"
    assert result.state is not None and result.state.version == 1


def test_unknown_key(root: SigningKey) -> None:
    intruder = Log(SigningKey(b"x" * 32))
    assert rejected(intruder.append(), fresh_state(root)) == "unknown_key"


def test_bad_signature_over_changed_body(log: Log, root: SigningKey) -> None:
    envelope = orjson.loads(log.append([{"op": "app.delete", "name": "web"}]))
    envelope["body"] = envelope["body"].replace('"web"', '"db"')
    assert rejected(orjson.dumps(envelope), fresh_state(root)) == "bad_signature"


def test_valid_signature_with_broken_chain(log: Log, root: SigningKey) -> None:
    first = log.append()
    _, state = d.verify(first, fresh_state(root), NOW)
    # Correctly signed by the root key, but its prev is not the applied head.
    forged = d.next_delta(FLEET, 1, "ab" * 32, [], d.ALL_SITES, NOW, TTL)
    envelope, _ = d.sign(forged, [root])
    assert rejected(envelope, state) == "chain_mismatch"


def test_fork_at_same_version(log: Log, root: SigningKey) -> None:
    _, state = d.verify(log.append(), fresh_state(root), NOW)
    other = d.next_delta(FLEET, 0, d.GENESIS_HASH, [{"op": "x"}], d.ALL_SITES, NOW, TTL)
    envelope, _ = d.sign(other, [root])
    assert rejected(envelope, state) == "chain_mismatch"


def test_gap_asks_for_missing_versions(log: Log, root: SigningKey) -> None:
    log.append()
    assert rejected(log.append(), fresh_state(root)) == "gap"


def test_truncated(log: Log, root: SigningKey) -> None:
    raw = log.append()
    state = fresh_state(root)
    for cut in (1, len(raw) // 2, len(raw) - 1):
        assert rejected(raw[:cut], state) == "malformed"


def test_oversized(root: SigningKey) -> None:
    state = fresh_state(root)
    assert rejected(b" " * (d.MAX_DELTA_BYTES + 1), state) == "too_large"
    huge = d.next_delta(FLEET, 0, d.GENESIS_HASH, [{"op": "x", "pad": "p" * d.MAX_DELTA_BYTES}],
                        d.ALL_SITES, NOW, TTL)  # fmt: skip
    with pytest.raises(ValueError, match="over"):
        d.sign(huge, [root])


def test_wrong_fleet(root: SigningKey) -> None:
    other = d.next_delta("other", 0, d.GENESIS_HASH, [], d.ALL_SITES, NOW, TTL)
    envelope, _ = d.sign(other, [root])
    assert rejected(envelope, fresh_state(root)) == "wrong_fleet"


def rotation(new: SigningKey) -> list[dict[str, Any]]:
    return [{"op": d.ROTATE_OP, "new_key": d.key_id(new)}]


def test_root_rotation_signed_by_both(log: Log, root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    state = fresh_state(root)
    _, state = d.verify(log.append(rotation(new), keys=[root, new]), state, NOW)
    assert state.trusted_keys == {d.key_id(new)}
    # The old key is no longer enough; the new one is.
    assert rejected(d.sign(d.next_delta(FLEET, 1, log.head, [], d.ALL_SITES, NOW, TTL),
                           [root])[0], state) == "unknown_key"  # fmt: skip
    _, state = d.verify(log.append(keys=[new]), state, NOW)
    assert state.version == 2


def test_root_rotation_signed_only_by_new_key(log: Log, root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    assert rejected(log.append(rotation(new), keys=[new]), fresh_state(root)) == "unknown_key"


def test_root_rotation_signed_only_by_old_key(log: Log, root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    assert rejected(log.append(rotation(new), keys=[root]), fresh_state(root)) == "bad_signature"


def test_rotation_must_target_all(log: Log, root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    raw = log.append(rotation(new), target=d.Target(sites=frozenset({"s1"})), keys=[root, new])
    assert rejected(raw, fresh_state(root)) == "malformed"


def test_target_includes() -> None:
    target = d.Target(sites=frozenset({"a", "b"}))
    assert target.includes("a") and not target.includes("c")
    assert d.ALL_SITES.includes("anything")


def test_trust_state_round_trips(root: SigningKey) -> None:
    state = replace(fresh_state(root), version=9, head="cd" * 32)
    assert d.TrustState.from_json(orjson.loads(orjson.dumps(state.to_json()))) == state


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: {**b, "version": 0},
        lambda b: {**b, "version": True},
        lambda b: {**b, "version": "2"},
        lambda b: {**b, "prev": "zz"},
        lambda b: {**b, "expires_at": "soon"},
        lambda b: {**b, "target": {"sites": [1]}},
        lambda b: {**b, "target": {"all": False}},
        lambda b: {**b, "ops": {}},
        lambda b: {**b, "ops": [1]},
        lambda b: {**b, "v": 2},
        lambda b: {k: v for k, v in b.items() if k != "fleet"},
        lambda b: {**b, "extra": 1},
    ],
)
def test_schema_violations_are_malformed_even_when_signed(mutate: Any, root: SigningKey) -> None:
    body = d.next_delta(FLEET, 0, d.GENESIS_HASH, [], d.ALL_SITES, NOW, TTL).body_json()
    raw_body = orjson.dumps(mutate(body))
    envelope = orjson.dumps(
        {"body": raw_body.decode(), "sigs": [{"key": d.key_id(root),
                                              "sig": root.sign(raw_body).signature.hex()}]}
    )  # fmt: skip
    assert rejected(envelope, fresh_state(root)) == "malformed"
