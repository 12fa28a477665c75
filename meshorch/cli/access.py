"""``meshorch access-token ...``: the access tokens of a site's operators (admins only).

    meshorch access-token create --role operator [--tenant acme] [--ttl 30d]
    meshorch access-token list
    meshorch access-token revoke ID

Run on a host of the site, they go through the agent's root-only socket; elsewhere give
``--agent HOST:PORT`` and an admin token in ``$MESHORCH_AGENT_TOKEN``.
"""

from __future__ import annotations

import argparse
import sys
import time
from typing import Any

from meshorch.cli.agent_client import (
    add_agent_flag,
    add_output_flag,
    agent_address,
    call_agent,
    print_json,
)
from meshorch.errors import ConfigurationError
from meshorch.site.authz import ROLES

UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


def add_access_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "access-token",
        help="access tokens of a site's operators",
        description="Tokens for the agent's API over TCP (the socket on a host needs none). "
        "A role: viewer reads, operator also changes apps, images and streams, admin does "
        "everything; a tenant's token reaches only that tenant's apps and streams.",
    )
    actions = parser.add_subparsers(dest="access_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a token (printed once)")
    create.add_argument("--role", required=True, choices=ROLES)
    create.add_argument("--tenant", help="only this tenant's apps and streams")
    create.add_argument("--ttl", help="validity: 90s, 30m, 12h, 30d (default: until revoked)")
    listing = actions.add_parser("list", help="every token: id, role, tenant, expiry")
    revoke = actions.add_parser("revoke", help="revoke a token on every host at once")
    revoke.add_argument("token_id", metavar="ID")
    for sub in (create, listing, revoke):
        add_agent_flag(sub)
        sub.set_defaults(handler=run_access)
    add_output_flag(listing)


def _seconds(text: str) -> float:
    try:
        if text[-1:] in UNITS:
            return float(text[:-1]) * UNITS[text[-1]]
        return float(text)
    except ValueError:
        raise ConfigurationError(f"bad duration {text!r}: use e.g. 90s, 30m, 12h, 30d") from None


def run_access(args: argparse.Namespace) -> int:
    agent = agent_address(args.agent)
    if args.access_command == "create":
        body: dict[str, object] = {"role": args.role}
        if args.tenant:
            body["tenant"] = args.tenant
        if args.ttl:
            body["ttl_s"] = _seconds(args.ttl)
        made = call_agent(agent, "POST", "/v1/access-tokens", body)
        print(made["token"])
        print(f"# {made['id']}: {made['role']}, {_reach(made)}, {_expiry(made)}", file=sys.stderr)
    elif args.access_command == "list" and args.output == "json":
        print_json(call_agent(agent, "GET", "/v1/access-tokens")["tokens"])
    elif args.access_command == "list":
        print(f"{'ID':18} {'ROLE':9} {'TENANT':16} EXPIRES")
        for token in call_agent(agent, "GET", "/v1/access-tokens")["tokens"]:
            print(f"{token['id']:18} {token['role']:9} {token['tenant'] or '*':16} "
                  f"{_expiry(token)}")  # fmt: skip
    else:
        call_agent(agent, "DELETE", f"/v1/access-tokens/{args.token_id}")
        print(f"revoked {args.token_id}")
    return 0


def _reach(token: dict[str, Any]) -> str:
    return f"tenant {token['tenant']}" if token.get("tenant") else "site-wide"


def _expiry(token: dict[str, Any]) -> str:
    at = token.get("expires_at")
    return "never" if at is None else time.strftime("%Y-%m-%d %H:%M", time.localtime(at))
