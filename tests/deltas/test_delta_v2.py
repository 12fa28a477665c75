"""Format 2 deltas (per-site views): the body signs ``ops_hash``; a site gets the operations
only of the deltas that target it, and every header, so the chain stays whole."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from nacl.signing import SigningKey

from meshorch.fleet import delta as d
from tests.deltas.conftest import NOW, Log, fresh_state

SECRET_ENV = {"op": "app.put", "spec": {"name": "payroll", "env": {"DB_PASSWORD": "hunter2"}}}


@pytest.fixture
def log(root: SigningKey) -> Log:
    return Log(root, d.DELTA_V2)


def for_b() -> d.Target:
    return d.Target(sites=frozenset({"shop-b"}))


def test_the_body_signs_the_hash_of_the_ops_which_travel_beside_it(log: Log) -> None:
    raw = log.append([SECRET_ENV], for_b())
    envelope = orjson.loads(raw)
    body = orjson.loads(envelope["body"])
    assert body["v"] == 2 and "ops" not in body
    assert body["ops_hash"] == d.digest_of(envelope["ops"].encode())
    assert b"hunter2" not in envelope["body"].encode()


def test_a_site_not_targeted_gets_the_header_and_applies_it_as_a_no_op(
    log: Log, root: SigningKey
) -> None:
    raw = log.append([SECRET_ENV], for_b())
    header = d.view_for(raw, "shop-a")
    assert b"payroll" not in header and b"hunter2" not in header
    assert d.view_for(raw, "shop-b") == raw
    delta, after = d.verify(header, fresh_state(root), NOW, "shop-a")
    assert delta.ops == () and not delta.has_ops
    assert (after.version, after.head) == (1, log.head)
    # the chain goes on from the header: the next delta for A applies with its ops
    nxt = log.append([{"op": "app.delete", "name": "web"}], d.Target(sites=frozenset({"shop-a"})))
    delta2, after2 = d.verify(d.view_for(nxt, "shop-a"), after, NOW, "shop-a")
    assert delta2.ops == ({"op": "app.delete", "name": "web"},)
    assert after2.version == 2


def test_ops_that_do_not_match_the_hash_are_refused(log: Log, root: SigningKey) -> None:
    raw = log.append([SECRET_ENV], for_b())
    envelope = orjson.loads(raw)
    envelope["ops"] = envelope["ops"].replace("hunter2", "pwned!!")
    forged = orjson.dumps(envelope)
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(forged, fresh_state(root), NOW, "shop-b")
    assert info.value.reason == "ops_mismatch"
    # also when the site is not targeted: garbage is garbage
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(forged, fresh_state(root), NOW, "shop-a")
    assert info.value.reason == "ops_mismatch"


def test_a_targeted_site_given_only_the_header_refuses_it(log: Log, root: SigningKey) -> None:
    raw = log.append([SECRET_ENV], for_b())
    header = d.view_for(raw, "shop-a")
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(header, fresh_state(root), NOW, "shop-b")
    assert info.value.reason == "ops_missing"
    every = log.append([{"op": "tenant.quota", "tenant": "t"}], d.ALL_SITES)
    stripped = orjson.dumps({k: v for k, v in orjson.loads(every).items() if k != "ops"})
    state = d.verify(d.view_for(raw, "shop-a"), fresh_state(root), NOW, "shop-a")[1]
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(stripped, state, NOW, "shop-a")
    assert info.value.reason == "ops_missing"


def test_ops_relayed_to_a_site_not_targeted_are_dropped(log: Log, root: SigningKey) -> None:
    raw = log.append([SECRET_ENV], for_b())
    delta, _ = d.verify(raw, fresh_state(root), NOW, "shop-a")
    assert delta.ops == () and not delta.has_ops


def test_a_v1_chain_followed_by_v2(log: Log, root: SigningKey) -> None:
    raws = [
        log.append([{"op": "app.delete", "name": "x"}], d.ALL_SITES, form=d.DELTA_V1),
        log.append([SECRET_ENV], for_b(), form=d.DELTA_V1),
        log.append([SECRET_ENV], for_b()),
        log.append([], d.ALL_SITES),
    ]
    views = [d.view_for(raw, "shop-a") for raw in raws]
    assert views[:2] == raws[:2]  # format 1 goes as it is
    assert b"hunter2" not in views[2]
    result = d.verify_batch(views, fresh_state(root), NOW, "shop-a")
    assert result.rejected is None and result.state is not None
    assert (result.state.version, result.state.head) == (4, log.head)


def test_a_v2_rotation_needs_its_ops(log: Log, root: SigningKey) -> None:
    new = SigningKey(b"n" * 32)
    raw = log.append([{"op": d.ROTATE_OP, "new_key": d.key_id(new)}], d.ALL_SITES, keys=[root, new])
    _, after = d.verify(raw, fresh_state(root), NOW, "shop-a")
    assert after.trusted_keys == {d.key_id(new)}
    # a forged header of a rotation cannot be passed off as a no-op
    stripped = orjson.dumps({k: v for k, v in orjson.loads(raw).items() if k != "ops"})
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(stripped, fresh_state(root), NOW, "shop-a")
    assert info.value.reason == "ops_missing"


@pytest.mark.parametrize(
    "mutate",
    [
        lambda e: {**e, "ops": 5},
        lambda e: {**e, "ops": "not json"},
        lambda e: {**e, "extra": 1},
    ],
)
def test_garbage_around_v2_is_malformed_or_mismatched(
    log: Log, root: SigningKey, mutate: Any
) -> None:
    raw = log.append([SECRET_ENV], for_b())
    bad = orjson.dumps(mutate(orjson.loads(raw)))
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(bad, fresh_state(root), NOW, "shop-b")
    assert info.value.reason in ("malformed", "ops_mismatch")


def test_a_v1_envelope_with_ops_beside_is_malformed(log: Log, root: SigningKey) -> None:
    raw = log.append([SECRET_ENV], for_b(), form=d.DELTA_V1)
    bad = orjson.dumps({**orjson.loads(raw), "ops": "[]"})
    with pytest.raises(d.DeltaRejected) as info:
        d.verify(bad, fresh_state(root), NOW, "shop-b")
    assert info.value.reason == "malformed"
