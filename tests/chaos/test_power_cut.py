"""The power cut with agents that do not sync (``--durability process``), on a lab site of
its own (root).

The positive control of the power-cut scenario: agents that acknowledge writes from the
page cache lose some of them when every host loses power, and the suite must see it, or
a green power-cut run with ``--durability power`` (``test_chaos_lab``) would mean
nothing. The loss is allowed in this mode: its report counts it.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.chaos.disks import DISK_TOOLS
from meshorch.chaos.invariants import POWER_CUT_INVARIANT
from meshorch.chaos.runner import ChaosLab, ChaosSettings
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def process_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosLab]:
    require_lab("wg", "wireguard-go", "iptables", *DISK_TOOLS)
    state = tmp_path_factory.mktemp("chaos-process")
    settings = ChaosSettings(recovery_timeout_s=45.0, app_bound_s=45.0, durability="process")
    with ChaosLab(state, settings=settings, say=print) as lab:
        yield lab


@pytest.mark.timeout(600)
def test_agents_that_do_not_sync_lose_acknowledged_writes_in_a_power_cut(
    process_lab: ChaosLab, tmp_path: Path
) -> None:
    """A run that lost acknowledged writes says how many, and the invariants the loss
    breaks are "allowed", not failed; at least one of the seeds loses some (the cut comes
    while the clients write: nearly always the first). Whether the site comes back is not
    asked here: with a journal torn by the cut it may not (seen: pysyncobj cannot read
    it and the agent exits at start)."""
    summaries = []
    for seed in SEEDS:
        path = tmp_path / f"power-cut-{seed}.json"
        report = process_lab.run_scenario("power-cut", seed, 8.0, path)
        summaries.append(report.summary() + f"\nreport: {path}")
        judged = next(i for i in report.invariants if i.name == POWER_CUT_INVARIANT)
        assert judged.detail.startswith("durability=process: acknowledged writes lost: ")
        if report.lost_writes:
            assert judged.status == "allowed" and "(allowed)" in judged.detail, judged
            broken = [i for i in report.invariants if i.name in LOSS_CHECKS]
            assert all(i.status in ("pass", "allowed") for i in broken), report.summary()
            assert "durability=process" in report.summary()
            return
        recovered = next(i for i in report.invariants if i.name == "site_recovered")
        if recovered.status != "pass":
            break  # the site did not come back: the next seed could not start
    pytest.fail("no acknowledged write lost in a power cut of agents that do not sync:\n"
                + "\n".join(summaries))  # fmt: skip


# What a lost write breaks, allowed in this mode.
LOSS_CHECKS = (
    "linearizable",
    "acknowledged_writes_readable",
    "events_exactly_once",
    "events_at_hub_exactly_once",
)
