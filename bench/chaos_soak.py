"""Chaos soak: every chaos scenario back to back on a lab site, for a while (root: lab).

For each agent durability mode (``--durability``, default ``power,process``) one lab (3
hosts, the hub, a process app, every host's data directory on a lossy disk) runs the
scenarios of ``meshorch chaos`` in turn, a new seed each round, each for ``--duration``
seconds of workload, until its share of ``--minutes`` has passed (the scenario running
then finishes). Every run's invariants are checked (linearizable KV history, acknowledged
writes and events kept, site and app recovered); in a power cut that drops what the hosts
had not synced, a lost acknowledged write is a violation with ``power`` and allowed, but
counted, with ``process``. Reports, histories and timelines go to ``--report-dir``.

    sudo .venv/bin/python bench/chaos_soak.py [--minutes 10] [--duration 20]

Progress on stderr. One line per mode:
``durability=<mode> runs=<int> power_cuts=<int> acknowledged_writes_lost=<int>[ (allowed)]
violations=<int>``, then the median recovery and the unknown verdicts, and last
``RESULT ops=<int> faults=<int> violations=<int> recover_max_s=<float>`` where
``violations`` counts failed invariants and runs that could not complete, every mode.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import cast

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.chaos.disks import DISK_TOOLS
from meshorch.chaos.invariants import DURABILITY_MODES, Durability
from meshorch.chaos.runner import ChaosLab, ChaosSettings
from meshorch.chaos.scenarios import SCENARIOS
from meshorch.lab.prerequisites import LAB_TOOLS, prerequisites_message


def log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    parser.add_argument("--minutes", type=float, default=10.0, help="soak time (default 10)")
    parser.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="workload seconds per scenario (default 20: a hub cut long enough to be seen)",
    )
    parser.add_argument("--seed", type=int, default=1, help="first round's seed (default 1)")
    parser.add_argument("--scenarios", default=",".join(SCENARIOS),
                        help="comma-separated subset, in order (default: all)")  # fmt: skip
    parser.add_argument("--report-dir", type=Path, help="default: a temporary directory")
    parser.add_argument("--durability", default="power,process",
                        help="the agents' durability modes, a lab each, in order "
                        "(default power,process)")  # fmt: skip
    args = parser.parse_args()
    tools = (*LAB_TOOLS, *DISK_TOOLS)
    problem = prerequisites_message("bench/chaos_soak.py", os.geteuid(), shutil.which, tools)
    if problem:
        log(problem)
        return 2
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        log(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
        return 2
    modes = [m for m in args.durability.split(",") if m]
    if not modes or any(m not in DURABILITY_MODES for m in modes):
        log(f"--durability takes {', '.join(DURABILITY_MODES)}, not {args.durability!r}")
        return 2
    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    totals = Soak()
    per_mode: dict[str, Soak] = {}
    for mode in modes:
        soak = per_mode[mode] = Soak()
        settings = ChaosSettings(durability=cast(Durability, mode))
        minutes = args.minutes / len(modes)
        with (
            tempfile.TemporaryDirectory(prefix="chaos-lab-") as state,
            ChaosLab(Path(state), settings=settings, say=log) as lab,
        ):
            soak.run(lab, names, args.seed, args.duration, minutes, report_dir / mode)
        totals.add(soak)
    for mode, soak in per_mode.items():
        allowed = " (allowed)" if mode == "process" and soak.lost else ""
        print(
            f"durability={mode} runs={soak.runs} power_cuts={soak.power_cuts} "
            f"acknowledged_writes_lost={soak.lost}{allowed} violations={soak.violations}"
        )
    median = statistics.median(totals.recoveries) if totals.recoveries else 0.0
    app_median = statistics.median(totals.app_recoveries) if totals.app_recoveries else 0.0
    print(
        f"runs={totals.runs} recover_median_s={median:.2f} "
        f"app_recover_median_s={app_median:.2f} unknown_verdicts={totals.unknowns} "
        f"reports={report_dir}"
    )
    print(
        f"RESULT ops={totals.ops} faults={totals.faults} violations={totals.violations} "
        f"recover_max_s={max(totals.recoveries, default=0.0):.2f}"
    )
    return 0


@dataclass
class Soak:
    """What the runs of one lab (or all of them) found."""

    ops: int = 0
    faults: int = 0
    violations: int = 0
    unknowns: int = 0
    runs: int = 0
    power_cuts: int = 0
    lost: int = 0
    recoveries: list[float] = field(default_factory=list)
    app_recoveries: list[float] = field(default_factory=list)

    def add(self, other: Soak) -> None:
        for name in ("ops", "faults", "violations", "unknowns", "runs", "power_cuts", "lost"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.recoveries += other.recoveries
        self.app_recoveries += other.app_recoveries

    def run(
        self,
        lab: ChaosLab,
        names: list[str],
        first_seed: int,
        duration: float,
        minutes: float,
        report_dir: Path,
    ) -> None:
        mode = lab.settings.durability
        start = time.monotonic()
        end = start + minutes * 60
        round_ = 0
        while time.monotonic() < end:
            seed = first_seed + round_
            for name in names:
                if time.monotonic() >= end:
                    break
                path = report_dir / f"{name}-seed{seed}.json"
                try:
                    report = lab.run_scenario(name, seed, duration, path)
                except RuntimeError as exc:  # the site did not come back: count, go on
                    log(f"{name} seed={seed} could not run: {exc}")
                    self.violations += 1
                    continue
                self.runs += 1
                self.ops += report.ops
                self.faults += sum(1 for f in report.faults if f.start_s is not None)
                if report.lost_writes is not None:
                    self.power_cuts += 1
                    self.lost += report.lost_writes
                failed = [i for i in report.invariants if i.status == "fail"]
                self.violations += len(failed) + (1 if report.errors else 0)
                self.unknowns += sum(1 for i in report.invariants if i.status == "unknown")
                self.recoveries += report.recoveries
                if report.app_recovery_s is not None:
                    self.app_recoveries.append(report.app_recovery_s)
                elapsed = (time.monotonic() - start) / 60
                log(f"[{mode} {elapsed:4.1f}/{minutes:g} min] {report.summary()}")
                if report.verdict != "pass":
                    log(f"  report: {path}")
            round_ += 1


if __name__ == "__main__":
    sys.exit(main())
