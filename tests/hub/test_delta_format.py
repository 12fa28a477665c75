"""The hub's choice of delta format (central_hub.deltaformat): format 2 only while every
registered site's every host reported protocol 5; kept up to date by sites and reports."""

from __future__ import annotations

from typing import Any

import pytest

from central_hub.deltaformat import DeltaFormat, parse_mode, speaks_v2


def report(*protocols: int) -> dict[str, Any]:
    return {"hosts": [{"host_id": f"h{i}", "protocol": p} for i, p in enumerate(protocols)]}


class Fleet:
    def __init__(self) -> None:
        self.sites: set[str] = set()
        self.reports: dict[str, dict[str, Any]] = {}
        self.reads = 0

    def registered(self) -> list[str]:
        self.reads += 1
        return sorted(self.sites)

    def format(self, mode: Any = "auto") -> DeltaFormat:
        return DeltaFormat(mode, self.registered, self.sites.__contains__, self.reports.get)

    def report(self, choice: DeltaFormat, site: str, new: dict[str, Any]) -> None:
        previous = self.reports.get(site)
        self.reports[site] = new
        choice.reported(site, previous, new)


def test_format_2_waits_for_every_host_of_every_registered_site() -> None:
    fleet = Fleet()
    choice = fleet.format()
    assert choice.current() == 2  # no site: nothing holds it back
    fleet.sites |= {"a", "b"}
    choice.site_changed("a")
    choice.site_changed("b")
    assert choice.current() == 1  # never heard from: unknown agents
    assert choice.status_json()["held_back_by"] == ["a", "b"]
    fleet.report(choice, "a", report(5, 5))
    fleet.report(choice, "b", report(5, 4))  # one host still on the old agent
    assert choice.current() == 1 and choice.status_json()["held_back_by"] == ["b"]
    assert choice.site_ready("a") and not choice.site_ready("b")
    fleet.report(choice, "b", report(5, 5))
    assert choice.current() == 2
    fleet.report(choice, "a", report(5, 5, 4))  # an old agent joins: back to format 1
    assert choice.current() == 1
    fleet.sites.discard("a")
    choice.site_changed("a")  # deleted
    assert choice.current() == 2
    assert fleet.reads == 1  # the store is read once


def test_forced_modes_and_parsing() -> None:
    fleet = Fleet()
    fleet.sites.add("old")
    assert fleet.format(1).current() == 1
    assert fleet.format(2).current() == 2 and not fleet.format(1).site_ready("old")
    assert [parse_mode(t) for t in ("auto", "1", "2", " AUTO ")] == ["auto", 1, 2, "auto"]
    with pytest.raises(ValueError, match="auto, 1 or 2"):
        parse_mode("3")
    assert not speaks_v2(None) and not speaks_v2({"hosts": []})
    assert not speaks_v2({"hosts": [{"host_id": "h1"}]})  # no protocol: an old agent
