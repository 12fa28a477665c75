"""A page of deltas is committed a prefix at a time, so a Raft proposal stays under its
entry limit whatever the hub's page size (pure)."""

from meshorch.fleet.site_link import MAX_COMMIT_BYTES, commit_prefix


def test_a_page_within_the_budget_is_committed_whole() -> None:
    raws = [b"a" * 1000] * 5
    assert commit_prefix(raws) == raws
    assert commit_prefix([]) == []


def test_a_larger_page_is_cut_to_the_longest_prefix_within_it() -> None:
    raws = [b"a" * 700, b"b" * 700, b"c" * 700, b"d" * 10]
    assert commit_prefix(raws, budget=1500) == raws[:2]
    assert commit_prefix(raws, budget=1400) == raws[:2]
    assert commit_prefix(raws, budget=1399) == raws[:1]


def test_one_envelope_over_the_budget_still_goes_alone() -> None:
    big = b"x" * (MAX_COMMIT_BYTES + 1)
    assert commit_prefix([big, b"y"]) == [big]
    # A page of 1.9 MiB deltas: one commit each (two would pass the budget).
    page = [b"z" * (19 * 1024 * 1024 // 10)] * 4
    taken = commit_prefix(page)
    assert len(taken) == 1 and sum(map(len, taken)) <= MAX_COMMIT_BYTES
