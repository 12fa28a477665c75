"""``meshorch site ...``: the secrets of a site, through one of its agents (docs/secrets.md).

    meshorch site status      [SITE] --agent HOST:PORT
    meshorch site unseal      [SITE] --agent HOST:PORT --key-file FILE
    meshorch site lockdown    [SITE] --agent HOST:PORT
    meshorch site unlock      [SITE] --agent HOST:PORT
    meshorch site rotate-keys [SITE] --agent HOST:PORT

``SITE``, when given, is checked against the agent's site, so a command meant for one
site is not sent to another by a wrong address.
"""

from __future__ import annotations

import argparse
import base64
import binascii
from pathlib import Path
from typing import Any

from meshorch.agent_client import call_agent
from meshorch.errors import ConfigurationError

DEFAULT_AGENT = "127.0.0.1:7700"
KEY_BYTES = 32


def add_site_commands(commands: Any) -> None:
    site = commands.add_parser(
        "site",
        help="secrets of a site: unseal, lock down, unlock, rotate keys",
        description="Act on the secrets of a site through one of its agents.",
    )
    actions = site.add_subparsers(dest="site_command", required=True, metavar="ACTION")

    def action(name: str, help_text: str, description: str) -> argparse.ArgumentParser:
        parser: argparse.ArgumentParser = actions.add_parser(
            name, help=help_text, description=description
        )
        parser.add_argument("site", nargs="?", help="the site (checked against the agent's)")
        parser.add_argument("--agent", default=DEFAULT_AGENT, help="an agent of the site")
        return parser

    status = action("status", "is this host sealed or locked down, the data keys", "")
    status.set_defaults(handler=run_status)
    unseal = action(
        "unseal",
        "give the site its unseal key after a full restart",
        "Send the site's unseal key (base64 of 32 bytes, in a file) to one agent. The "
        "agent checks it against the site's keyring; the other hosts then get it from it.",
    )
    unseal.add_argument("--key-file", type=Path, required=True, help="the unseal key")
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


def _address(text: str) -> str:
    return text.removeprefix("http://").rstrip("/")


def _agent(args: argparse.Namespace) -> str:
    agent = _address(args.agent)
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
    status = call_agent(_agent(args), "GET", "/v1/secrets/status")
    state = "locked down" if status["locked_down"] else "sealed" if status["sealed"] else "unsealed"
    print(f"host {status['host_id']}: {state}")
    print(f"data keys {status['data_keys']} (current {status['current_data_key']}), "
          f"{status['secrets']} secret(s), {status['pending']} pending")  # fmt: skip
    return 0


def run_unseal(args: argparse.Namespace) -> int:
    key = read_key_file(args.key_file)
    agent = _agent(args)
    result = call_agent(agent, "POST", "/v1/secrets/unseal", {"key": key})
    print(f"unsealed {agent}" if result["changed"] else f"{agent} was unsealed already")
    return 0


def run_lockdown(args: argparse.Namespace) -> int:
    call_agent(_agent(args), "POST", "/v1/secrets/lockdown", {})
    print("locked down: every host drops its keys; unlock, then unseal, to end it")
    return 0


def run_unlock(args: argparse.Namespace) -> int:
    result = call_agent(_agent(args), "POST", "/v1/secrets/unlock", {})
    print("unlocked; unseal the site next" if result["changed"] else "the site was not locked")
    return 0


def run_rotate(args: argparse.Namespace) -> int:
    result = call_agent(_agent(args), "POST", "/v1/secrets/rotate", {})
    if result["rotated"]:
        print(f"rotated: data key {result['current_data_key']} is the only one")
    else:
        print("rotation asked for; the site leader is still at it")
    return 0
