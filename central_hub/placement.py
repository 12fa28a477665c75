"""Placement policies: which sites an application goes to, and in how many waves (pure).

A policy, as sent by operators::

    {"match": {"region": "eu"},
     "expressions": [{"key": "tier", "op": "in", "values": ["gold", "silver"]},
                     {"key": "quarantine", "op": "not exists"}],
     "sites": ["shop-1", "shop-2"],
     "max_parallel": 10}

Every condition given must hold (AND); a policy with no condition selects every site.
``match`` requires equal label values; ``in`` / ``not in`` compare the label's value with
``values`` (``not in`` also holds when the label is absent); ``exists`` / ``not exists``
test the key only; ``sites`` lists site ids. ``max_parallel`` (default 10) caps how many
sites change per wave. Site order is always sorted by id, so plans are deterministic.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from central_hub.errors import InputProblems
from central_hub.model import id_problem, label_problems

Op = Literal["in", "not in", "exists", "not exists"]
_OPS: dict[str, Op] = {
    "in": "in",
    "not in": "not in",
    "not_in": "not in",
    "exists": "exists",
    "not exists": "not exists",
    "not_exists": "not exists",
}
DEFAULT_MAX_PARALLEL = 10
MAX_PARALLEL = 10_000  # one wave can reach a fleet of this many sites at once
MAX_EXPRESSIONS = 32
MAX_VALUES = 256
MAX_SITES = 10_000
_FIELDS = ("match", "expressions", "sites", "max_parallel")
_EXPRESSION_FIELDS = ("key", "op", "values")


class PlacementError(InputProblems):
    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("bad_placement", "the placement policy is invalid", problems)


@dataclass(frozen=True, slots=True)
class Expression:
    key: str
    op: Op
    values: tuple[str, ...] = ()

    def holds(self, labels: Mapping[str, str]) -> bool:
        if self.op == "exists":
            return self.key in labels
        if self.op == "not exists":
            return self.key not in labels
        present = self.key in labels and labels[self.key] in self.values
        return present if self.op == "in" else not present

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"key": self.key, "op": self.op}
        if self.op in ("in", "not in"):
            data["values"] = list(self.values)
        return data


@dataclass(frozen=True, slots=True)
class Policy:
    match: tuple[tuple[str, str], ...] = ()
    expressions: tuple[Expression, ...] = ()
    sites: tuple[str, ...] | None = None
    max_parallel: int = DEFAULT_MAX_PARALLEL
    _sites_set: frozenset[str] = field(default=frozenset(), compare=False, repr=False)

    def matches(self, site_id: str, labels: Mapping[str, str]) -> bool:
        if self.sites is not None and site_id not in self._sites_set:
            return False
        if any(labels.get(key) != value for key, value in self.match):
            return False
        return all(e.holds(labels) for e in self.expressions)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            "match": dict(self.match),
            "expressions": [e.to_json() for e in self.expressions],
            "max_parallel": self.max_parallel,
        }
        if self.sites is not None:
            data["sites"] = list(self.sites)
        return data


def make_policy(
    match: Mapping[str, str] | None = None,
    expressions: Sequence[Expression] = (),
    sites: Sequence[str] | None = None,
    max_parallel: int = DEFAULT_MAX_PARALLEL,
) -> Policy:
    chosen = None if sites is None else tuple(sorted(set(sites)))
    return Policy(
        match=tuple(sorted((match or {}).items())),
        expressions=tuple(expressions),
        sites=chosen,
        max_parallel=max_parallel,
        _sites_set=frozenset(chosen or ()),
    )


def parse_policy(data: object) -> Policy:
    """Read a policy; ``PlacementError`` lists every problem."""
    if data is None:
        return make_policy()
    if not isinstance(data, dict):
        raise PlacementError(["placement: must be an object"])
    problems = [
        f"placement.{key}: unknown field (known: {', '.join(_FIELDS)})"
        for key in sorted(set(data) - set(_FIELDS))
    ]
    match = data.get("match", {})
    problems += label_problems("placement.match", match)
    expressions = _expressions(data.get("expressions", []), problems)
    sites = _sites(data.get("sites"), problems)
    max_parallel = data.get("max_parallel", DEFAULT_MAX_PARALLEL)
    if isinstance(max_parallel, float) and max_parallel.is_integer():
        max_parallel = int(max_parallel)  # 5.0 is an integer to JSON Schema too
    if type(max_parallel) is not int or not 1 <= max_parallel <= MAX_PARALLEL:
        problems.append(f"placement.max_parallel: an integer from 1 to {MAX_PARALLEL}")
    if problems:
        raise PlacementError(problems)
    return make_policy(match, expressions, sites, max_parallel)


def _expressions(raw: object, problems: list[str]) -> list[Expression]:
    if not isinstance(raw, list) or len(raw) > MAX_EXPRESSIONS:
        problems.append(f"placement.expressions: a list of at most {MAX_EXPRESSIONS}")
        return []
    found: list[Expression] = []
    for i, item in enumerate(raw):
        path = f"placement.expressions[{i}]"
        if not isinstance(item, dict):
            problems.append(f"{path}: must be an object with key, op and values")
            continue
        before = len(problems)
        problems += [
            f"{path}.{k}: unknown field (known: {', '.join(_EXPRESSION_FIELDS)})"
            for k in sorted(set(item) - set(_EXPRESSION_FIELDS))
        ]
        key, op, values = item.get("key"), _OPS.get(str(item.get("op"))), item.get("values")
        if not isinstance(key, str) or label_problems("k", {key: ""}):
            problems.append(f"{path}.key: {key!r} is not a label key")
        if op is None:
            problems.append(
                f"{path}.op: {item.get('op')!r} is not one of in, not in, exists, not exists"
            )
        elif op in ("in", "not in"):
            if (
                not isinstance(values, list)
                or not 1 <= len(values) <= MAX_VALUES
                or not all(isinstance(v, str) for v in values)
            ):
                problems.append(f"{path}.values: a list of 1 to {MAX_VALUES} strings for {op!r}")
        elif values not in (None, []):
            problems.append(f"{path}.values: {op!r} takes no values")
        if len(problems) == before and isinstance(key, str) and op is not None:
            kept = tuple(sorted(set(values))) if isinstance(values, list) else ()
            found.append(Expression(key, op, kept))
    return found


def _sites(raw: object, problems: list[str]) -> list[str] | None:
    if raw is None:
        return None
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_SITES:
        problems.append(
            f"placement.sites: a list of 1 to {MAX_SITES} site ids (leave it out for any site)"
        )
        return None
    for i, site in enumerate(raw):
        problem = id_problem(f"placement.sites[{i}]", site)
        if problem is not None:
            problems.append(problem)
    return [s for s in raw if isinstance(s, str)]


def select(policy: Policy, sites: Mapping[str, Mapping[str, str]]) -> list[str]:
    """The ids of the sites (id -> labels) the policy selects, sorted."""
    # O(sites named) for a list of sites; no per-site test when nothing is asked of labels.
    chosen = sites if policy.sites is None else [s for s in policy.sites if s in sites]
    if not policy.match and not policy.expressions:
        return sorted(chosen)
    return sorted(site for site in chosen if policy.matches(site, sites[site]))


def plan_waves(site_ids: Sequence[str], max_parallel: int) -> list[list[str]]:
    """Split sorted site ids into waves of at most ``max_parallel``."""
    if max_parallel < 1:
        raise ValueError("max_parallel must be at least 1")
    ordered = sorted(site_ids)
    return [ordered[i : i + max_parallel] for i in range(0, len(ordered), max_parallel)]
