"""Holding a site: its deltas keep accumulating, it applies none until released.

An operator holds a site (``meshorch site hold SITE``: ``POST /v1/sites/{id}/hold``) to
review what a long-offline shop will do (``meshorch site diff``) before it does it. The
hold is a field of the site's record (``held``: since when, by which token). While it is
set, the site's long-poll is answered with no delta (after its wait, so the site does not
spin; a poll that was waiting when the hold came too) and ``"held": true``, and the
answer to its reports gives its own applied version as the head (the site does not take
the poll for lost and ask again at once); the site, told it is held, commits no delta
from any relay either (``meshorch.fleet.site_link``).
``release`` ends it: the next poll gets the deltas.

The hub cannot make a site apply what the root key did not sign, and withholding is
something it can always do: a hold needs no signature. A site's gossip relays wait for
the hub's first answer of a session (10 s at most, ``site_link.relay_refusal``); what a
hold cannot stop: deltas peers relay to a site that reaches them but not the hub.
"""

from __future__ import annotations

import asyncio
from typing import Any

from central_hub.ledger import Ledger, Txn
from central_hub.sites import require_site, site_or_none
from central_hub.tokens import TokenRecord

HELD = "held"
CHECK_S = 0.5  # how soon a held poll notices the release or the hub stopping


def is_held(ledger: Ledger, site: str) -> bool:
    """Whether ``site`` is held, read from its record now (``SiteFacts`` for hot paths)."""
    return ledger.is_open and held_record(site_or_none(ledger.store, site))


class SiteFacts:
    """A site's public key and whether it is held, for the link's hot paths (every
    report, every poll), read from its record once per change of the sites table
    (``Store.generation``): a report costs no read transaction and no decode of the record
    while no site changes, and any committed change of any site (a hold, a release, a new
    key, a deletion) is seen by the next call. At most one entry per registered site; an
    unknown site is never kept. Used on the event loop's thread (a replica's view counts
    its changes there)."""

    def __init__(self, ledger: Ledger) -> None:
        self._ledger = ledger
        self._store: object = None  # the store the entries were read from
        self._generation = -1
        self._facts: dict[str, tuple[str | None, bool]] = {}

    def of(self, site: str) -> tuple[str | None, bool]:
        """The site's public key (None: no such site, or not enrolled) and whether it is held."""
        if not self._ledger.is_open:
            return None, False
        store = self._ledger.store
        generation = store.generation("sites")
        if store is not self._store or generation != self._generation:
            self._facts.clear()
            self._store, self._generation = store, generation
        facts = self._facts.get(site)
        if facts is None:
            record = site_or_none(store, site)
            if record is None:
                return None, False
            facts = self._facts[site] = (record.get("public_key"), held_record(record))
        return facts

    def is_held(self, site: str) -> bool:
        return self.of(site)[1]


def held_record(record: object) -> bool:
    """Whether a site's record (None: no such site) says it is held."""
    return isinstance(record, dict) and record.get(HELD) is not None


def hold_of(ledger: Ledger, site: str) -> dict[str, Any] | None:
    record = site_or_none(ledger.store, site)
    return None if record is None else record.get(HELD)


async def set_hold(ledger: Ledger, site: str, token: TokenRecord, held: bool) -> dict[str, Any]:
    """Hold or release ``site`` (404 when not registered); idempotent."""

    def plan(txn: Txn) -> dict[str, Any]:
        record = require_site(ledger.store, site)
        if held and record.get(HELD) is None:
            record[HELD] = {"since": txn.now, "by": token.id}
            txn.put("sites", site, record)
            txn.changed("site", site, None, "held")
        elif not held and record.get(HELD) is not None:
            record.pop(HELD)
            txn.put("sites", site, record)
            txn.changed("site", site, None, "released")
        return {"site": site, "held": record.get(HELD)}

    return await ledger.transact(plan)


async def held_poll(ledger: Ledger, site: str, after: int, wait_s: float) -> dict[str, Any]:
    """A held site's long-poll: no delta, after ``wait_s`` (or as soon as it is released
    or the hub stops, then the site polls again)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait_s
    # Polled: neither a release (another request's commit) nor the hub stopping has an
    # event to wait on, and one check per CHECK_S of an open poll costs nothing.
    while loop.time() < deadline and not ledger.closing and is_held(ledger, site):  # noqa: ASYNC110
        await asyncio.sleep(min(CHECK_S, max(0.0, deadline - loop.time())))
    return held_answer(after)


def held_answer(after: int) -> dict[str, Any]:
    """A held site's poll answer: no delta, the head it asked after."""
    return {"head": after, "deltas": [], "held": True}


def held_report_answer(report: dict[str, Any]) -> dict[str, Any]:
    """The answer to a held site's report: its own version as the head (module docstring)."""
    applied = int(report["applied_version"])
    return {"head": applied, "site_head": applied, "held": True}
