"""The chaos suite's negative control, on a lab site of its own (root).

Reads with ``consistency=local`` are not linearizable: the checker must say so, or a green
run of the scenarios would mean nothing. The control runs on a fresh site: on the site the
scenarios leave behind, cutting a follower has been seen to stall the majority's writes
for about 5 s (the proposal timeout), which leaves no client free to read the isolated host
in the fault's window; that stall is the product's, reported, and not this control's to
measure.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from meshorch.chaos.disks import DISK_TOOLS
from meshorch.chaos.runner import ChaosLab, ChaosSettings
from tests.labutil import require_lab

pytestmark = pytest.mark.lab


@pytest.fixture(scope="module")
def chaos_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosLab]:
    require_lab("wg", "wireguard-go", "iptables", *DISK_TOOLS)
    state = tmp_path_factory.mktemp("chaos-control")
    settings = ChaosSettings(recovery_timeout_s=45.0, app_bound_s=45.0)
    with ChaosLab(state, settings=settings, say=print) as lab:
        yield lab


@pytest.mark.timeout(300)
def test_stale_local_reads_under_a_partition_are_caught(
    chaos_lab: ChaosLab, tmp_path: Path
) -> None:
    """The negative control: reads with consistency=local are not linearizable, and the
    isolated follower serves stale values while the majority writes on. The suite must say
    so, or a green run of the scenarios would mean nothing. A stale read needs a read of
    the isolated host after a write elsewhere, before that client blocks on a write to the
    isolated host: likely, not certain, so more clients and up to three seeds."""
    settings = replace(chaos_lab.settings, read_consistency="local", clients=10)
    summaries = []
    for seed in (2, 5, 9):
        path = tmp_path / f"report-{seed}.json"
        report = chaos_lab.run_scenario("minority-partition", seed, 12.0, path, settings)
        linear = next(i for i in report.invariants if i.name == "linearizable")
        if linear.status == "fail":
            assert "not linearizable" in linear.detail
            assert report.linearizability["violations"][0]["ops"]
            return
        summaries.append(report.summary())
    pytest.fail("no stale read caught in three runs:\n" + "\n".join(summaries))
