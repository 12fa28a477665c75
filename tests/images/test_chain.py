"""The chain a pulled blob travels along a site's hosts (pure)."""

from __future__ import annotations

from meshorch.images.chain import ChainSources, chain, sources


def test_the_chain_starts_at_the_puller_then_the_others_by_id() -> None:
    assert chain("h3", ["h2", "h1", "h3", "h4"]) == ("h3", "h1", "h2", "h4")
    assert chain("h1", []) == ("h1",)


def test_each_host_copies_from_its_predecessor_then_back_to_the_puller() -> None:
    live = {"h1", "h2", "h3", "h4"}
    assert sources("h3", live, "h3") is None  # the puller pulls
    assert sources("h3", live, "h1") == ChainSources("h3", ())
    assert sources("h3", live, "h2") == ChainSources("h1", ("h3",))
    assert sources("h3", live, "h4") == ChainSources("h2", ("h1", "h3"))
    assert sources("h3", live, "h4").in_order() == ("h2", "h1", "h3")  # type: ignore[union-attr]


def test_every_host_computes_the_same_chain_whatever_order_it_lists_the_hosts() -> None:
    hosts = [f"h{i}" for i in range(8)]
    for listed in (hosts, list(reversed(hosts)), hosts[3:] + hosts[:3]):
        picks = {h: sources("h5", listed, h) for h in hosts}
        assert {h: p.source for h, p in picks.items() if p} == {
            "h0": "h5", "h1": "h0", "h2": "h1", "h3": "h2", "h4": "h3", "h6": "h4", "h7": "h6",
        }  # fmt: skip


def test_a_host_gone_from_the_live_set_is_skipped_and_itself_is_counted_live() -> None:
    assert sources("p", {"p", "a", "c"}, "c") == ChainSources("a", ("p",))  # b is gone
    assert sources("p", {"p"}, "b") == ChainSources("p", ())  # b does not see itself live


def test_hosts_that_see_different_live_sets_never_follow_each_other_in_a_cycle() -> None:
    # Each follows the puller or a host whose id sorts before its own.
    views = [{"p", "a", "b", "c"}, {"p", "c"}, {"p", "b", "c"}, {"p", "a"}]
    for view in views:
        for host in ("a", "b", "c"):
            picked = sources("p", view, host)
            assert picked is not None
            assert all(s == "p" or s < host for s in picked.in_order())
