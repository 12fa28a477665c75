"""Node-level behaviour, driven by hand: no simulator, explicit packets and times."""

import random

import pytest

from gossip import (
    EventKind,
    GossipConfig,
    LocalProtocolError,
    MemberState,
    MemberView,
    Node,
    RemoteProtocolError,
)
from gossip.messages import (
    Ack,
    Alive,
    Dead,
    Message,
    Ping,
    PushPull,
    StateEntry,
    Summary,
    Suspect,
    decode_packet,
    encode_packet,
)
from gossip.sim import Simulator

CONFIG = GossipConfig.local()


def view(member: str, incarnation: int = 0, state: MemberState = MemberState.ALIVE) -> MemberView:
    return MemberView(member, state, incarnation, 0, b"", 0, None, 0.0)


def make(self_id: str, *others: str, now: float = 0.0, **kw: object) -> Node:
    node = Node(self_id, CONFIG, random.Random(self_id), now, **kw)  # type: ignore[arg-type]
    node.bootstrap(view(o) for o in others)
    return node


def send(node: Node, sender: str, *msgs: Message, now: float = 1.0) -> None:
    node.receive(now, sender, encode_packet(list(msgs)))


def sent_messages(node: Node) -> list[tuple[str, Message]]:
    return [(dest, m) for dest, data in node.outbox() for m in decode_packet(data)]


def gossiped(node: Node, now: float) -> list[Message]:
    """Everything the node disseminates in the next gossip rounds."""
    out: list[Message] = []
    t = now
    while node.pending_broadcasts() and t < now + 10:
        t = max(t, node.next_deadline())
        node.tick(t)
        out += [m for _, m in sent_messages(node)]
    return out


def snapshot(node: Node) -> dict[str, MemberView]:
    return dict(node.members())


def test_ping_is_acked_and_misdirected_ping_is_not() -> None:
    a = make("a", "b")
    send(a, "b", Ping(42, "a"))
    assert ("b", Ack(42)) in sent_messages(a)
    send(a, "b", Ping(43, "somebody-else"))
    assert sent_messages(a) == []
    assert a.stats.misdirected == 1


def test_refutation_bumps_incarnation_and_announces_it() -> None:
    b = make("b", "a")
    assert b.incarnation == 0
    send(b, "a", Suspect("b", 0, "a"))
    assert b.incarnation == 1
    assert b.stats.refutations == 1
    assert Alive("b", 1, 0, b"") in gossiped(b, 1.0)
    # A dead rumour about a higher incarnation is outbid too.
    send(b, "a", Dead("b", 5, "a"), now=2.0)
    assert b.incarnation == 6
    assert b.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    # An old rumour (lower incarnation) needs no refutation.
    send(b, "a", Suspect("b", 3, "a"), now=3.0)
    assert b.incarnation == 6


def test_incarnation_ordering_and_replays() -> None:
    a = make("a", "b", "c")
    a.events()
    send(a, "c", Alive("b", 3, 0, b""))
    assert a.member("b").incarnation == 3  # type: ignore[union-attr]
    before = snapshot(a)
    # Lower incarnations change nothing.
    send(a, "c", Alive("b", 2, 0, b"other"), Suspect("b", 2, "c"), Dead("b", 1, "c"))
    assert snapshot(a) == before
    assert a.stats.stale_ignored >= 3
    # Suspect needs at least the current incarnation; alive at the same one cannot clear it.
    send(a, "c", Suspect("b", 3, "c"))
    assert a.member("b").state is MemberState.SUSPECT  # type: ignore[union-attr]
    send(a, "c", Alive("b", 3, 0, b""))
    assert a.member("b").state is MemberState.SUSPECT  # type: ignore[union-attr]
    send(a, "c", Alive("b", 4, 0, b""))
    assert a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    send(a, "c", Dead("b", 4, "c"))
    assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]
    # Replaying every earlier message never resurrects it.
    for msg in [Alive("b", 4, 0, b""), Alive("b", 3, 0, b""), Suspect("b", 4, "c")]:
        send(a, "c", msg)
        assert a.member("b").state is MemberState.DEAD  # type: ignore[union-attr]
    # Only the member itself, with a higher incarnation, comes back.
    send(a, "b", Alive("b", 5, 0, b""))
    assert a.member("b").state is MemberState.ALIVE  # type: ignore[union-attr]
    kinds = [e.kind for e in a.events() if e.member_id == "b"]
    assert kinds == [EventKind.SUSPECT, EventKind.ALIVE, EventKind.DEAD, EventKind.ALIVE]


def test_summary_versions_only_move_forward() -> None:
    a = make("a", "b")
    send(a, "b", Summary("b", 2, b"two"))
    send(a, "b", Summary("b", 1, b"one"), Summary("b", 2, b"forged-two"))
    v = a.member("b")
    assert v is not None and (v.summary_version, v.summary) == (2, b"two")
    events = [e for e in a.events() if e.kind is EventKind.SUMMARY]
    assert [(e.member_id, e.version, e.value) for e in events] == [("b", 2, b"two")]
    # A summary of an unknown member is not stored (and not remembered as seen).
    send(a, "b", Summary("zz", 1, b"?"))
    assert a.member("zz") is None and a.stats.unknown_ignored == 1


def test_forged_news_about_ourselves_is_outbid() -> None:
    b = make("b", "a", meta=b"10.0.0.2:7946")
    b.publish(b"real")
    b.events()
    send(b, "a", Alive("b", 0, 0, b"6.6.6.6:1"), Summary("b", 9, b"forged"))
    me = b.member("b")
    assert me is not None
    assert me.meta == b"10.0.0.2:7946" and me.summary == b"real"
    assert me.incarnation == 1 and me.summary_version == 10
    out = gossiped(b, 1.0)
    assert Alive("b", 1, 0, b"10.0.0.2:7946") in out
    assert Summary("b", 10, b"real") in out
    # Another member hearing both the forgery and the answer keeps the real value.
    a = make("a", "b")
    send(a, "x", Summary("b", 9, b"forged"))
    for msg in out:
        send(a, "b", msg)
    assert a.member("b").summary == b"real"  # type: ignore[union-attr]


def test_stray_acks_and_unknown_senders_change_nothing() -> None:
    a = make("a", "b")
    before = snapshot(a)
    send(a, "b", Ack(12345))
    send(a, "stranger", Ping(1, "a"))  # still answered: a joining member pings too
    assert snapshot(a) == before
    assert [d for d, _ in sent_messages(a)] == ["stranger"]


def test_garbage_truncated_and_oversized_payloads_are_counted_and_dropped() -> None:
    a = make("a", "b", "c")
    a.publish(b"mine")
    send(a, "b", Summary("b", 1, b"theirs"), Suspect("c", 0, "b"))
    a.outbox(), a.events()
    rng = random.Random(7)
    valid = [
        encode_packet([Alive("b", 9, 0, b"x"), Dead("c", 9, "b"), Summary("b", 5, b"new")]),
        encode_packet([PushPull(1, False, False, 0, 1, (StateEntry("d", 1, 0, 0, b"", 1, b"v"),))]),
    ]
    before = snapshot(a)
    dropped = 0
    for k in range(3000):
        if k % 3 == 0:
            data = rng.randbytes(rng.randrange(0, 300))
        else:
            base = rng.choice(valid)
            data = base[: rng.randrange(len(base))] if k % 3 == 1 else base + rng.randbytes(3)
        try:
            decode_packet(data)
            continue  # a valid packet by chance: not garbage
        except RemoteProtocolError:
            pass
        a.receive(2.0, "b", data)
        dropped += 1
        assert a.outbox() == [] and a.events() == []
    assert snapshot(a) == before
    assert a.stats.malformed_dropped == dropped > 2500
    a.receive(2.0, "b", b"\x01" + bytes(CONFIG.max_packet_bytes))
    assert a.stats.oversized_dropped == 1 and snapshot(a) == before


def test_publish_and_meta_limits() -> None:
    with pytest.raises(LocalProtocolError):
        Node("a", CONFIG, random.Random(1), 0.0, meta=bytes(CONFIG.max_meta_bytes + 1))
    with pytest.raises(LocalProtocolError):
        Node("", CONFIG, random.Random(1), 0.0)
    with pytest.raises(LocalProtocolError):
        Node("a", CONFIG, random.Random(1), 0.0, natted=True, relay=True)
    a = make("a", "b")
    with pytest.raises(LocalProtocolError):
        a.publish(bytes(CONFIG.max_summary_bytes + 1))
    assert a.publish(b"1") == 1 and a.publish(b"2") == 2
    a.leave()
    with pytest.raises(LocalProtocolError):
        a.publish(b"3")


def test_join_through_a_placeholder_seed() -> None:
    hub = make("hub", "x", "y")
    site = Node("site", CONFIG, random.Random(2), 0.0)
    site.join(["seed:10.0.0.1:7946"])
    out = site.outbox()
    assert [d for d, _ in out] == ["seed:10.0.0.1:7946"]
    # The adapter delivers it to whoever answers at that address.
    hub.receive(0.01, "site", out[0][1])
    assert hub.member("site") is not None
    for dest, data in hub.outbox():
        assert dest == "site"
        site.receive(0.02, "hub", data)
    assert set(site.members()) == {"site", "hub", "x", "y"}
    assert {e.kind for e in site.events()} == {EventKind.UP}
    # Joined: no more join retries.
    site.tick(5.0)
    assert all(not d.startswith("seed:") for d, _ in site.outbox())


def test_join_is_retried_while_alone() -> None:
    site = Node("site", CONFIG, random.Random(2), 0.0)
    site.join(["hub"])
    assert len(site.outbox()) == 1
    site.tick(site.next_deadline())
    t = 0.0
    while t < CONFIG.join_retry_s * 3.5:
        t = site.next_deadline()
        site.tick(t)
    joins = [d for d, _ in site.outbox() if d == "hub"]
    assert len(joins) >= 3


def test_next_deadline_is_monotonic_and_tick_idempotent() -> None:
    a = make("a", "b", "c")
    d = a.next_deadline()
    assert d < CONFIG.probe_interval_s + 1e-9
    a.tick(d)
    assert a.next_deadline() > d
    before = a.stats.probes
    a.tick(d)  # again: nothing new is due
    assert a.stats.probes == before


def test_leave_is_reported_as_left_and_reaped() -> None:
    sim = Simulator(CONFIG, seed=3)
    ids = sim.bootstrap(8)
    sim.run_until(1.0)
    sim.node(ids[0]).leave()
    sim.run_until(3.0)
    assert sim.state_counts(ids[0]) == {"left": 7}
    assert not sim.false_deaths
    sim.crash(ids[0])
    sim.run_until(3.0 + CONFIG.left_reap_s + 1)
    assert sim.state_counts(ids[0]) == {"unknown": 7}


def test_a_restarted_member_refutes_its_old_death() -> None:
    sim = Simulator(CONFIG, seed=4)
    ids = sim.bootstrap(10)
    sim.run_until(1.0)
    sim.crash(ids[5])
    assert sim.run_until_detected(ids[5], 1.0, 20.0) is not None
    node = sim.restart(ids[5], seeds=[ids[0]])
    assert node.incarnation == 0
    sim.run_for(3.0)
    assert sim.views_agree(ids[5], MemberState.ALIVE)
    assert node.incarnation >= 1
    assert all(
        sim.node(i).member(ids[5]).incarnation == node.incarnation for i in ids if i != ids[5]
    )  # type: ignore[union-attr]


def test_runs_are_deterministic() -> None:
    def run() -> tuple[int, list[int], list[object]]:
        sim = Simulator(CONFIG, seed=11, drop=0.2)
        ids = sim.bootstrap(20)
        sim.run_until(2.0)
        sim.crash(ids[3])
        sim.run_until(10.0)
        return sim.packets_sent, sim.bytes_snapshot(), sorted(sim.dead_seen[ids[3]].items())

    assert run() == run()


def test_suspicion_timeout_shrinks_with_independent_confirmations() -> None:
    from gossip.core import _Suspicion

    low, high = GossipConfig.lan().suspicion_timeouts(1000)
    s = _Suspicion(3, 100.0, "a", 2, low, high)
    assert s.deadline == pytest.approx(100.0 + high)
    assert not s.confirm("a")  # the same origin again is not independent
    assert s.confirm("b")
    middle = s.deadline
    assert 100.0 + low < middle < 100.0 + high
    assert s.confirm("c")
    assert s.deadline == pytest.approx(100.0 + low)
    assert s.confirm("d") and s.deadline == pytest.approx(100.0 + low)  # never below the minimum
    # Too few members to ever confirm: the minimum at once.
    assert _Suspicion(0, 0.0, "a", 0, low, high).deadline == pytest.approx(low)


def test_sync_starts_a_push_pull_only_when_states_differ() -> None:
    from gossip.messages import Sync

    a, b = make("a", "b", "c"), make("b", "a", "c")
    a.tick(CONFIG.push_pull_interval_s + 1)  # its periodic anti-entropy is due
    syncs = [(d, m) for d, m in sent_messages(a) if isinstance(m, Sync)]
    assert syncs
    _, sync = syncs[0]
    send(b, "a", sync)
    assert sent_messages(b) == []  # same members, same incarnations: nothing to exchange
    send(b, "c", Suspect("c", 0, "x"))  # now b's view differs
    b.outbox()
    send(b, "a", sync)
    pushed = [m for d, m in sent_messages(b) if d == "a"]
    assert pushed and all(isinstance(m, PushPull) and not m.reply for m in pushed)
