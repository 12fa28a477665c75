"""Members behind NAT: reached only by members they sent to; the hub relays.

The simulator's NAT drops a datagram to a NATed member unless that member sent
to the sender within the mapping timeout (30 s), so a protocol that addressed
NATed members directly would see them fail.
"""

from gossip import GossipConfig, MemberState
from gossip.sim import Simulator

LAN = GossipConfig.lan()


def test_mixed_cluster_with_nat_under_loss() -> None:
    # 60 members: one relay (the hub), 29 reachable, 30 behind NAT; 10% loss.
    sim = Simulator(LAN, seed=3, drop=0.10)
    ids = sim.bootstrap(60, natted=range(30, 60), relays=[0])
    natted = ids[30:]
    sim.run_until(5.0)

    # A NATed member's summary reaches everyone.
    version = sim.publish(natted[15], b"natted summary")
    took = sim.run_until_covered(natted[15], version, 1.0, timeout_s=10.0)
    print(f"\nNATed member's summary reached all 60 in {took} s")
    assert took is not None and took < 3.0

    # Five minutes of 10% loss: no healthy member, NATed or not, declared dead.
    sim.run_until(300.0)
    print(f"300 s at 10% loss: {sim.false_suspicions} suspicion events, 0 deaths")
    assert sim.false_suspicions > 0
    assert sim.false_deaths == []
    assert all(sim.views_agree(m, MemberState.ALIVE) for m in ids)

    # A crashed NATed member is still detected, by everyone.
    sim.crash(natted[20])
    detected = sim.run_until_detected(natted[20], 1.0, timeout_s=20.0)
    print(f"crashed NATed member declared dead by all 59 in {detected} s")
    assert detected is not None and detected < 10.0
    assert sim.false_deaths == []


def test_hub_and_spoke_every_site_behind_nat() -> None:
    # The deployment shape: the hub and 30 site leaders, every site behind NAT.
    sim = Simulator(LAN, seed=4, drop=0.10)
    ids = sim.bootstrap(31, natted=range(1, 31), relays=[0])
    hub, sites = ids[0], ids[1:]
    sim.run_until(5.0)
    version = sim.publish(sites[6], b"site 7 is fine")
    took = sim.run_until_covered(sites[6], version, 1.0, timeout_s=10.0)
    print(f"\nhub and 30 NATed sites: summary reached all in {took} s")
    assert took is not None and took < 3.0

    sim.run_until(240.0)
    assert sim.false_deaths == []
    assert all(sim.views_agree(m, MemberState.ALIVE) for m in ids)
    # Sites never probe each other directly: every datagram to a site comes
    # from the hub or from a site it contacted first, so the NAT drops little.
    assert sim.nat_dropped < 0.01 * sim.packets_sent

    sim.crash(sites[9])
    detected = sim.run_until_detected(sites[9], 1.0, timeout_s=20.0)
    print(f"crashed site declared dead by all 30 in {detected} s")
    assert detected is not None and detected < 10.0
    assert sim.node(hub).member(sites[9]).state is MemberState.DEAD  # type: ignore[union-attr]


def test_without_the_nat_rules_natted_members_would_be_unreachable() -> None:
    # Control: the same NATed members flagged as reachable (so others ping them
    # directly) are falsely declared dead by the NAT model: the test above is
    # not passing by accident.
    sim = Simulator(LAN, seed=4)
    ids = sim.bootstrap(31, relays=[0])
    for i in range(1, 31):
        sim._natted[i] = True  # the network hides them; the protocol does not know
        sim._nat_out[i] = {}
    sim.run_until(60.0)
    assert sim.false_deaths, "direct probes into a NAT must fail"
    assert ids[0] not in {f.member for f in sim.false_deaths}


def test_natted_member_joins_through_the_relay() -> None:
    sim = Simulator(LAN, seed=6)
    ids = sim.bootstrap(10, relays=[0])
    sim.add("site-x", seeds=[ids[0]], natted=True)
    sim.run_until(5.0)
    assert sim.views_agree("site-x", MemberState.ALIVE)
    assert set(sim.node("site-x").members()) == {*ids, "site-x"}
