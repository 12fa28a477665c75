"""``meshorch site ...`` and ``meshorch secrets ...`` (docs/secrets.md).

    meshorch site status      [SITE] [--agent SOCKET|HOST:PORT]
    meshorch site unseal      [SITE] [--agent SOCKET|HOST:PORT] --key-file FILE
    meshorch site lockdown    [SITE] [--agent SOCKET|HOST:PORT]
    meshorch site unlock      [SITE] [--agent SOCKET|HOST:PORT]
    meshorch site rotate-keys [SITE] [--agent SOCKET|HOST:PORT]

    meshorch site lockdown|unlock|unseal|rotate-keys SITE --hub URL --token T
    meshorch secrets set NAME (--value V | --value-file F) [--tenant T] --hub URL --token T
    meshorch secrets list|show|delete ... --hub URL --token T

With ``--agent`` a site command goes to that agent; ``SITE``, when given, is checked
against the agent's site, so a command meant for one site is not sent to another by a
wrong address. With ``--hub`` (or ``$MESHORCH_HUB`` when no ``--agent`` is given) it goes
through the hub as a signed delta (lock-down, unlock, rotation) or an approval (unseal).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import os
import sys
import time
from pathlib import Path
from typing import Any

from meshorch.cli.agent_client import (
    AGENT_HELP,
    add_output_flag,
    agent_address,
    call_agent,
    print_json,
)
from meshorch.cli.fleet import (
    HUB_ENV,
    TOKEN_ENV,
    HubError,
    _page_flags,
    confirmed_path,
    hub_call,
    hub_list,
)
from meshorch.errors import ConfigurationError

KEY_BYTES = 32


def add_site_commands(commands: Any) -> None:
    site = commands.add_parser(
        "site",
        help="a site: its secrets (unseal, lock down, unlock, rotate keys), its pending changes",
        description="Act on the secrets of a site through one of its agents (or the hub); "
        "see what it will do when it next applies its pending deltas (diff), or hold it "
        "until reviewed (hold, release), through the hub.",
    )
    actions = site.add_subparsers(dest="site_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=description
        )
        parser.add_argument("site", nargs="?", help="the site (checked against the agent's)")
        parser.add_argument("--agent", default=None, help=AGENT_HELP)
        parser.add_argument(
            "--hub", default=None, metavar="URL", help=f"go through the hub (or ${HUB_ENV})"
        )
        parser.add_argument(
            "--token", default=os.environ.get(TOKEN_ENV), help=f"hub token (${TOKEN_ENV})"
        )
        return parser

    status = action("status", "is this host sealed or locked down, the data keys", "")
    status.set_defaults(handler=run_status)
    unseal = action(
        "unseal",
        "give the site its unseal key after a full restart",
        "Send the site's unseal key (base64 of 32 bytes, in a file) to one agent. The "
        "agent checks it against the site's keyring; the other hosts then get it from it.",
    )
    unseal.add_argument("--key-file", type=Path, help="the unseal key (with --agent)")
    unseal.set_defaults(handler=run_unseal)
    lockdown = action(
        "lockdown",
        "make every host drop its keys and start nothing until unlocked and unsealed",
        "Lock the site down: every host drops its keys from memory, secrets are no longer "
        "delivered and no instance is started (running ones keep running). It lasts across "
        "restarts, until `meshorch site unlock` and then `meshorch site unseal`.",
    )
    lockdown.set_defaults(handler=run_lockdown)
    unlock = action(
        "unlock",
        "end a lock-down (the site then needs an unseal)",
        "End a lock-down. Nobody holds the unseal key any more: unseal the site next.",
    )
    unlock.set_defaults(handler=run_unlock)
    rotate = action(
        "rotate-keys",
        "rotate the data keys now (every secret is rewrapped)",
        "Create a new data key, rewrap every secret to it and delete the old ones.",
    )
    rotate.set_defaults(handler=run_rotate)
    decommission = action(
        "decommission",
        "stop all of a site's work, wipe its secrets, and forget it at the hub",
        "Through the hub (--hub): the site deletes every application (its hosts stop the "
        "instances), drops its keys and deletes every secret from its state, then reports it; "
        "the hub then forgets the site. With --wait, follow it until the hub has forgotten it.",
    )
    decommission.add_argument("--wait", action="store_true", help="until the hub forgot it")
    decommission.add_argument(
        "--confirm", type=int, metavar="N",
        help="confirm a decommission the hub refused because it stops an app at too many of "
        "its sites: N is the number of sites the hub said it touches (1)",
    )  # fmt: skip
    decommission.add_argument("--timeout", type=float, default=300.0, metavar="SECONDS")
    decommission.set_defaults(handler=run_decommission)
    from meshorch.cli.deltas import add_site_diff  # a view of the hub's delta log

    add_site_diff(actions)
    add_secrets_commands(commands)


def _hub_mode(args: argparse.Namespace) -> bool:
    """Whether a site command goes through the hub: --hub, or $MESHORCH_HUB without --agent."""
    if args.hub is None and args.agent is None and os.environ.get(HUB_ENV):
        args.hub = os.environ[HUB_ENV]
    if args.hub is not None and args.agent is not None:
        raise ConfigurationError("give either --agent or --hub, not both")
    if args.hub is not None and not args.site:
        raise ConfigurationError("give the SITE when going through the hub")
    return args.hub is not None


def _site_op(args: argparse.Namespace, path: str) -> dict[str, Any]:
    return dict(hub_call(args, "POST", f"/v1/sites/{args.site}/{path}", {}))


def _agent(args: argparse.Namespace) -> str:
    agent = agent_address(args.agent)
    if args.site is not None:
        site = call_agent(agent, "GET", "/v1/status").get("site")
        if site != args.site:
            raise ConfigurationError(
                f"the agent at {agent} serves site {site!r}, not {args.site!r}"
            )
    return agent


def read_key_file(path: Path) -> str:
    """The base64 text of a key file, checked to hold 32 bytes."""
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise ConfigurationError(f"cannot read --key-file {path}: {exc}") from exc
    try:
        raw = base64.b64decode(text.encode(), validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES:
        raise ConfigurationError(f"{path}: not an unseal key (base64 of {KEY_BYTES} bytes)")
    return text


def run_status(args: argparse.Namespace) -> int:
    if _hub_mode(args):
        view = hub_call(args, "GET", f"/v1/sites/{args.site}")["secrets"]
        state = "locked down" if view["locked_down"] else "sealed" if view["sealed"] else "unsealed"
        print(f"site {args.site}: {state}, escrowed: {'yes' if view['escrowed'] else 'no'}")
        return 0
    status = call_agent(_agent(args), "GET", "/v1/secrets/status")
    state = "locked down" if status["locked_down"] else "sealed" if status["sealed"] else "unsealed"
    print(f"host {status['host_id']}: {state}")
    print(f"data keys {status['data_keys']} (current {status['current_data_key']}), "
          f"{status['secrets']} secret(s), {status['pending']} pending")  # fmt: skip
    return 0


def run_unseal(args: argparse.Namespace) -> int:
    if _hub_mode(args):
        approval = _site_op(args, "unseal")
        print(f"unseal of {args.site} approved until {time.ctime(approval['expires_at'])}: "
              "its leader fetches the key from the hub")  # fmt: skip
        return 0
    if args.key_file is None:
        raise ConfigurationError("give --key-file with --agent (or go through --hub)")
    key = read_key_file(args.key_file)
    agent = _agent(args)
    result = call_agent(agent, "POST", "/v1/secrets/unseal", {"key": key})
    print(f"unsealed {agent}" if result["changed"] else f"{agent} was unsealed already")
    return 0


def run_lockdown(args: argparse.Namespace) -> int:
    if _hub_mode(args):
        answer = _site_op(args, "lockdown")
        print(f"lock-down of {args.site} sent in delta {answer['delta']}; unlock, then "
              "unseal, to end it")  # fmt: skip
        return 0
    call_agent(_agent(args), "POST", "/v1/secrets/lockdown", {})
    print("locked down: every host drops its keys; unlock, then unseal, to end it")
    return 0


def run_unlock(args: argparse.Namespace) -> int:
    if _hub_mode(args):
        answer = _site_op(args, "unlock")
        print(f"unlock of {args.site} sent in delta {answer['delta']}; unseal it next")
        return 0
    result = call_agent(_agent(args), "POST", "/v1/secrets/unlock", {})
    print("unlocked; unseal the site next" if result["changed"] else "the site was not locked")
    return 0


def run_decommission(args: argparse.Namespace) -> int:
    if not _hub_mode(args):
        raise ConfigurationError("decommission goes through the hub: give --hub URL (and --token)")
    path = confirmed_path(f"/v1/sites/{args.site}/decommission", args)
    answer = dict(hub_call(args, "POST", path, {}))
    print(f"decommission of {args.site} sent in delta {answer['delta']}", flush=True)
    if not args.wait:
        return 0
    deadline = time.monotonic() + args.timeout
    while time.monotonic() < deadline:
        try:
            hub_call(args, "GET", f"/v1/sites/{args.site}")
        except HubError as exc:
            if "(404)" in str(exc):
                print(f"{args.site}: decommissioned; the hub has forgotten it")
                return 0
            raise
        time.sleep(1.0)
    print(f"{args.site}: not done after {args.timeout:g} s", file=sys.stderr)
    return 4


def run_rotate(args: argparse.Namespace) -> int:
    if _hub_mode(args):
        answer = _site_op(args, "secrets/rotate")
        print(f"rotation of {args.site} sent in delta {answer['delta']}")
        return 0
    result = call_agent(_agent(args), "POST", "/v1/secrets/rotate", {})
    if result["rotated"]:
        print(f"rotated: data key {result['current_data_key']} is the only one")
    else:
        print("rotation asked for; the site leader is still at it")
    return 0


# -- meshorch secrets (through the hub) -----------------------------------------------------


def add_secrets_commands(commands: Any) -> None:
    secrets = commands.add_parser(
        "secrets",
        help="the fleet's secrets at the hub: set, list, show, delete (never shows values)",
        description="Secrets are stored at the hub encrypted and sent to each target site "
        "sealed to its key; containers get them as files (docs/secrets.md).",
    )
    actions = secrets.add_subparsers(dest="secrets_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(name, help=help_text)
        parser.add_argument(
            "--hub", default=os.environ.get(HUB_ENV), metavar="URL", help=f"(${HUB_ENV})"
        )
        parser.add_argument("--token", default=os.environ.get(TOKEN_ENV), help=f"(${TOKEN_ENV})")
        return parser

    put = action("set", "create a secret or a new version of it")
    put.add_argument("name")
    given = put.add_mutually_exclusive_group(required=True)
    given.add_argument("--value", help="the value as text (visible in the process list)")
    given.add_argument("--value-file", type=Path, help="read the value (bytes) from a file")
    put.add_argument("--tenant", help="the secret's tenant (default: the token's)")
    put.set_defaults(handler=run_secrets_set)
    listing = action("list", "the secrets, their versions and delivery per site")
    _page_flags(listing)
    add_output_flag(listing)
    listing.set_defaults(handler=run_secrets_list)
    show = action("show", "one secret, per site")
    show.add_argument("name")
    show.add_argument("--tenant")
    add_output_flag(show)
    show.set_defaults(handler=run_secrets_show)
    delete = action("delete", "delete a secret from the hub and its sites")
    delete.add_argument("name")
    delete.add_argument("--tenant")
    delete.set_defaults(handler=run_secrets_delete)


def _tenant_query(args: argparse.Namespace) -> str:
    return "" if args.tenant is None else f"?tenant={args.tenant}"


def run_secrets_set(args: argparse.Namespace) -> int:
    body: dict[str, Any] = {"name": args.name}
    if args.value_file is not None:
        try:
            data = (
                sys.stdin.buffer.read()
                if str(args.value_file) == "-"
                else args.value_file.read_bytes()
            )
        except OSError as exc:
            raise ConfigurationError(f"cannot read --value-file {args.value_file}: {exc}") from exc
        body["value_b64"] = base64.b64encode(data).decode()
    else:
        body["value"] = args.value
    if args.tenant is not None:
        body["tenant"] = args.tenant
    secret = hub_call(args, "POST", "/v1/secrets", body)
    print(f"{secret['tenant']}/{secret['name']} version {secret['version']} -> "
          f"{', '.join(secret['targets']) or 'no site yet'}")  # fmt: skip
    return 0


def _print_secret(secret: dict[str, Any]) -> None:
    sites = ", ".join(f"{site}: {s['state']}" for site, s in secret["sites"].items())
    print(f"{secret['tenant']}/{secret['name']}  v{secret['version']}  {sites or '-'}")


def run_secrets_list(args: argparse.Namespace) -> int:
    secrets = hub_list(args, "/v1/secrets", "secrets")
    if args.output == "json":
        print_json(list(secrets))
        return 0
    for secret in secrets:
        _print_secret(secret)
    return 0


def run_secrets_show(args: argparse.Namespace) -> int:
    secret = hub_call(args, "GET", f"/v1/secrets/{args.name}{_tenant_query(args)}")
    if args.output == "json":
        print_json(secret)
    else:
        _print_secret(secret)
    return 0


def run_secrets_delete(args: argparse.Namespace) -> int:
    answer = hub_call(args, "DELETE", f"/v1/secrets/{args.name}{_tenant_query(args)}")
    print(f"deleted {answer['tenant']}/{answer['deleted']} (sites: {answer['sites']})")
    return 0
