"""Which delta format the hub issues, and which sites get per-site views (pure but for
the store read).

Format 2 deltas (``meshorch.fleet.delta``) sign ``ops_hash`` instead of the operations, so
the hub can send each site only the operations of the deltas that target it. An agent older
than site protocol 5 refuses them (``malformed``), and a site applies what its leader of the
moment can verify, so the hub issues format 2 only when every host of every registered
site reported protocol 5 or later in the site's latest report (``mode`` ``auto``); a
registered site that never reported holds it back too (its agent is unknown). Until then
it issues format 1, whose deltas carry their operations in the signed body and go to
every site as they are. The choice is made per delta: a fleet moves from format 1 to 2 by
itself once its last old agent is upgraded (a chain of format 1 then 2 deltas), and back
to 1 when an old agent joins one of its sites.

``mode`` 1 or 2 forces a format (``meshorch hub --delta-format``): 2 on a fleet with old
agents stops them at the first format 2 delta, each recording a ``malformed`` refusal.

A site whose latest report says every host speaks protocol 5 is answered as a site that
knows per-site views (``site_ready``): its long-poll answers at once only for deltas that
target it (or all sites) and the answer to its report carries ``site_head``.

Merkle targets (``meshorch.fleet.merkle``): a format 2 delta for more than
``MERKLE_ABOVE`` sites names them by a Merkle root, each site getting its proof instead of
the list (1-2 KB instead of 15 bytes per site named), once every host of every registered
site reported protocol 7 (``merkle_ready``; held back like format 2, by the same rules).

The registered sites are read once (``warm``, when the hub opens its store, or when first
needed); then the sets of those holding format 2 and Merkle targets back are kept up to
date by the sites' changes and reports, O(1) each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from meshorch.fleet.delta import DELTA_V1, DELTA_V2, Target
from meshorch.state.protocol import FEATURES

Mode = Literal["auto", 1, 2]
MODES: dict[str, Mode] = {"auto": "auto", "1": 1, "2": 2}
SHOWN = 20  # sites named in the status when format 2 is held back
V2_PROTOCOL = FEATURES["delta_v2"]
MERKLE_PROTOCOL = FEATURES["merkle_targets"]
# A list of this many site ids is about the size of a proof (15-byte ids, 1-2 KB proofs).
MERKLE_ABOVE = 64


def parse_mode(text: str) -> Mode:
    try:
        return MODES[text.strip().lower()]
    except KeyError:
        raise ValueError("the delta format is auto, 1 or 2") from None


def speaks(report: Mapping[str, Any] | None, protocol: int) -> bool:
    """Whether every host of the report speaks ``protocol`` or later."""
    if report is None:
        return False
    hosts = report.get("hosts") or []
    return bool(hosts) and all(int(h.get("protocol", 1)) >= protocol for h in hosts)


def speaks_v2(report: Mapping[str, Any] | None) -> bool:
    """Whether every host of the report speaks the site protocol of format 2 deltas."""
    return speaks(report, V2_PROTOCOL)


class _HeldBack:
    """The registered sites some host of which is below ``protocol`` (read once when first
    needed, then kept up to date)."""

    def __init__(
        self,
        protocol: int,
        sites: Callable[[], Iterable[str]],
        registered: Callable[[str], bool],
        report: Callable[[str], Mapping[str, Any] | None],
    ) -> None:
        self.protocol = protocol
        self._sites, self._registered, self._report = sites, registered, report
        self._held: set[str] | None = None

    def get(self) -> set[str]:
        if self._held is None:
            self._held = {s for s in self._sites() if not speaks(self._report(s), self.protocol)}
        return self._held

    def site_changed(self, site: str) -> None:
        if self._held is None:
            return
        if self._registered(site) and not speaks(self._report(site), self.protocol):
            self._held.add(site)
        else:
            self._held.discard(site)

    def reported(
        self, site: str, previous: Mapping[str, Any] | None, report: Mapping[str, Any]
    ) -> None:
        changed = speaks(previous, self.protocol) != speaks(report, self.protocol)
        if self._held is not None and changed:
            self.site_changed(site)


class DeltaFormat:
    """The hub's choice of delta format (module docstring)."""

    def __init__(
        self,
        mode: Mode,
        sites: Callable[[], Iterable[str]],
        registered: Callable[[str], bool],
        report: Callable[[str], Mapping[str, Any] | None],
    ) -> None:
        self.mode: Mode = mode
        self._report = report  # a site's latest report
        self._v2 = _HeldBack(V2_PROTOCOL, sites, registered, report)
        self._merkle = _HeldBack(MERKLE_PROTOCOL, sites, registered, report)
        self._last_merkle: Target | None = None  # the last Merkle target signed

    def warm(self) -> None:
        """Read the registered sites now (before the hub serves), not in the first delta's
        transaction: O(sites), 20 ms at 3,000 sites."""
        self._v2.get()
        self._merkle.get()

    def site_ready(self, site: str) -> bool:
        """Whether ``site`` is served as a site that knows per-site views."""
        return self.mode != DELTA_V1 and speaks_v2(self._report(site))

    def _held_back(self) -> set[str]:
        return self._v2.get()

    def site_changed(self, site: str) -> None:
        """A site was registered, changed or deleted (``Sites.listeners``)."""
        self._v2.site_changed(site)
        self._merkle.site_changed(site)

    def reported(
        self, site: str, previous: Mapping[str, Any] | None, report: Mapping[str, Any]
    ) -> None:
        """A report was kept (``Reports.listeners``): O(1) unless its protocols changed."""
        self._v2.reported(site, previous, report)
        self._merkle.reported(site, previous, report)

    def merkle_ready(self) -> bool:
        """Whether a format 2 delta may name its sites by a Merkle root."""
        return self.current() == DELTA_V2 and not self._merkle.get()

    def signed_target(self, target: Target) -> Target:
        """``target`` as the next delta signs it: more than ``MERKLE_ABOVE`` sites by a
        Merkle root once every site can read one, else as it is."""
        if target.all or target.root or len(target.sites) <= MERKLE_ABOVE:
            return target
        if not self.merkle_ready():
            return target
        last = self._last_merkle
        if last is not None and last.sites == target.sites:
            return last  # a new version for the same sites: the same tree, not hashed again
        self._last_merkle = Target.merkle_of(target.sites)
        return self._last_merkle

    def current(self) -> int:
        """The format of the next delta."""
        if self.mode != "auto":
            return self.mode
        return DELTA_V2 if not self._held_back() else DELTA_V1

    def status_json(self) -> dict[str, Any]:
        """``delta_format`` of ``GET /v1/deltas``."""
        held = sorted(self._held_back()) if self.mode == "auto" else []
        return {
            "mode": str(self.mode),
            "issuing": self.current(),
            "held_back_by": held[:SHOWN],
            "held_back_count": len(held),
        }
