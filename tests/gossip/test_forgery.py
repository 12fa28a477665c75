"""What a member with a valid certificate can still send: forged summaries of others, and
incarnations or versions at the wire's limit. Simulated clusters (``gossip.sim``) with a
summary verifier like the embeddings' (an Ed25519 signature of the origin over its value),
and the site's and the hub's own verifiers."""

import hashlib
import random
from types import SimpleNamespace
from typing import Any, cast

import pytest
from nacl.exceptions import BadSignatureError
from nacl.signing import SigningKey

from central_hub.gossip import HubGossip
from central_hub.ledger import Ledger
from gossip import (
    DatagramOpener,
    DatagramSealer,
    GossipConfig,
    LocalProtocolError,
    MemberState,
    MemberView,
    Node,
    issue_cert,
)
from gossip.messages import (
    MAX_INCARNATION,
    MAX_SUMMARY_VERSION,
    Alive,
    Dead,
    Message,
    PushPull,
    StateEntry,
    Summary,
    Suspect,
    encode_packet,
)
from gossip.sim import Simulator
from meshorch.fleet.client import LinkClient
from meshorch.fleet.gossip import (
    HUB_ID,
    GossipLink,
    SiteGossip,
    hub_summary,
    seal_summary,
)

CONFIG = GossipConfig.local()
N = 8


def key(member: str) -> SigningKey:
    return SigningKey(hashlib.sha256(member.encode()).digest())


def signed(member: str, body: bytes) -> bytes:
    """A summary value as the embeddings make them: the body, then the origin's signature."""
    return body + key(member).sign(member.encode() + b"\0" + body).signature


def verify(summary: Summary, sender: str) -> bool:
    body, signature = summary.value[:-64], summary.value[-64:]
    try:
        key(summary.member).verify_key.verify(summary.member.encode() + b"\0" + body, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def cluster(*, verifier: bool = True) -> tuple[Simulator, list[str]]:
    sim = Simulator(CONFIG, seed=3, summary_verifier=verify if verifier else None)
    ids = sim.bootstrap(N)
    sim.run_until(1.0)
    return sim, ids


def inject(sim: Simulator, liar: str, dests: list[str], *msgs: Message) -> None:
    for dest in dests:
        if dest != liar:
            sim.inject(liar, dest, encode_packet(list(msgs)))


def summary_of(sim: Simulator, observer: str, member: str) -> tuple[int, bytes | None]:
    view = sim.node(observer).member(member)
    assert view is not None
    return view.summary_version, view.summary


def total(sim: Simulator, counter: str) -> int:
    return sum(getattr(sim.node(m).stats, counter) for m in sim.live_ids())


def assert_alive_everywhere(sim: Simulator, victim: str) -> None:
    assert sim.views_agree(victim, MemberState.ALIVE), sim.state_counts(victim)
    assert sim.false_deaths == []
    assert sim.false_suspicions == 0


# -- (a) forged summaries ------------------------------------------------------------------

FORGED = Summary("m00002", 10**6, b"forged: shop-2 is frozen" + bytes(64))


def forged_push_pull() -> PushPull:
    """The forged summary again, as a push-pull entry (state unchanged: alive at 0)."""
    entry = StateEntry(FORGED.member, 0, 0, 0, b"", FORGED.version, FORGED.value)
    return PushPull(7, False, True, 0, 1, (entry,))


def test_a_forged_summary_is_never_stored_and_the_genuine_ones_keep_flowing() -> None:
    sim, ids = cluster()
    victim, liar = FORGED.member, ids[5]
    first = sim.publish(victim, signed(victim, b"v1"))
    assert sim.run_until_covered(victim, first, 1.0, timeout_s=5.0) is not None

    inject(sim, liar, ids, FORGED)
    inject(sim, liar, ids, forged_push_pull())
    sim.run_for(1.0)
    for k in range(2, 5):
        version = sim.publish(victim, signed(victim, b"v%d" % k))
        took = sim.run_until_covered(victim, version, 1.0, timeout_s=5.0)
        assert took is not None, f"summary {k} of {victim} did not reach everyone"
    sim.run_for(CONFIG.push_pull_interval_s * 2)  # anti-entropy too

    for mid in ids:
        # Everyone, the victim too, holds its last genuine summary at its own version.
        assert summary_of(sim, mid, victim) == (4, signed(victim, b"v4"))
    # Dropped once per copy injected, by each receiver: never stored, so never passed on.
    assert total(sim, "forged_dropped") == 2 * (N - 1)
    assert sim.node(victim).stats.forged_dropped == 2  # and not outbid: nothing to answer
    assert all(sim.node(m).stats.refutations == 0 for m in ids)


def test_without_a_verifier_the_forgery_displaces_the_genuine_summary() -> None:
    """The control: the same forgery, no verifier (the core's default) - it is stored."""
    sim, ids = cluster(verifier=False)
    victim, liar = FORGED.member, ids[5]
    sim.publish(victim, signed(victim, b"v1"))
    sim.run_for(1.0)
    inject(sim, liar, [m for m in ids if m != victim], FORGED)
    sim.run_for(CONFIG.probe_interval_s / 10)
    holders = [m for m in ids if summary_of(sim, m, victim) == (FORGED.version, FORGED.value)]
    assert len(holders) == N - 2  # everyone but the victim and the liar


def test_forged_summaries_of_ourselves_are_not_outbid_when_verified() -> None:
    a = Node("a", CONFIG, random.Random(1), 0.0, summary_verifier=verify)
    a.bootstrap([MemberView("b", MemberState.ALIVE, 0, 0, b"", 0, None, 0.0)])
    assert a.publish(signed("a", b"mine")) == 1
    a.receive(1.0, "b", encode_packet([Summary("a", 50, b"not mine" + bytes(64))]))
    me = a.member("a")
    assert me is not None and (me.summary_version, me.summary) == (1, signed("a", b"mine"))
    assert a.stats.forged_dropped == 1
    # A genuine one from a previous life is still outbid.
    a.receive(2.0, "b", encode_packet([Summary("a", 50, signed("a", b"old life"))]))
    me = a.member("a")
    assert me is not None and (me.summary_version, me.summary) == (51, signed("a", b"mine"))


# -- (a') a genuine summary replayed at a forged version ---------------------------------------


def signed_at(member: str, version: int, body: bytes) -> bytes:
    """The value a ``summary_signer`` makes: the body, then a signature over version and body."""
    message = member.encode() + b"\0" + version.to_bytes(8, "big") + body
    return body + key(member).sign(message).signature


def verify_with_version(summary: Summary, sender: str) -> bool:
    body, signature = summary.value[:-64], summary.value[-64:]
    message = summary.member.encode() + b"\0" + summary.version.to_bytes(8, "big") + body
    try:
        key(summary.member).verify_key.verify(message, signature)
    except (BadSignatureError, ValueError):
        return False
    return True


def test_a_genuine_summary_at_a_forged_version_is_refused_when_the_version_is_signed() -> None:
    sim = Simulator(
        CONFIG,
        seed=3,
        summary_verifier=verify_with_version,
        summary_signer_of=lambda member: lambda version, body: signed_at(member, version, body),
    )
    ids = sim.bootstrap(N)
    sim.run_until(1.0)
    victim, liar = "m00002", ids[5]
    first = sim.publish(victim, b"v1")
    assert sim.run_until_covered(victim, first, 1.0, timeout_s=5.0) is not None
    genuine = summary_of(sim, liar, victim)[1]
    assert genuine == signed_at(victim, 1, b"v1")

    # The real value at a forged version, just below the last one.
    inject(sim, liar, ids, Summary(victim, MAX_SUMMARY_VERSION - 1, genuine))
    sim.run_for(1.0)
    version = sim.publish(victim, b"v2")
    assert version == 2  # not outbid by the replay: it was never taken for the victim's
    assert sim.run_until_covered(victim, version, 1.0, timeout_s=5.0) is not None
    for mid in ids:
        assert summary_of(sim, mid, victim) == (2, signed_at(victim, 2, b"v2"))
    assert total(sim, "forged_dropped") == N - 1


def test_when_the_version_is_not_signed_a_replay_exhausts_the_members_versions() -> None:
    """The control: values signed without their version. The victim's own old summary,
    replayed just below the last version, is genuine to every verifier: the victim outbids
    it with the last version there is, and can never publish again."""
    sim, ids = cluster()
    victim, liar = "m00002", ids[5]
    sim.publish(victim, signed(victim, b"v1"))
    sim.run_for(1.0)
    inject(sim, liar, ids, Summary(victim, MAX_SUMMARY_VERSION - 1, signed(victim, b"v1")))
    sim.run_for(1.0)
    assert summary_of(sim, victim, victim)[0] == MAX_SUMMARY_VERSION
    with pytest.raises(LocalProtocolError):
        sim.publish(victim, signed(victim, b"v2"))


# -- (b), (c) incarnations at the wire's limit -------------------------------------------------


@pytest.mark.parametrize(
    "message",
    [
        Suspect("m00002", MAX_INCARNATION, "m00005"),
        Dead("m00002", MAX_INCARNATION, "m00005"),
        Dead("m00002", MAX_INCARNATION, "m00002"),  # a "leave"
    ],
    ids=["suspect", "dead", "left"],
)
def test_an_unrefutable_suspicion_or_death_is_dropped_everywhere(message: Message) -> None:
    sim, ids = cluster()
    victim, liar = "m00002", ids[5]
    inject(sim, liar, ids, message)
    sim.run_for(CONFIG.probe_interval_s * 50)  # far beyond any suspicion timeout
    assert_alive_everywhere(sim, victim)
    assert sim.node(victim).incarnation == 0
    for mid in ids:
        if mid != liar:
            assert sim.node(mid).stats.out_of_range_dropped == 1, mid


def test_unrefutable_state_in_a_push_pull_is_dropped() -> None:
    sim, ids = cluster()
    victim, liar = "m00002", ids[5]
    for state in (MemberState.SUSPECT, MemberState.DEAD, MemberState.LEFT):
        entry = StateEntry(victim, MAX_INCARNATION, state, 0, b"", 0, b"")
        inject(sim, liar, ids, PushPull(9, False, True, 0, 1, (entry,)))
    sim.run_for(CONFIG.probe_interval_s * 50)
    assert_alive_everywhere(sim, victim)
    assert total(sim, "out_of_range_dropped") == 3 * (N - 1)


def test_news_of_ourselves_at_the_limit_is_dropped_not_raised() -> None:
    """An alive at the limit with another address: the victim cannot outbid it (that would
    overflow), so it drops it and stays alive; the others stay with the victim too."""
    sim, ids = cluster()
    victim, liar = "m00002", ids[5]
    inject(sim, liar, [victim], Alive(victim, MAX_INCARNATION, 0, b"6.6.6.6:1"))
    inject(sim, liar, [victim], Summary(victim, MAX_SUMMARY_VERSION, signed(victim, b"x")))
    sim.run_for(CONFIG.probe_interval_s * 50)
    node = sim.node(victim)
    assert node.stats.out_of_range_dropped == 2
    me = node.member(victim)
    assert me is not None and (me.incarnation, me.meta, me.summary_version) == (0, b"", 0)
    assert_alive_everywhere(sim, victim)
    assert node.publish(signed(victim, b"still publishing")) == 1


def test_a_suspicion_just_below_the_limit_is_refuted_at_the_limit() -> None:
    sim, ids = cluster()
    victim, liar = "m00002", ids[5]
    inject(sim, liar, ids, Suspect(victim, MAX_INCARNATION - 1, liar))
    sim.run_for(CONFIG.probe_interval_s * 50)
    assert sim.node(victim).incarnation == MAX_INCARNATION
    assert sim.node(victim).stats.refutations == 1
    assert sim.views_agree(victim, MemberState.ALIVE) and sim.false_deaths == []
    # At the limit, nothing can be refuted any more: a suspicion there is dropped.
    inject(sim, liar, ids, Suspect(victim, MAX_INCARNATION, liar))
    sim.run_for(CONFIG.probe_interval_s * 50)
    assert sim.views_agree(victim, MemberState.ALIVE) and sim.false_deaths == []
    # And news about ourselves at the limit that would need a refutation changes nothing.
    inject(sim, liar, [victim], Alive(victim, MAX_INCARNATION, 0, b"6.6.6.6:1"))
    sim.run_for(1.0)
    assert sim.node(victim).incarnation == MAX_INCARNATION
    assert sim.node(victim).stats.out_of_range_dropped >= 2


def test_summary_versions_outbid_up_to_the_limit_then_publish_refuses() -> None:
    a = Node("a", CONFIG, random.Random(1), 0.0)
    a.bootstrap([MemberView("b", MemberState.ALIVE, 0, 0, b"", 0, None, 0.0)])
    a.publish(b"mine")
    a.receive(1.0, "b", encode_packet([Summary("a", MAX_SUMMARY_VERSION - 1, b"old")]))
    me = a.member("a")
    assert me is not None and me.summary_version == MAX_SUMMARY_VERSION
    with pytest.raises(LocalProtocolError):
        a.publish(b"more")
    a.tick(2.0)
    assert a.outbox()  # the outbid version still encodes


def test_a_restored_incarnation_beyond_the_wire_is_refused() -> None:
    with pytest.raises(LocalProtocolError):
        Node("a", CONFIG, random.Random(1), 0.0, incarnation=MAX_INCARNATION + 1)


# -- the embeddings' verifiers -------------------------------------------------------------

NOW = 1_790_000_000.0
ROOT = SigningKey(b"r" * 32)
SITE_BODY: dict[str, Any] = {
    "v": 1, "t": NOW, "av": 3, "ah": "ab" * 8, "apps": "0" * 16, "na": 0, "n": 1, "up": 1,
    "alerts": [],
}  # fmt: skip


def test_the_site_verifier_checks_origin_signatures() -> None:
    s1, s2 = SigningKey(b"1" * 32), SigningKey(b"2" * 32)
    link = SimpleNamespace(site_id="s1", site_key=lambda: s1)
    site = SiteGossip(cast(GossipLink, link), cast(LinkClient, None), clock=lambda: NOW)
    opener = DatagramOpener(lambda: {bytes(ROOT.verify_key)}, recipient="s1")
    verifier = site.summary_verifier(opener)
    genuine_s2 = Summary("s2", 5, seal_summary(s2, "s2", SITE_BODY, 5))

    # s2 not heard from directly yet: its key is unknown, only the hub is believed.
    assert not verifier(genuine_s2, "s3")
    assert verifier(genuine_s2, HUB_ID)
    # Once a datagram of s2's opened, its certificate's key checks its summaries.
    cert = issue_cert(ROOT, "s2", bytes(s2.verify_key), NOW + 3600)
    opener.open(DatagramSealer("s2", s2, cert).seal(b"\x01hi", NOW, "s1"), NOW)
    assert verifier(genuine_s2, "s3")
    tampered = genuine_s2.value.replace(b'"av":3', b'"av":9')
    assert tampered != genuine_s2.value
    forged = seal_summary(SigningKey(b"x" * 32), "s2", {**SITE_BODY, "av": 10**6}, 10**6)
    replayed = genuine_s2.value  # genuine, but signed for version 5
    for value in (tampered, forged, replayed, b"garbage" * 12):
        assert not verifier(Summary("s2", 10**6, value), "s3")
        assert not verifier(Summary("s2", 10**6, value), HUB_ID)  # its key is known
    # Its own summary, with its own key (what a forged one of ours is told apart by).
    assert verifier(Summary("s1", 2, seal_summary(s1, "s1", SITE_BODY, 2)), "s2")
    assert not verifier(Summary("s1", 2, seal_summary(s2, "s1", SITE_BODY, 2)), "s2")
    # Another member's summary moved to s2's name does not verify either.
    assert not verifier(Summary("s2", 2, seal_summary(s1, "s1", SITE_BODY, 2)), "s3")
    assert site.stats.bad_summaries == 11


def test_the_site_forgets_a_key_whose_certificate_expired() -> None:
    s2 = SigningKey(b"2" * 32)
    link = SimpleNamespace(site_id="s1", site_key=lambda: SigningKey(b"1" * 32))
    clock = [NOW]
    site = SiteGossip(cast(GossipLink, link), cast(LinkClient, None), clock=lambda: clock[0])
    opener = DatagramOpener(lambda: {bytes(ROOT.verify_key)}, recipient="s1")
    cert = issue_cert(ROOT, "s2", bytes(s2.verify_key), NOW + 60)
    opener.open(DatagramSealer("s2", s2, cert).seal(b"\x01hi", NOW, "s1"), NOW)
    verifier = site.summary_verifier(opener)
    genuine = Summary("s2", 1, seal_summary(s2, "s2", SITE_BODY, 1))
    assert verifier(genuine, "s3")
    clock[0] = NOW + 61
    assert not verifier(genuine, "s3")


def test_the_hub_verifier_checks_sites_against_their_registered_keys() -> None:
    s1, hub_key = SigningKey(b"1" * 32), SigningKey(b"h" * 32)
    registry = {"s1": bytes(s1.verify_key).hex()}
    hub = HubGossip(
        cast(Ledger, None),
        registry.get,
        host="127.0.0.1",
        port=0,
        advertise=None,
        preset="local",
        cert_ttl_s=3600.0,
    )
    hub._key = hub_key
    verifier = hub.summary_verifier()
    genuine = seal_summary(s1, "s1", SITE_BODY, 1)
    assert verifier(Summary("s1", 1, genuine), "s2")
    tampered = genuine.replace(b'"up":1', b'"up":0')
    refused = [
        Summary("s1", 10**6, tampered),
        Summary("s1", 10**6, seal_summary(SigningKey(b"x" * 32), "s1", SITE_BODY, 10**6)),
        Summary("s1", 10**6, genuine),  # genuine, signed for version 1
        Summary("s1", 10**6, b"\x00not a summary" * 8),
        Summary("s2", 1, seal_summary(s1, "s2", SITE_BODY, 1)),  # not an enrolled site
        Summary(HUB_ID, 9, seal_summary(s1, HUB_ID, hub_summary(9, "ab" * 32, NOW), 9)),
    ]
    for summary in refused:
        assert not verifier(summary, "s1")
    # The hub's own (a previous life's, heard back) checks with its gossip key.
    assert verifier(
        Summary(HUB_ID, 9, seal_summary(hub_key, HUB_ID, hub_summary(9, "a", NOW), 9)), "s1"
    )
    assert hub.stats.bad_summaries == len(refused)
