import math

import pytest

from gossip import ConfigError, GossipConfig, GossipError


@pytest.mark.parametrize("preset", [GossipConfig.lan, GossipConfig.wan, GossipConfig.local])
def test_presets_are_valid(preset: type[GossipConfig]) -> None:
    config = preset()
    assert config.problems() == []
    config.validate()


def test_preset_overrides() -> None:
    assert GossipConfig.wan(gossip_nodes=5).gossip_nodes == 5
    assert GossipConfig.wan().probe_interval_s > GossipConfig.lan().probe_interval_s
    assert GossipConfig.local().probe_interval_s < GossipConfig.lan().probe_interval_s
    with pytest.raises(TypeError):
        GossipConfig.lan(no_such_field=1)


def test_validate_lists_every_problem() -> None:
    config = GossipConfig.lan(
        probe_timeout_s=2.0,
        gossip_nodes=0,
        indirect_checks=0,
        max_packet_bytes=100,
        nat_keepalive_s=60.0,
    )
    with pytest.raises(ConfigError) as info:
        config.validate()
    problems = info.value.problems
    assert isinstance(info.value, GossipError) and isinstance(info.value, ValueError)
    fields = {p.split(":")[0] for p in problems}
    assert {
        "probe_timeout_s",
        "gossip_nodes",
        "indirect_checks",
        "max_packet_bytes",
        "nat_keepalive_s",
    } <= fields
    assert len(problems) >= 5


def test_validate_rejects_non_numbers_and_non_finite() -> None:
    problems = GossipConfig.lan(probe_interval_s=math.nan, gossip_nodes="3").problems()  # type: ignore[arg-type]
    assert any(p.startswith("probe_interval_s") for p in problems)
    assert any(p.startswith("gossip_nodes") for p in problems)
    assert GossipConfig.lan(dead_reap_s=-1).problems() != []


def test_summary_must_fit_in_a_packet() -> None:
    problems = GossipConfig.lan(max_summary_bytes=1300).problems()
    assert any(p.startswith("max_summary_bytes") for p in problems)


def test_derived_values_follow_memberlist() -> None:
    config = GossipConfig.lan()
    # retransmit_mult * ceil(log10(N + 1))
    assert config.retransmit_limit(1) == 4
    assert config.retransmit_limit(9) == 4
    assert config.retransmit_limit(10) == 8
    assert config.retransmit_limit(1000) == 16
    low, high = config.suspicion_timeouts(1000)
    assert low == pytest.approx(1.5 * 3 * 0.5)
    assert high == pytest.approx(6 * low)
    assert config.suspicion_timeouts(1)[0] == pytest.approx(1.5 * 0.5)
    # pushPullScale: no scaling up to 32 members, then one more interval per doubling.
    assert config.push_pull_period(32) == 30.0
    assert config.push_pull_period(33) == 60.0
    assert config.push_pull_period(1000) == 180.0
