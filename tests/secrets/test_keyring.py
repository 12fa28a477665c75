"""The pure secrets core: wrapping, tampering, the keyring, the upkeep plan (delivered
secrets opened, rotation, rewrap, old keys deleted) and the delta operations. Raft is
played by applying the planned operations with the real state machine."""

from __future__ import annotations

import base64
import dataclasses
from typing import Any

import orjson
import pytest
from nacl.public import PrivateKey

from meshorch.apps.spec import SecretRef, SpecError, from_json, parse_app_spec, spec_digest, to_json
from meshorch.errors import RemoteInputError
from meshorch.fleet.apply import SiteFacts, build_report, plan_apply
from meshorch.fleet.delta import ALL_SITES, GENESIS_HASH, Delta, TrustState
from meshorch.secrets.keyring import (
    LOCKDOWN_KEY,
    ROTATE_KEY,
    Indexed,
    Keyring,
    Keys,
    SecretRecord,
    SecretUnavailable,
    Snapshot,
    Tampered,
    decrypt,
    init_ops,
    next_step,
    op_writes,
    seal,
    secret_key,
    unwrap,
    wrap,
)
from meshorch.state.tables import SECRETS_TABLE, SITE_TABLES
from raft import Batch, Put, encode_batch
from raft.state_machine import Record, apply_command

KEK = b"k" * 32
SEED = b"s" * 32
DK1 = b"1" * 32
SITE = "shop-1"


class FakeRaft:
    """The real state machine over a dict: what a site's tables would hold."""

    def __init__(self) -> None:
        self.data: dict[tuple[str, bytes], Record] = {}
        self.index = 0

    def propose(self, ops: list[Any]) -> list[Any]:
        self.index += 1
        applied = apply_command(
            encode_batch(Batch(tuple(ops))),
            self.index,
            lambda t, k: self.data.get((t, k)),
            SITE_TABLES,
        )
        for write in applied.writes:
            if write.record is None:
                self.data.pop((write.table, write.key), None)
            else:
                self.data[(write.table, write.key)] = write.record
        return list(applied.results)

    def read(self, table: str, key: bytes) -> bytes | None:
        record = self.data.get((table, key))
        return None if record is None else record.value

    def snapshot(self) -> Snapshot:
        return Snapshot.read(
            (k, Indexed(r.mod_index, r.value))
            for (t, k), r in sorted(self.data.items())
            if t == SECRETS_TABLE
        )


def sealed_op(public: bytes, name: str, value: bytes, version: int = 1) -> dict[str, Any]:
    blob = base64.b64encode(seal(public, value)).decode()
    return {"op": "secret.put", "tenant": "default", "name": name, "version": version,
            "sealed": {SITE: blob}}  # fmt: skip


def converge(raft: FakeRaft, keys: Keys, now: float, steps: int = 20) -> list[str]:
    done = []
    for i in range(steps):
        step = next_step(raft.snapshot(), keys, now, bytes([i + 2]) * 32)
        if step is None:
            return done
        assert raft.propose(step.ops)[0].ok
        done.append(step.what)
    raise AssertionError(f"no fixed point after {steps} steps: {done}")


def initialised() -> tuple[FakeRaft, Keys]:
    raft = FakeRaft()
    assert raft.propose(init_ops(KEK, SEED, DK1, 1000.0))[0].ok
    keyring = raft.snapshot().keyring
    assert keyring is not None
    return raft, Keys.unseal(KEK, keyring)


# -- blobs -----------------------------------------------------------------------------


def test_wrap_round_trip_and_tampering_refused() -> None:
    blob = wrap(KEK, "meshorch/dk/1", b"value")
    assert unwrap(KEK, "meshorch/dk/1", blob) == b"value"
    assert b"value" not in blob
    with pytest.raises(Tampered):
        unwrap(b"x" * 32, "meshorch/dk/1", blob)  # wrong key
    flipped = bytearray(blob)
    flipped[-1] ^= 1
    with pytest.raises(Tampered):
        unwrap(KEK, "meshorch/dk/1", bytes(flipped))  # altered
    with pytest.raises(Tampered):
        unwrap(KEK, "meshorch/dk/2", blob)  # moved to another record
    with pytest.raises(Tampered):
        unwrap(KEK, "meshorch/dk/1", blob[:20])  # truncated


def test_keyring_opens_only_with_the_kek() -> None:
    raft, keys = initialised()
    keyring = raft.snapshot().keyring
    assert keyring is not None
    assert bytes(keys.ssk.public_key) == keyring.ssk_public
    for wrong in (b"x" * 32, b"short", b""):
        with pytest.raises(Tampered):
            Keyring.open(keyring, wrong)
    # A keyring whose public half was swapped for an attacker's is refused too.
    evil = Keyring(bytes(PrivateKey.generate().public_key), keyring.ssk_wrapped, 0.0)
    with pytest.raises(Tampered):
        evil.open(KEK)


def test_only_one_initialisation_wins() -> None:
    raft, _ = initialised()
    before = dict(raft.data)
    results = raft.propose(init_ops(b"o" * 32, b"p" * 32, b"q" * 32, 2000.0))
    assert not results[0].ok and all(r.error == "guarded" for r in results[1:])
    assert raft.data == before


def test_no_key_material_in_plaintext_in_the_table() -> None:
    raft, keys = initialised()
    raft.propose([])
    for record in raft.data.values():
        for secret in (KEK, SEED, DK1, bytes(keys.ssk)):
            for form in (secret, secret.hex().encode(), base64.b64encode(secret)):
                assert form not in record.value


# -- the upkeep plan ---------------------------------------------------------------------


def apply_delta_ops(raft: FakeRaft, ops: list[dict[str, Any]], version: int = 1) -> list[str]:
    trust = TrustState("acme", frozenset({"0" * 64}), version - 1, GENESIS_HASH)
    delta = Delta("acme", version, GENESIS_HASH, 0.0, 1e12, ALL_SITES, tuple(ops), "d" * 64)
    plan = plan_apply([delta], trust, 0, SITE, raft.read)
    raft.propose(plan.ops[1:-1])  # without the trust record and its guard
    return [e.message for e in plan.op_errors]


def test_delivered_secret_is_opened_then_rotation_rewraps_and_deletes_old_keys() -> None:
    raft, keys = initialised()
    public = keys.ssk.public_key.encode()
    ops = [sealed_op(public, "db", b"hunter2"), sealed_op(public, "api", b"k")]
    assert apply_delta_ops(raft, ops) == []
    snap = raft.snapshot()
    assert {s.state for s, _ in snap.secrets.values()} == {"sealed"}
    with pytest.raises(SecretUnavailable, match="not decrypted yet"):
        decrypt(keys, snap, "default", "db")

    assert converge(raft, keys, now=1001.0) == ["decrypt 2 delivered secret(s)"]
    snap = raft.snapshot()
    assert decrypt(keys, snap, "default", "db") == (b"hunter2", 1)
    assert {s.dk for s, _ in snap.secrets.values()} == {1}

    # Asked for: a new key, every secret rewrapped to it, the old key deleted.
    raft.propose(op_writes({"op": "secrets.rotate"}, SITE, 2, raft.read))
    steps = converge(raft, keys, now=1002.0)
    assert steps == [
        "rotate: data key 2 replaces 1",
        "rewrap 2 secret(s) to data key 2",
        "delete data key(s) 1",
    ]
    snap = raft.snapshot()
    assert sorted(snap.dks) == [2] and snap.rotate_index == 0
    assert decrypt(keys, snap, "default", "db") == (b"hunter2", 1)
    assert decrypt(keys, snap, "default", "api") == (b"k", 1)

    # Due by the interval (default 24 h) and not before.
    assert converge(raft, keys, now=1002.0 + 3600) == []
    steps = converge(raft, keys, now=1002.0 + 86400)
    assert steps[0] == "rotate: data key 3 replaces 2" and sorted(raft.snapshot().dks) == [3]
    assert decrypt(keys, raft.snapshot(), "default", "db")[0] == b"hunter2"


def test_a_plan_from_a_stale_view_changes_nothing() -> None:
    raft, keys = initialised()
    public = keys.ssk.public_key.encode()
    apply_delta_ops(raft, [sealed_op(public, "db", b"v1")])
    converge(raft, keys, 1001.0)
    stale = raft.snapshot()
    raft.propose(op_writes({"op": "secrets.rotate"}, SITE, 2, raft.read))
    converge(raft, keys, 1002.0)  # rotated: DK 2 current, DK 1 gone
    before = dict(raft.data)
    # A leader still holding the old view plans a rotation of its own: refused whole.
    stale.rotate_index = 1
    step = next_step(stale, keys, 1003.0, b"z" * 32)
    assert step is not None
    results = raft.propose(step.ops)
    assert results[0].error == "conflict" and raft.data == before


def test_a_secret_sealed_to_another_key_fails_visibly() -> None:
    raft, keys = initialised()
    other = PrivateKey.generate().public_key.encode()
    apply_delta_ops(raft, [sealed_op(other, "db", b"v")])
    converge(raft, keys, 1001.0)
    record = raft.snapshot().secrets[("default", "db")][0]
    assert record.state == "failed" and "cannot be opened" in record.message
    with pytest.raises(SecretUnavailable, match="unusable"):
        decrypt(keys, raft.snapshot(), "default", "db")


def test_a_ciphertext_moved_to_another_secret_does_not_decrypt() -> None:
    raft, keys = initialised()
    public = keys.ssk.public_key.encode()
    apply_delta_ops(raft, [sealed_op(public, "a", b"alpha"), sealed_op(public, "b", b"beta")])
    converge(raft, keys, 1001.0)
    a = raft.snapshot().secrets[("default", "a")][0]
    b = raft.snapshot().secrets[("default", "b")][0]
    swapped = SecretRecord("default", "b", b.version, "ready", a.ciphertext, a.dk)
    raft.propose([Put(SECRETS_TABLE, secret_key("default", "b"), swapped.encode())])
    with pytest.raises(SecretUnavailable, match="does not decrypt"):
        decrypt(keys, raft.snapshot(), "default", "b")


# -- delta operations -------------------------------------------------------------------


def test_secret_put_versions_and_delete() -> None:
    raft, keys = initialised()
    public = keys.ssk.public_key.encode()
    assert apply_delta_ops(raft, [sealed_op(public, "db", b"v2", version=2)]) == []
    assert apply_delta_ops(raft, [sealed_op(public, "db", b"v1", version=1)]) == [
        "default/db version 1 < stored 2"
    ]
    before = dict(raft.data)
    assert apply_delta_ops(raft, [sealed_op(public, "db", b"again", version=2)]) == []
    assert raft.data == before  # the same version again: already here
    assert apply_delta_ops(raft, [sealed_op(public, "db", b"v3", version=3)]) == []
    converge(raft, keys, 1001.0)
    assert decrypt(keys, raft.snapshot(), "default", "db") == (b"v3", 3)
    apply_delta_ops(raft, [{"op": "secret.delete", "tenant": "default", "name": "db"}])
    assert raft.snapshot().secrets == {}


def test_lockdown_unlock_and_rotate_ops() -> None:
    raft = FakeRaft()
    apply_delta_ops(raft, [{"op": "site.lockdown"}], version=7)
    assert orjson.loads(raft.data[(SECRETS_TABLE, LOCKDOWN_KEY)].value)["source"] == "delta 7"
    assert raft.snapshot().lockdown == "delta 7"
    apply_delta_ops(raft, [{"op": "site.unlock"}, {"op": "secrets.rotate"}])
    assert (SECRETS_TABLE, LOCKDOWN_KEY) not in raft.data
    assert (SECRETS_TABLE, ROTATE_KEY) in raft.data


GOOD = base64.b64encode(b"x" * 60).decode()


def put(**changes: Any) -> dict[str, Any]:
    op: dict[str, Any] = {"op": "secret.put", "tenant": "default", "name": "db", "version": 1}
    op["sealed"] = {SITE: GOOD}
    op.update(changes)
    return {k: v for k, v in op.items() if v is not None}


BAD_OPS: list[tuple[dict[str, Any], str]] = [
    (put(sealed=None), "missing fields"),
    (put(value="plain"), "unknown fields"),
    (put(tenant="Bad!"), "'tenant'"),
    (put(name="../x"), "'name'"),
    (put(version=0), "'version'"),
    (put(version=True), "'version'"),
    (put(version="1"), "'version'"),
    (put(sealed=[]), "'sealed'"),
    (put(sealed={"other-site": GOOD}), "no value for site"),
    (put(sealed={SITE: "not base64!"}), "not valid base64"),
    (put(sealed={SITE: 17}), "base64 of at most"),
    (put(sealed={SITE: base64.b64encode(b"short").decode()}), "too short"),
    (put(sealed={SITE: "A" * 200_000}), "base64 of at most"),
    ({"op": "secret.delete", "tenant": "default"}, "missing fields"),
    ({"op": "secret.delete", "tenant": "default", "name": 5}, "'name'"),
    ({"op": "site.lockdown", "now": True}, "unknown fields"),
    ({"op": "secrets.rotate", "key": "x"}, "unknown fields"),
]


@pytest.mark.parametrize(("op", "message"), BAD_OPS)
def test_bad_ops_are_skipped_with_a_clear_message(op: dict[str, Any], message: str) -> None:
    raft, _ = initialised()
    before = dict(raft.data)
    errors = apply_delta_ops(raft, [op])
    assert len(errors) == 1 and message in errors[0], errors
    assert raft.data == before


# -- app spec ---------------------------------------------------------------------------

SPEC = """
api_version: meshorch/v1
name: a
version: "1"
services:
  - name: s
    containers:
      - name: c
        image: process
        command: [sleep, "1"]
        env: {X: "1"}
        resources: {memory_limit: 16Mi}
"""


def test_spec_secrets_parse_and_keep_old_digests() -> None:
    plain = parse_app_spec(SPEC)
    canonical = to_json(plain)
    assert "secrets" not in orjson.dumps(canonical).decode()
    assert spec_digest(from_json(canonical)) == spec_digest(plain)
    with_secrets = parse_app_spec(
        SPEC + "        secrets:\n"
        "          - {name: db-password, env: DB_PASSWORD}\n"
        "          - {name: tls.key, tenant: acme, file: tls/key.pem}\n"
    )
    refs = with_secrets.services[0].containers[0].secrets
    assert refs == (
        SecretRef("db-password", "default", "db-password", "DB_PASSWORD"),
        SecretRef("tls.key", "acme", "tls/key.pem", None),
    )
    assert from_json(to_json(with_secrets)) == with_secrets
    assert spec_digest(with_secrets) != spec_digest(plain)


def test_spec_secret_problems_are_listed() -> None:
    text = SPEC + (
        "        secrets:\n"
        "          - {name: ../x}\n"
        "          - {name: a, file: /etc/x}\n"
        "          - {name: b, tenant: BAD, bogus: 1}\n"
        "          - {name: c, env: X}\n"
        "          - {name: d, file: same}\n"
        "          - {name: e, file: same}\n"
        "          - 5\n"
    )
    with pytest.raises(SpecError) as caught:
        parse_app_spec(text)
    problems = "\n".join(caught.value.problems)
    for expected in (
        "secrets[0].name: '../x' is not a secret name",
        "secrets[1].file: '/etc/x' is not a relative path",
        "secrets[2].bogus: unknown field",
        "secrets[2].tenant: 'BAD' is not a tenant",
        "secrets[5]: file same is already declared by",
        "secrets[6]: must be a mapping",
    ):
        assert expected in problems, problems
    with pytest.raises(SpecError, match="X is also set in env"):
        parse_app_spec(SPEC + "        secrets: [{name: c, env: X}]\n")


def test_remote_input_error_codes() -> None:
    with pytest.raises(RemoteInputError) as caught:
        op_writes({"op": "secret.nope"}, SITE, 1, lambda t, k: None)
    assert caught.value.code == "unknown_op"


def test_the_site_report_carries_the_secrets_public_key() -> None:
    trust = TrustState("acme", frozenset({"0" * 64}))
    facts = SiteFacts(specs=[], placements=[], reports={}, rollouts={}, hosts=[])
    assert "secrets_public_key" not in build_report(SITE, 1.0, trust, [], facts)
    with_key = dataclasses.replace(facts, secrets_public_key="ab" * 32)
    assert build_report(SITE, 1.0, trust, [], with_key)["secrets_public_key"] == "ab" * 32
