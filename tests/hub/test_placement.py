"""Placement policies (pure)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from central_hub.placement import (
    Expression,
    PlacementError,
    make_policy,
    parse_policy,
    plan_waves,
    select,
)

SITES = {
    "shop-1": {"region": "eu", "tier": "gold"},
    "shop-2": {"region": "eu", "tier": "silver", "quarantine": "yes"},
    "shop-3": {"region": "us", "tier": "gold"},
    "shop-4": {},
}


def chosen(policy: object) -> list[str]:
    return select(parse_policy(policy), SITES)


def test_no_condition_selects_every_site_sorted() -> None:
    assert chosen({}) == ["shop-1", "shop-2", "shop-3", "shop-4"]
    assert chosen(None) == chosen({})


def test_conditions_are_anded() -> None:
    assert chosen({"match": {"region": "eu"}}) == ["shop-1", "shop-2"]
    assert chosen({"match": {"region": "eu"}, "expressions": [
        {"key": "quarantine", "op": "not exists"}]}) == ["shop-1"]  # fmt: skip
    assert chosen({"expressions": [{"key": "tier", "op": "in", "values": ["gold"]}]}) == [
        "shop-1",
        "shop-3",
    ]
    # "not in" holds when the label is absent
    assert chosen({"expressions": [{"key": "tier", "op": "not in", "values": ["gold"]}]}) == [
        "shop-2",
        "shop-4",
    ]
    assert chosen({"expressions": [{"key": "quarantine", "op": "exists"}]}) == ["shop-2"]
    assert chosen({"sites": ["shop-3", "shop-1"], "match": {"tier": "gold"}}) == [
        "shop-1",
        "shop-3",
    ]
    assert chosen({"sites": ["shop-9"]}) == []


def test_every_problem_is_listed() -> None:
    with pytest.raises(PlacementError) as info:
        parse_policy(
            {
                "match": {"region": 3},
                "expressions": [
                    {"key": "tier", "op": "near"},
                    {"key": "tier", "op": "in", "values": []},
                    {"key": "x", "op": "exists", "values": ["a"]},
                    "nope",
                ],
                "sites": ["Bad_Site"],
                "max_parallel": 0,
                "color": "red",
            }
        )
    problems = info.value.problems
    assert len(problems) == 8, problems
    joined = "\n".join(problems)
    for fragment in ("color", "match.region", "'near'", "values", "takes no values",
                     "expressions[3]", "Bad_Site", "max_parallel"):  # fmt: skip
        assert fragment in joined
    assert info.value.code == "bad_placement"


def test_policies_round_trip_through_json() -> None:
    raw = {
        "match": {"region": "eu"},
        "expressions": [{"key": "tier", "op": "not_in", "values": ["b", "a"]}],
        "sites": ["b", "a"],
        "max_parallel": 3,
    }
    policy = parse_policy(raw)
    assert policy.expressions == (Expression("tier", "not in", ("a", "b")),)
    assert parse_policy(policy.to_json()) == policy
    assert policy.to_json()["sites"] == ["a", "b"]


def test_waves_are_capped_by_max_parallel() -> None:
    assert plan_waves(["c", "a", "b", "d", "e"], 2) == [["a", "b"], ["c", "d"], ["e"]]
    assert plan_waves([], 10) == []
    with pytest.raises(ValueError):
        plan_waves(["a"], 0)


_names = st.from_regex(r"[a-z][a-z0-9]{0,5}", fullmatch=True)
_labels = st.dictionaries(st.sampled_from(["region", "tier", "zone"]), st.sampled_from("abc"))
_fleets = st.dictionaries(_names, _labels, max_size=20)


@given(_fleets, _labels, st.integers(1, 7))
def test_selection_and_waves_properties(
    fleet: dict[str, dict[str, str]], match: dict[str, str], max_parallel: int
) -> None:
    policy = make_policy(match=match, max_parallel=max_parallel)
    picked = select(policy, fleet)
    assert picked == sorted(picked)
    assert set(picked) == {
        s for s, labels in fleet.items() if all(labels.get(k) == v for k, v in match.items())
    }
    waves = plan_waves(picked, max_parallel)
    assert [s for wave in waves for s in wave] == picked  # every site once, in order
    assert all(1 <= len(wave) <= max_parallel for wave in waves)
    assert select(make_policy(), fleet) == sorted(fleet)


@given(_fleets, st.lists(_names, min_size=1, max_size=8), _labels)
def test_a_list_of_sites_selects_those_registered_that_match(
    fleet: dict[str, dict[str, str]], listed: list[str], match: dict[str, str]
) -> None:
    picked = select(make_policy(match=match, sites=listed), fleet)
    assert picked == sorted(
        s for s in set(listed) & set(fleet) if all(fleet[s].get(k) == v for k, v in match.items())
    )


@given(_fleets, st.sampled_from(["region", "tier"]), st.lists(st.sampled_from("abc")))
def test_in_and_not_in_partition_the_fleet(
    fleet: dict[str, dict[str, str]], key: str, values: list[str]
) -> None:
    if not values:
        return
    inside = select(make_policy(expressions=[Expression(key, "in", tuple(values))]), fleet)
    outside = select(make_policy(expressions=[Expression(key, "not in", tuple(values))]), fleet)
    assert sorted(inside + outside) == sorted(fleet)
    assert not set(inside) & set(outside)


def test_max_parallel_takes_what_json_schema_calls_an_integer() -> None:
    assert parse_policy({"max_parallel": 5.0}).max_parallel == 5  # the document allows it
    for bad in (5.5, True, "5", 0.0):
        with pytest.raises(PlacementError):
            parse_policy({"max_parallel": bad})
