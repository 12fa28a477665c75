"""Every chaos scenario, three seeds each, on one real lab site (root).

One lab (3 hosts, the hub, a 2-instance process app) serves the whole module; each
scenario heals its faults and waits for the site before the next starts. Durations are
short (CI): the faults still happen, the checks are the same as ``meshorch chaos run``.
Reports land in pytest's tmp dir; a failure message carries the summary and the paths.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from meshorch.chaos.disks import DISK_TOOLS
from meshorch.chaos.runner import ChaosLab, ChaosSettings
from meshorch.chaos.scenarios import SCENARIOS
from tests.labutil import require_lab

pytestmark = pytest.mark.lab

DURATION_S = 8.0
# The site's hub link notices a cut only after a report or fetch times out: a longer run,
# so that the cut (most of the middle of the run) is seen.
LONGER_S = {"hub-partition": 18.0}
SEEDS = (1, 2, 3)


@pytest.fixture(scope="module")
def chaos_lab(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ChaosLab]:
    require_lab("wg", "wireguard-go", "iptables", *DISK_TOOLS)
    state = tmp_path_factory.mktemp("chaos-lab")
    settings = ChaosSettings(recovery_timeout_s=45.0, app_bound_s=45.0)
    with ChaosLab(state, settings=settings, say=print) as lab:
        yield lab


@pytest.mark.timeout(180)
@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_scenario_keeps_the_invariants(
    chaos_lab: ChaosLab, scenario: str, seed: int, tmp_path: Path
) -> None:
    duration = LONGER_S.get(scenario, DURATION_S)
    report = chaos_lab.run_scenario(scenario, seed, duration, tmp_path / "report.json")
    where = f"\nreport: {tmp_path / 'report.json'}\nlogs: {chaos_lab.lab.store.lab_dir}"
    assert report.verdict == "pass", report.summary() + where
    checked = {i.name for i in report.invariants}
    assert {"events_exactly_once", "events_at_hub_exactly_once"} <= checked, checked
    assert all(f.start_s is not None and f.end_s is not None for f in report.faults)
    ok_kv = sum(report.op_counts.get(k, {}).get("ok", 0) for k in ("put", "get", "delete"))
    assert ok_kv >= 20, f"too few successful operations to mean anything: {report.op_counts}"
    assert (tmp_path / "report.svg").read_text().startswith("<svg")
