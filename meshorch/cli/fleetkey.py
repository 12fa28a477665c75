"""``meshorch fleet ...``: the site's side of the fleet link, through one of its agents.

    meshorch fleet status                      the link, the site key and its rotation
    meshorch fleet rotate-key [--wait 60]      rotate the site's key towards the hub now
    meshorch fleet export [--since V] > f      the delta envelopes the site applied last

Run on a host of the site, they go through the agent's root-only socket; elsewhere give
``--agent HOST:PORT`` and an admin token in ``$MESHORCH_AGENT_TOKEN`` (docs/fleet-link.md).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

from meshorch.cli.agent_client import AGENT_HELP, agent_address, call_agent
from meshorch.errors import ConfigurationError
from meshorch.fleet.apply import APPLIED_KEEP


def add_fleet_site_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "fleet",
        help="this site's fleet link: status, rotate the site key, export what it applied",
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
    export = actions.add_parser(
        "export",
        help="write the delta envelopes this site applied last, one a line (JSON Lines)",
        description="Write the envelopes of the last versions the site applied (it keeps "
        f"{APPLIED_KEEP}), as it applied them, one a line: the same form as `meshorch deltas "
        "export --site SITE` from the hub, so the two can be compared (diff), and checked "
        "offline with `meshorch deltas verify FILE --site SITE --root-key HEX`. A site that "
        "caught up by a snapshot keeps the versions after it only.",
    )
    export.add_argument(
        "--since", type=int, default=0, metavar="V", help="only the versions after V"
    )
    export.add_argument(
        "-f", "--file", type=Path, default=None, help="write here instead of standard output"
    )
    export.set_defaults(handler=run_fleet_export)
    for sub in (status, rotate, export):
        sub.add_argument("--agent", default=None, help=AGENT_HELP)
    for sub in (status, rotate):
        sub.set_defaults(handler=run_fleet)


def run_fleet_export(args: argparse.Namespace) -> int:
    if args.since < 0:
        raise ConfigurationError("--since is a version, 0 or more")
    agent = agent_address(args.agent)
    lines: list[bytes] = []
    after = args.since
    while True:
        page = call_agent(agent, "GET", f"/v1/fleet/applied?after={after}")
        lines.extend(text.encode() + b"\n" for text in page["envelopes"])
        if page["next_after"] is None:
            break
        after = int(page["next_after"])
    data = b"".join(lines)
    if args.file is None:
        sys.stdout.buffer.write(data)
        sys.stdout.flush()
    else:
        try:
            args.file.write_bytes(data)
        except OSError as exc:
            raise ConfigurationError(f"{args.file}: {exc.strerror}") from None
    kept = f"{len(lines)} envelope(s)"
    print(
        f"site {page['site']}: {kept} written; it applied up to version {page['version']} "
        f"({page['head']})",
        file=sys.stderr,
    )
    return 0


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
    if fleet.get("held"):
        print("held:       yes: the hub holds this site, it applies no delta until released")
    if rotation.get("last_error"):
        print(f"last error: {rotation['last_error']}")
