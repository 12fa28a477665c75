"""``meshorch fleet ...``: the site's side of the fleet link, through one of its agents.

    meshorch fleet status                      the link, the site key and its rotation
    meshorch fleet rotate-key [--wait 60]      rotate the site's key towards the hub now

Run on a host of the site, they go through the agent's root-only socket; elsewhere give
``--agent HOST:PORT`` and an admin token in ``$MESHORCH_AGENT_TOKEN`` (docs/fleet-link.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from meshorch.cli.agent_client import AGENT_HELP, agent_address, call_agent


def add_fleet_site_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "fleet",
        help="this site's fleet link: status, rotate the site key",
        description="The site's link to the hub, through one of its agents.",
    )
    actions = parser.add_subparsers(dest="fleet_command", required=True, metavar="ACTION")
    status = actions.add_parser("status", help="the link, the site key and its rotation")
    rotate = actions.add_parser(
        "rotate-key",
        help="rotate the site's key towards the hub now",
        description="Make a new site key; the site leader announces it to the hub (signed by "
        "the current key) and signs with it once the hub took it. Revoking a host does this "
        "by itself.",
    )
    rotate.add_argument(
        "--wait", type=float, default=60.0, metavar="S", help="seconds to wait (0: do not)"
    )
    for sub in (status, rotate):
        sub.add_argument("--agent", default=None, help=AGENT_HELP)
        sub.set_defaults(handler=run_fleet)


def run_fleet(args: argparse.Namespace) -> int:
    agent = agent_address(args.agent)
    if args.fleet_command == "status":
        _print_status(call_agent(agent, "GET", "/v1/fleet"))
        return 0
    asked = call_agent(agent, "POST", "/v1/fleet/key", {})
    pending = str(asked["pending"])
    print(f"rotation from {asked['site_key']} to {pending} asked")
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline:
        fleet = call_agent(agent, "GET", "/v1/fleet")
        if fleet["site_key"] == pending:
            print("done: the hub holds the new key and the site signs with it")
            return 0
        time.sleep(1.0)
    if args.wait > 0:
        error = call_agent(agent, "GET", "/v1/fleet")["site_key_rotation"]["last_error"]
        print(f"not done after {args.wait:g} s ({error or 'the hub not reached yet'}); "
              "the site leader keeps trying", file=sys.stderr)  # fmt: skip
        return 4
    return 0


def _print_status(fleet: dict[str, Any]) -> None:
    link = fleet.get("link") or {}
    rotation = fleet.get("site_key_rotation") or {}
    pending = rotation.get("pending")
    print(f"site:       {fleet['site']}")
    print(f"hub:        {link.get('hub', '-')} (connected: {fleet.get('connected')})")
    print(f"site key:   {fleet.get('site_key') or '-'}")
    waiting = f"{pending['public_key']} ({pending['reason']})" if pending else "-"
    print(f"pending:    {waiting}")
    if rotation.get("last_error"):
        print(f"last error: {rotation['last_error']}")
