"""``meshorch chaos``: run chaos scenarios on a lab site and check what the clients saw.

``add_chaos_command`` registers ``chaos run`` and ``chaos list`` on the top-level
subparsers; each sets ``handler`` (args -> exit code). Progress goes to stderr, the
report's summary to stdout. Exit codes: 0 every invariant held, 1 a violation or an
unknown verdict, 2 bad usage, 130 interrupted (the lab is healed and torn down anyway).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from meshorch.chaos.scenarios import SCENARIOS, plan_scenario

_DESCRIPTION = """\
Build a lab site (3 hosts in network namespaces behind a NAT router, the hub on the WAN,
a 2-instance process app), run concurrent clients against the site's KV store and event
stream from the site's LAN, inject the scenario's faults at seeded times, heal, then check:
the KV history is linearizable, every acknowledged write is still readable (or was
superseded), every acknowledged event is stored exactly once at the site and, once
forwarded, at the hub, the site and the app recover within bounds. Writes a JSON report,
the history (JSON lines) and an SVG timeline.
Each host's data directory is an ext4 filesystem on a loop device: the power cut drops
whatever the host had not synced. With --durability power (the agents' default) a lost
acknowledged write fails the run; with process it is allowed, and the report counts it.
Needs root and the lab's tools (ip, iptables, wg, wireguard-go, losetup, mkfs.ext4)."""

_EPILOG = """\
examples:
  meshorch chaos list
  sudo meshorch chaos run kill-leader --seed 7 --duration 20
  sudo meshorch chaos run all --duration 15 --report-dir /tmp/chaos
  sudo meshorch chaos run majority-partition --seed 3 --report /tmp/maj.json
  sudo meshorch chaos run power-cut --seed 2 --durability process
"""


def add_chaos_command(commands: argparse._SubParsersAction[Any]) -> None:
    """Register ``chaos run`` and ``chaos list`` on the top-level ``commands``."""
    chaos = commands.add_parser(
        "chaos",
        help="fault-inject a lab site under load and check linearizability (root)",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = chaos.add_subparsers(dest="chaos_command", required=True, metavar="SUBCOMMAND")
    listing = sub.add_parser("list", help="the scenarios and what each does")
    listing.add_argument(
        "--duration",
        type=float,
        default=20.0,
        help="show each fault schedule for a run this long (default 20 s)",
    )
    listing.add_argument("--seed", type=int, default=0, help="... with this seed (default 0)")
    listing.set_defaults(handler=run_list)

    run = sub.add_parser(
        "run",
        help="run a scenario (or 'all') on a fresh lab, then tear it down",
        description=_DESCRIPTION,
        epilog=_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    run.add_argument("scenario", help="a scenario name (see 'chaos list') or 'all'")
    run.add_argument(
        "--seed",
        type=int,
        default=1,
        help="seeds the fault times and targets, and the clients (default 1)",
    )
    run.add_argument(
        "--duration",
        type=float,
        default=20.0,
        metavar="S",
        help="seconds of workload per scenario, faults inside (default 20)",
    )
    run.add_argument(
        "--report",
        type=Path,
        metavar="PATH",
        help="the JSON report (one scenario); the history and the SVG go next "
        "to it (default: REPORT_DIR/SCENARIO-seedN.json)",
    )
    run.add_argument(
        "--report-dir",
        type=Path,
        default=Path("chaos-reports"),
        help="where reports go (default ./chaos-reports)",
    )
    run.add_argument("--clients", type=int, default=4, help="concurrent KV clients (default 4)")
    run.add_argument("--keys", type=int, default=6, help="keys they share (default 6)")
    run.add_argument("--no-events", action="store_true", help="no event-stream producer")
    run.add_argument(
        "--read-consistency",
        choices=("linearizable", "local"),
        default="linearizable",
        help="how the clients read; 'local' is not linearizable: a negative control that "
        "should end in a violation under a partition (default linearizable)",
    )
    run.add_argument(
        "--recovery-timeout",
        type=float,
        default=60.0,
        metavar="S",
        help="bound on site recovery after each heal (default 60)",
    )
    run.add_argument(
        "--app-bound",
        type=float,
        default=60.0,
        metavar="S",
        help="bound on the app getting back to its desired state (default 60)",
    )
    run.add_argument(
        "--durability",
        choices=("power", "process"),
        default="power",
        help="the agents' --durability: with 'power' an acknowledged write lost in a "
        "power cut fails the run, with 'process' it is allowed and counted (default power)",
    )
    run.add_argument(
        "--no-sync-setup",
        action="store_true",
        help="do not sync the hosts' disks once the lab is up: a power cut may then also "
        "take what the agents wrote while joining (their identity, keys)",
    )
    run.add_argument("--prefix", help="lab prefix, 1-6 chars (default: random 'chXXXX')")
    run.add_argument(
        "--state-dir",
        type=Path,
        default=Path("/run/meshorch-chaos"),
        help="lab state, logs and agent data (default /run/meshorch-chaos)",
    )
    run.set_defaults(handler=run_chaos)


def run_list(args: argparse.Namespace) -> int:
    for scenario in SCENARIOS.values():
        hub = " [hub]" if scenario.needs_hub else ""
        print(f"{scenario.name:20} {scenario.summary}{hub}")
        for f in plan_scenario(scenario.name, args.seed, args.duration):
            print(f"{'':20}   {f.start_s:6.2f}s-{f.end_s:6.2f}s {f.kind} {','.join(f.roles)}")
    return 0


def _say(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def run_chaos(args: argparse.Namespace) -> int:
    from meshorch.chaos.runner import ChaosLab, ChaosSettings

    names = list(SCENARIOS) if args.scenario == "all" else [args.scenario]
    if any(n not in SCENARIOS for n in names):
        print(
            f"meshorch chaos: no scenario {args.scenario!r}; try 'meshorch chaos list'",
            file=sys.stderr,
        )
        return 2
    if args.report is not None and len(names) > 1:
        print(
            "meshorch chaos: --report names one scenario's report; use --report-dir",
            file=sys.stderr,
        )
        return 2
    if args.duration < 3:
        print("meshorch chaos: --duration must be at least 3 s", file=sys.stderr)
        return 2
    settings = ChaosSettings(
        clients=args.clients,
        keys=args.keys,
        events=not args.no_events,
        read_consistency=args.read_consistency,
        recovery_timeout_s=args.recovery_timeout,
        app_bound_s=args.app_bound,
        durability=args.durability,
        sync_setup=not args.no_sync_setup,
    )
    try:
        settings.validate()
    except ValueError as exc:
        print(f"meshorch chaos: {exc}", file=sys.stderr)
        return 2
    verdicts = []
    try:
        with ChaosLab(args.state_dir, prefix=args.prefix, settings=settings, say=_say) as lab:
            for name in names:
                path = args.report or args.report_dir / f"{name}-seed{args.seed}.json"
                report = lab.run_scenario(name, args.seed, args.duration, path)
                verdicts.append(report.verdict)
                print(report.summary())
                print(f"  report {path}, timeline {report.plot_path}")
    except KeyboardInterrupt:
        _say("interrupted: faults healed, lab torn down")
        return 130
    except Exception as exc:  # the lab's own errors are clear enough to show as they are
        print(f"meshorch chaos: {exc}", file=sys.stderr)
        return 1
    return 0 if all(v == "pass" for v in verdicts) else 1
