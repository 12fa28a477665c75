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

The registered sites are read once (when first needed); then the set of those holding
format 2 back is kept up to date by the sites' changes and reports, O(1) each.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal

from meshorch.fleet.delta import DELTA_V1, DELTA_V2
from meshorch.state.protocol import FEATURES

Mode = Literal["auto", 1, 2]
MODES: dict[str, Mode] = {"auto": "auto", "1": 1, "2": 2}
SHOWN = 20  # sites named in the status when format 2 is held back
V2_PROTOCOL = FEATURES["delta_v2"]


def parse_mode(text: str) -> Mode:
    try:
        return MODES[text.strip().lower()]
    except KeyError:
        raise ValueError("the delta format is auto, 1 or 2") from None


def speaks_v2(report: Mapping[str, Any] | None) -> bool:
    """Whether every host of the report speaks the site protocol of format 2 deltas."""
    if report is None:
        return False
    hosts = report.get("hosts") or []
    return bool(hosts) and all(int(h.get("protocol", 1)) >= V2_PROTOCOL for h in hosts)


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
        self._sites = sites  # the registered sites' ids (read once)
        self._registered = registered  # whether a site is registered now
        self._report = report  # a site's latest report
        self._held: set[str] | None = None  # registered sites not on protocol 5 (lazy)

    def site_ready(self, site: str) -> bool:
        """Whether ``site`` is served as a site that knows per-site views."""
        return self.mode != DELTA_V1 and speaks_v2(self._report(site))

    def _held_back(self) -> set[str]:
        if self._held is None:  # once, from the store: then kept up to date
            self._held = {site for site in self._sites() if not speaks_v2(self._report(site))}
        return self._held

    def site_changed(self, site: str) -> None:
        """A site was registered, changed or deleted (``Sites.listeners``)."""
        if self._held is None:
            return
        if self._registered(site) and not speaks_v2(self._report(site)):
            self._held.add(site)
        else:
            self._held.discard(site)

    def reported(
        self, site: str, previous: Mapping[str, Any] | None, report: Mapping[str, Any]
    ) -> None:
        """A report was kept (``Reports.listeners``): O(1) unless its protocols changed."""
        if self._held is not None and speaks_v2(previous) != speaks_v2(report):
            self.site_changed(site)

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
