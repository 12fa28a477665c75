"""Chaos soak: every chaos scenario back to back on one lab site, for a while (root: lab).

One lab (3 hosts, the hub, a process app) runs the scenarios of ``meshorch chaos`` in turn,
a new seed each round, each for ``--duration`` seconds of workload, until ``--minutes``
have passed (the scenario running then finishes). Every run's invariants are checked
(linearizable KV history, acknowledged writes and events kept, site and app recovered);
reports, histories and timelines go to ``--report-dir``.

    sudo .venv/bin/python bench/chaos_soak.py [--minutes 10] [--duration 20]

Progress on stderr. Last line:
``RESULT ops=<int> faults=<int> violations=<int> recover_max_s=<float>`` where
``violations`` counts failed invariants and runs that could not complete; the line before
it gives the median recovery and the unknown verdicts.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

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
    args = parser.parse_args()
    problem = prerequisites_message("bench/chaos_soak.py", os.geteuid(), shutil.which, LAB_TOOLS)
    if problem:
        log(problem)
        return 2
    names = [n for n in args.scenarios.split(",") if n]
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown or not names:
        log(f"unknown scenario(s) {unknown}; known: {', '.join(SCENARIOS)}")
        return 2
    report_dir = args.report_dir or Path(tempfile.mkdtemp(prefix="chaos-soak-"))
    ops = faults = violations = unknowns = runs = 0
    recoveries: list[float] = []
    app_recoveries: list[float] = []
    with (
        tempfile.TemporaryDirectory(prefix="chaos-lab-") as state,
        ChaosLab(Path(state), settings=ChaosSettings(), say=log) as lab,
    ):
        start = time.monotonic()
        end = start + args.minutes * 60
        round_ = 0
        while time.monotonic() < end:
            seed = args.seed + round_
            for name in names:
                if time.monotonic() >= end:
                    break
                path = report_dir / f"{name}-seed{seed}.json"
                try:
                    report = lab.run_scenario(name, seed, args.duration, path)
                except RuntimeError as exc:  # the site did not come back: count, go on
                    log(f"{name} seed={seed} could not run: {exc}")
                    violations += 1
                    continue
                runs += 1
                ops += report.ops
                faults += sum(1 for f in report.faults if f.start_s is not None)
                failed = [i for i in report.invariants if i.status == "fail"]
                violations += len(failed) + (1 if report.errors else 0)
                unknowns += sum(1 for i in report.invariants if i.status == "unknown")
                recoveries += report.recoveries
                if report.app_recovery_s is not None:
                    app_recoveries.append(report.app_recovery_s)
                elapsed = (time.monotonic() - start) / 60
                log(f"[{elapsed:4.1f}/{args.minutes:g} min] {report.summary()}")
                if report.verdict != "pass":
                    log(f"  report: {path}")
            round_ += 1
    median = statistics.median(recoveries) if recoveries else 0.0
    app_median = statistics.median(app_recoveries) if app_recoveries else 0.0
    print(
        f"runs={runs} recover_median_s={median:.2f} app_recover_median_s={app_median:.2f} "
        f"unknown_verdicts={unknowns} reports={report_dir}"
    )
    print(
        f"RESULT ops={ops} faults={faults} violations={violations} "
        f"recover_max_s={max(recoveries, default=0.0):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
