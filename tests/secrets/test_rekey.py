"""The rekey after a revocation, pure: a new KEK and SSK, every data key under the new
KEK, the removed hosts' host keys gone; guarded, idempotent, refused from a stale view.
Raft is played by the real state machine (``FakeRaft``)."""

from __future__ import annotations

import pytest
from nacl.public import PrivateKey

from meshorch.secrets.keyring import (
    PREVIOUS_SSK_KEEP_S,
    SSK_CONTEXT,
    Keys,
    Membership,
    Snapshot,
    Tampered,
    decrypt,
    dk_context,
    encode_hostkey,
    hostkey_key,
    init_ops,
    next_step,
    open_sealed,
    previous_ssk_context,
    rekey_reasons,
    rekey_step,
    seal,
    secret_context,
    unwrap,
)
from meshorch.state.tables import SECRETS_TABLE
from raft import Put
from tests.secrets.test_keyring import (
    KEK,
    FakeRaft,
    apply_delta_ops,
    converge,
    initialised,
    sealed_op,
)

NEW_KEK, NEW_SEED, NEW_DK = b"K" * 32, b"S" * 32, b"D" * 32
HOSTS = ("h1", "h2", "h3")
HOST_KEYS = {h: PrivateKey(h.encode() * 16 + b"\0" * (32 - 2 * 16)) for h in HOSTS}
STAYING = Membership(frozenset({"h1", "h2"}), {"h3": 40})


def site_with_secrets() -> tuple[FakeRaft, Keys]:
    """Keys made, three hosts registered, two secrets delivered and opened, one rotation."""
    raft, keys = initialised()
    for host in HOSTS:
        public = bytes(HOST_KEYS[host].public_key)
        raft.propose([Put(SECRETS_TABLE, hostkey_key(host), encode_hostkey(public))])
    public = keys.ssk.public_key.encode()
    apply_delta_ops(raft, [sealed_op(public, "db", b"hunter2"), sealed_op(public, "api", b"k")])
    converge(raft, keys, 1001.0)
    apply_delta_ops(raft, [{"op": "secrets.rotate"}], version=2)
    converge(raft, keys, 1002.0)
    return raft, keys


def rekey(raft: FakeRaft, keys: Keys, membership: Membership = STAYING) -> Keys:
    plan = rekey_step(raft.snapshot(), keys, membership, 2000.0, NEW_KEK, NEW_SEED, NEW_DK)
    assert plan is not None
    assert plan.committed(raft.propose(plan.ops))
    return plan.keys


def opens_with(kek: bytes, snap: Snapshot) -> list[str]:
    """Every wrapped record of the table that ``kek`` opens."""
    assert snap.keyring is not None
    opened = []
    for context, blob in [
        (SSK_CONTEXT, snap.keyring.ssk_wrapped),
        *[(previous_ssk_context(p.public), p.wrapped) for p in snap.keyring.previous],
        *[(dk_context(d.id), d.wrapped) for d in snap.dks.values()],
    ]:
        try:
            unwrap(kek, context, blob)
            opened.append(context)
        except Tampered:
            pass
    return opened


def test_a_revocation_rekeys_everything_the_host_knew() -> None:
    raft, old = site_with_secrets()
    before = raft.snapshot()
    assert before.keyring is not None and opens_with(KEK, before)  # the revoked host's view
    assert rekey_reasons(before, STAYING) == ["h3"]

    plan = rekey_step(before, old, STAYING, 2000.0, NEW_KEK, NEW_SEED, NEW_DK)
    assert plan is not None and sorted(plan.recipients) == ["h1", "h2"]
    assert plan.committed(raft.propose(plan.ops))
    keys = plan.keys
    snap = raft.snapshot()
    assert snap.keyring is not None
    assert snap.keyring.ssk_public != before.keyring.ssk_public
    assert (snap.keyring.generation, snap.keyring.revoked_index) == (2, 40)
    assert "h3" not in snap.hostkeys and sorted(snap.hostkeys) == ["h1", "h2"]
    assert opens_with(KEK, snap) == []  # the old KEK opens no wrapped record any more
    assert len(opens_with(NEW_KEK, snap)) == 2 + len(snap.dks)
    assert not old.matches(snap.keyring) and keys.matches(snap.keyring)
    with pytest.raises(Tampered):
        Keys.unseal(KEK, snap.keyring)
    assert Keys.unseal(NEW_KEK, snap.keyring).matches(snap.keyring)

    # The usual upkeep rewraps every secret to the new data key and deletes the old ones;
    # keys from before the rekey plan nothing.
    assert next_step(snap, old, 2001.0, b"x" * 32) is None
    assert converge(raft, keys, 2001.0) == [
        "rewrap 2 secret(s) to data key 3",
        "delete data key(s) 2",
    ]
    snap = raft.snapshot()
    assert sorted(snap.dks) == [3] and opens_with(KEK, snap) == []
    assert decrypt(keys, snap, "default", "db") == (b"hunter2", 1)
    assert decrypt(Keys.unseal(NEW_KEK, snap.keyring), snap, "default", "api") == (b"k", 1)
    # What the revoked host knew (the old KEK, hence every old data key) opens no value.
    old_dks = [unwrap(KEK, dk_context(i), d.wrapped) for i, d in before.dks.items()]
    for secret, _ in snap.secrets.values():
        context = secret_context(secret.tenant, secret.name, secret.version)
        for value in (KEK, *old_dks):
            with pytest.raises(Tampered):
                unwrap(value, context, secret.ciphertext)

    # Idempotent: done once; a later revocation rekeys again.
    assert rekey_step(snap, keys, STAYING, 2002.0, b"A" * 32, b"B" * 32, b"C" * 32) is None
    later = Membership(frozenset({"h1"}), {"h3": 40, "h2": 90})
    assert rekey_reasons(snap, later) == ["h2"]
    third = rekey(raft, keys, later)
    ring = raft.snapshot().keyring
    assert ring is not None and ring.generation == 3 and third.matches(ring)


def test_a_removed_host_without_a_revocation_record_rekeys_too() -> None:
    """A host that is not on the mesh leaves no revocation record: its host key, left
    behind by a host no longer a member, is the sign."""
    raft, keys = site_with_secrets()
    membership = Membership(frozenset({"h1", "h2"}))
    assert rekey_reasons(raft.snapshot(), membership) == ["h3"]
    rekey(raft, keys, membership)
    snap = raft.snapshot()
    assert rekey_reasons(snap, membership) == [] and "h3" not in snap.hostkeys


def test_revocations_older_than_the_keys_change_nothing() -> None:
    raft = FakeRaft()
    assert raft.propose(init_ops(KEK, b"s" * 32, b"1" * 32, 1000.0, revoked_index=40))[0].ok
    snap = raft.snapshot()
    assert rekey_reasons(snap, STAYING) == []
    assert rekey_reasons(snap, Membership(STAYING.members, {"h3": 41})) == ["h3"]


def test_a_rekey_from_a_stale_view_or_racing_another_changes_nothing() -> None:
    raft, keys = site_with_secrets()
    stale = raft.snapshot()
    first = rekey_step(stale, keys, STAYING, 2000.0, NEW_KEK, NEW_SEED, NEW_DK)
    second = rekey_step(stale, keys, STAYING, 2000.0, b"A" * 32, b"B" * 32, b"C" * 32)
    assert first is not None and second is not None
    assert first.committed(raft.propose(first.ops))
    after = dict(raft.data)
    results = raft.propose(second.ops)
    assert not second.committed(results) and results[0].error == "conflict"
    assert raft.data == after

    # A data key rotation planned from the view before the rekey is refused whole too.
    stale.rotate_index = 1
    step = next_step(stale, keys, 2001.0, b"z" * 32)
    assert step is not None
    assert raft.propose(step.ops)[0].error == "conflict" and raft.data == after


def test_secrets_sealed_to_the_old_site_key_still_open_then_it_retires() -> None:
    raft, old = site_with_secrets()
    old_public = old.ssk.public_key.encode()
    keys = rekey(raft, old)
    ring = raft.snapshot().keyring
    assert ring is not None and [p.public for p in ring.previous] == [old_public]

    # The hub sealed one to the old key before it learnt the new one: it still opens.
    apply_delta_ops(raft, [sealed_op(old_public, "late", b"v-late")], version=3)
    # One sealed to the new key does not open with the old key (the revoked host's).
    new_blob = seal(ring.ssk_public, b"v-new")
    with pytest.raises(Tampered):
        open_sealed(old.ssk, new_blob)
    apply_delta_ops(raft, [sealed_op(ring.ssk_public, "new", b"v-new")], version=4)
    converge(raft, keys, 2001.0)
    snap = raft.snapshot()
    assert decrypt(keys, snap, "default", "late") == (b"v-late", 1)
    assert decrypt(keys, snap, "default", "new") == (b"v-new", 1)

    # Kept for a while, then retired; a restarted host's keys then hold it no more.
    assert converge(raft, keys, 2000.0 + PREVIOUS_SSK_KEEP_S - 1) == []
    assert converge(raft, keys, 2000.0 + PREVIOUS_SSK_KEEP_S) == ["retire 1 previous site key(s)"]
    ring = raft.snapshot().keyring
    assert ring is not None and ring.previous == ()
    assert Keys.unseal(NEW_KEK, ring).previous == ()

    # Sealed to the retired key and delivered late: it fails, and the hub's re-delivery
    # of the same version to the new key replaces it.
    apply_delta_ops(raft, [sealed_op(old_public, "later", b"v2")], version=5)
    converge(raft, keys, 9000.0)
    assert raft.snapshot().secrets[("default", "later")][0].state == "failed"
    apply_delta_ops(raft, [sealed_op(ring.ssk_public, "later", b"v2")], version=6)
    converge(raft, keys, 9001.0)
    assert decrypt(keys, raft.snapshot(), "default", "later") == (b"v2", 1)
    # A ready one delivered again stays as it is.
    apply_delta_ops(raft, [sealed_op(ring.ssk_public, "later", b"other")], version=7)
    assert raft.snapshot().secrets[("default", "later")][0].state == "ready"


def test_a_lockdown_between_plan_and_commit_stops_the_rekey() -> None:
    """Every host drops its keys at a lock-down, the handed new KEK too: a rekey committed
    then would leave the site with a KEK nobody holds."""
    raft, keys = site_with_secrets()
    plan = rekey_step(raft.snapshot(), keys, STAYING, 2000.0, NEW_KEK, NEW_SEED, NEW_DK)
    assert plan is not None
    apply_delta_ops(raft, [{"op": "site.lockdown"}], version=3)
    before = dict(raft.data)
    assert not plan.committed(raft.propose(plan.ops)) and raft.data == before
    apply_delta_ops(raft, [{"op": "site.unlock"}], version=4)
    rekey(raft, keys)
