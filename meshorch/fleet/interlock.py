"""The site's half of the deletion interlock (pure): a delta that would remove every
application the site runs is refused unless the operator confirmed it at the hub.

The hub asks its operators to confirm such a change (``central_hub.interlock``) and stamps
the confirmation (``confirmed``: the number of sites the operator typed) on its
``app.delete`` operations, inside the signed delta. A delta without it that would empty
the site comes from a hub that skipped the check (an older one, a bug, a forged request
that got through): the site keeps its applications, skips the delta's ``app.delete``
operations and reports them as refused; the rest of the delta applies. A change that was
meant is then made again, confirmed.

Each delta is judged alone, in order: one that adds an application and deletes the others
does not empty the site.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

CONFIRMED_FIELD = "confirmed"  # on the app.delete ops of a confirmed change
REFUSAL = (
    "refused: the delta would remove every application this site runs ({count}) and "
    "carries no operator confirmation; confirm the change at the hub (confirm=N)"
)


def is_confirmed(op: Mapping[str, Any]) -> bool:
    value = op.get(CONFIRMED_FIELD)
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def refused_groups(
    groups: Iterable[tuple[int, Sequence[Mapping[str, Any]]]], running: Iterable[str]
) -> set[int]:
    """The groups (deltas, by id, in the order applied) whose ``app.delete`` operations
    the site refuses, given the names of the applications it runs before the first.
    A refused group's deletions do not happen: the next group starts from what runs."""
    names = set(running)
    refused: set[int] = set()
    for group, ops in groups:
        after, added = set(names), set()
        unconfirmed = False
        for op in ops:
            name = op.get("name")
            if op.get("op") == "app.delete" and isinstance(name, str):
                after.discard(name)
                unconfirmed |= not is_confirmed(op)
            elif op.get("op") == "app.put":
                spec = op.get("spec")
                spec_name = spec.get("name") if isinstance(spec, dict) else None
                if isinstance(spec_name, str):
                    after.add(spec_name)
                    added.add(spec_name)
        if names and not after and unconfirmed:
            refused.add(group)
            after = names | added  # its deletions do not happen
        names = after
    return refused
