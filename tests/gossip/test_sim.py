"""The issue's simulator scenarios (figures printed with ``pytest -s``).

Failure detection is judged strictly: the time until *every* running member
has declared the crashed member dead. 99.99% of 1,000 members is all 1,000.

The 10-minute, 1,000-member, 10%-loss run costs about ten minutes of CPU in
this pure-Python simulator, too slow for CI. Here it is split into the same
1,000 members for 30 simulated seconds and 100 members for the full 10
minutes; ``bench/gossip_sim.py`` runs the full-size one (``--loss-minutes``).
"""

import pytest

from gossip import GossipConfig, MemberState
from gossip.sim import Simulator

LAN = GossipConfig.lan()


def test_issue_config_is_the_lan_preset() -> None:
    assert LAN.gossip_interval_s == 0.2
    assert LAN.gossip_nodes == 3


@pytest.mark.parametrize("seed", [1, 2])
def test_1000_members_summary_within_3s_and_crash_detected_within_6s(seed: int) -> None:
    sim = Simulator(LAN, seed=seed)
    ids = sim.bootstrap(1000)
    sim.run_until(1.0)
    origin = ids[seed * 17]
    version = sim.publish(origin, b"site summary v1" * 4)
    took = sim.run_until_covered(origin, version, 0.9999, timeout_s=3.0)
    print(f"\nseed {seed}: summary reached all 1000 members in {took} s")
    assert took is not None and took <= 3.0
    assert sim.summary_coverage(origin, version) == 1.0

    victim = ids[seed * 31]
    sim.crash(victim)
    first = None
    detected = sim.run_until_detected(victim, 1.0, timeout_s=6.0)
    first = sim.time_to_detect(victim, 1 / 999)
    print(f"seed {seed}: crash first declared after {first} s, by all 999 after {detected} s")
    assert detected is not None and detected <= 6.0
    assert sim.views_agree(victim, MemberState.DEAD)
    assert sim.false_deaths == []


def test_1000_members_at_10pct_loss_no_healthy_member_declared_dead() -> None:
    sim = Simulator(LAN, seed=7, drop=0.10)
    sim.bootstrap(1000)
    sim.run_until(30.0)
    print(f"\n1000 members, 30 s at 10% loss: {sim.false_suspicions} suspicion events, 0 deaths")
    assert sim.false_suspicions > 0  # the loss does bite: suspicions happen and are refuted
    assert sim.false_deaths == []


def test_100_members_10_minutes_at_10pct_loss_no_healthy_member_declared_dead() -> None:
    sim = Simulator(LAN, seed=8, drop=0.10)
    ids = sim.bootstrap(100)
    sim.run_until(600.0)
    print(f"\n100 members, 600 s at 10% loss: {sim.false_suspicions} suspicion events, 0 deaths")
    assert sim.false_suspicions > 0
    assert sim.false_deaths == []
    # At any instant under loss some suspicion is in flight; once the loss stops,
    # every suspicion is refuted and all views agree again.
    sim.drop = 0.0
    sim.run_until(610.0)
    assert all(sim.views_agree(m, MemberState.ALIVE) for m in ids)


def test_partition_splits_the_membership_and_healing_merges_it() -> None:
    sim = Simulator(LAN, seed=5)
    ids = sim.bootstrap(100)
    sim.run_until(2.0)
    left, right = ids[:60], ids[60:]
    sim.partition(left, right)
    sim.run_until(30.0)
    # Each side has declared the other dead and still agrees on itself.
    assert sim.state_counts(ids[0]) == {"alive": 59, "dead": 40}
    assert sim.state_counts(ids[99]) == {"alive": 39, "dead": 60}
    # A summary published during the partition stays on its side.
    version = sim.publish(ids[1], b"during")
    sim.run_until(35.0)
    assert sim.summary_coverage(ids[1], version) == pytest.approx(0.6)

    sim.heal()
    healed_at = sim.now
    merged = None
    while sim.now < healed_at + 30:
        sim.run_for(0.5)
        if all(sim.views_agree(m, MemberState.ALIVE) for m in ids):
            merged = sim.now - healed_at
            break
    print(f"\npartition of 60/40 members merged {merged} s after healing")
    assert merged is not None
    # Anti-entropy brings the summary across as well.
    sim.run_for(10.0)
    assert sim.summary_coverage(ids[1], version) == 1.0


def test_bytes_per_member_per_second_is_modest() -> None:
    sim = Simulator(LAN, seed=9)
    ids = sim.bootstrap(200)
    sim.run_until(5.0)
    before = sum(sim.bytes_snapshot())
    for k in range(10):
        sim.publish(ids[k], b"x" * 100)
        sim.run_for(1.0)
    rate = (sum(sim.bytes_snapshot()) - before) / 200 / 10.0
    print(f"\n200 members, a 100-byte summary per second: {rate:.0f} bytes/member/s")
    assert 100 < rate < 5000
