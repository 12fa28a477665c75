"""The deletion interlock (pure): a change that would stop applications at too many sites
is refused, with the exact list of what would go, unless the operator confirms it.

A change confirms with ``confirm=N``, N being the number of sites it touches (sites that
would stop at least one application), typed by the operator after reading the refusal:
a number from a script that never read it would be stale the moment the fleet changes.
Confirmation is required when, by default (``Thresholds``):

- an application would stop at more than 10% of the sites that run it, or
- an application would stop at more than 50 sites, or
- a site would be left running no application at all (the site refuses such a delta
  unless it carries the confirmation: ``meshorch.fleet.interlock``). For a tenant's
  token, no application of its tenant: whether other tenants run anything at a site is
  not its business, and a confirmation too many is the safe side.

A ``confirm`` that does not match the count is refused too (the fleet moved since the
operator read it, or a number was made up). The operations of a confirmed change carry
``confirmed: N``, signed with the delta, so sites and the offline log check can see it.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from central_hub.errors import ApiError
from meshorch.fleet.interlock import CONFIRMED_FIELD

DEFAULT_FRACTION = 0.10
DEFAULT_MAX_SITES = 50
MAX_LISTED_SITES = 1000  # site ids named in one refusal; the counts are always whole


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Above these, a change needs ``confirm``: the share of an application's sites it may
    stop at, and how many of its sites at most."""

    fraction: float = DEFAULT_FRACTION
    max_sites: int = DEFAULT_MAX_SITES


@dataclass(frozen=True, slots=True)
class Removal:
    """An application that would stop at ``sites``, out of the ``of`` sites running it."""

    app: str
    sites: frozenset[str]
    of: int


@dataclass(frozen=True, slots=True)
class Assessment:
    removals: tuple[Removal, ...]
    emptied: frozenset[str]  # sites that would run nothing
    touched: int  # sites losing at least one application
    reasons: tuple[str, ...]  # why confirmation is needed; empty: it is not

    def details(self) -> dict[str, Any]:
        """What would go, for the refusal: sorted, at most ``MAX_LISTED_SITES`` ids."""
        budget, truncated = MAX_LISTED_SITES, False
        removals = []
        for removal in self.removals:
            ids = sorted(removal.sites)[:budget]
            budget -= len(ids)
            truncated |= len(ids) < len(removal.sites)
            removals.append(
                {"app": removal.app, "stops_at": len(removal.sites), "of": removal.of,
                 "sites": ids}
            )  # fmt: skip
        emptied = sorted(self.emptied)[:MAX_LISTED_SITES]
        truncated |= len(emptied) < len(self.emptied)
        return {
            "sites": self.touched,
            "reasons": list(self.reasons),
            "removals": removals,
            "emptied": emptied,
            "truncated": truncated,
        }


def assess(
    removals: Iterable[Removal],
    emptied: Collection[str] = (),
    thresholds: Thresholds = Thresholds(),
    whose: str = "",
) -> Assessment:
    """Whether stopping ``removals`` (and leaving ``emptied`` running nothing, of the
    applications of ``whose`` if given) needs a confirmation, and how many sites it
    touches."""
    kept = tuple(sorted((r for r in removals if r.sites), key=lambda r: r.app))
    reasons: list[str] = []
    for removal in kept:
        stops = len(removal.sites)
        if stops > thresholds.max_sites:
            reasons.append(f"{removal.app} would stop at {stops} sites (more than "
                           f"{thresholds.max_sites})")  # fmt: skip
        elif stops > thresholds.fraction * max(removal.of, 1):
            reasons.append(f"{removal.app} would stop at {stops} of its {removal.of} sites "
                           f"(more than {thresholds.fraction:.0%})")  # fmt: skip
    empty = frozenset(emptied)
    if empty:
        of = f" of tenant {whose}" if whose else ""
        reasons.append(f"{len(empty)} site(s) would be left running no application{of}")
    touched = len(frozenset().union(*(r.sites for r in kept)) | empty)
    return Assessment(kept, empty, touched, tuple(reasons))


class ConfirmationRequired(ApiError):
    """409: the change needs ``confirm`` (or had one that does not match); ``details``
    lists what would go."""

    def __init__(self, code: str, message: str, assessment: Assessment) -> None:
        super().__init__(409, code, message, details=assessment.details())


def confirmation(assessment: Assessment, confirm: int | None, what: str) -> int | None:
    """The ``confirmed`` stamp for the change's operations (``None``: none given), or
    raises ``ConfirmationRequired``. A ``confirm`` must match ``assessment.touched``
    whether or not it was needed."""
    if confirm is not None and confirm != assessment.touched:
        raise ConfirmationRequired(
            "confirmation_mismatch",
            f"{what} touches {assessment.touched} site(s), not {confirm}: read what it "
            f"stops (details) and confirm with confirm={assessment.touched}",
            assessment,
        )
    if confirm is None and assessment.reasons:
        raise ConfirmationRequired(
            "confirmation_required",
            f"{what} needs a confirmation: {'; '.join(assessment.reasons)}. Read what it "
            f"stops (details) and repeat with confirm={assessment.touched}",
            assessment,
        )
    return confirm


def stamp(op: Mapping[str, Any], confirmed: int | None) -> dict[str, Any]:
    """``op`` carrying the operator's confirmation, when there is one."""
    return dict(op) if confirmed is None else {**op, CONFIRMED_FIELD: confirmed}


def left_empty(
    losing: Mapping[str, Collection[str]], apps_sites: Iterable[tuple[str, Sequence[str]]]
) -> frozenset[str]:
    """The sites of ``losing`` (site -> the applications it would stop) that run nothing
    else, by ``apps_sites`` ((app, its sites) for every application)."""
    remaining = set(losing)
    for app, sites in apps_sites:
        if not remaining:
            break
        for site in sites:
            if site in remaining and app not in losing[site]:
                remaining.discard(site)
    return frozenset(remaining)
