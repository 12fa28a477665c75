"""``meshorch token|app|image|host``: the operator's commands against one agent.

Apart from ``meshorch/cli/main.py`` so that an agent process, which parses only its own
command, never loads this client code.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from meshorch.cli.agent_client import (
    AgentRefused,
    add_agent_flag,
    add_output_flag,
    agent_address,
    auth_headers,
    call_agent,
    is_socket,
    print_json,
    request_agent,
)
from meshorch.errors import ConfigurationError


def add_agent_ops_commands(commands: argparse._SubParsersAction[Any]) -> None:
    token = commands.add_parser("token", help="join tokens for new hosts")
    token_commands = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = token_commands.add_parser(
        "create",
        help="create a join token on the local agent",
        description="Create a join token. A new host started with `meshorch agent --site S "
        "--data-dir D --join-token TOKEN` then finds the site by mDNS and joins it.",
    )
    create.add_argument("--site", required=True, help="the site (checked against the agent's)")
    create.add_argument("--ttl", default="1h", help="validity: 90s, 30m, 1h, 7d (default 1h)")
    create.add_argument("--single-use", action="store_true", help="valid for one host only")
    add_agent_flag(create, "api")
    create.set_defaults(handler=run_token_create)

    app = commands.add_parser("app", help="applications of a site")
    app_commands = app.add_subparsers(dest="app_command", required=True, metavar="ACTION")
    apply = app_commands.add_parser(
        "apply",
        help="create or upgrade an application from its spec",
        description="Send an application spec (YAML or JSON, see docs/app-spec.md) to an "
        "agent. A new version rolls out host by host and rolls back by itself if it fails "
        "its health gate.",
    )
    apply.add_argument("-f", "--file", type=Path, required=True, help="the spec")
    add_agent_flag(apply, "agent")
    apply.set_defaults(handler=run_app_apply)
    app_list = app_commands.add_parser("list", help="applications and their readiness")
    add_agent_flag(app_list, "agent")
    add_output_flag(app_list)
    app_list.set_defaults(handler=run_app_list)
    show = app_commands.add_parser("show", help="an application's instances and events")
    show.add_argument("name")
    add_agent_flag(show, "agent")
    show.set_defaults(handler=run_app_show)
    delete = app_commands.add_parser("delete", help="stop and remove an application")
    delete.add_argument("name")
    add_agent_flag(delete, "agent")
    delete.set_defaults(handler=run_app_delete)

    image = commands.add_parser("image", help="container images of a site")
    image_commands = image.add_subparsers(dest="image_command", required=True, metavar="ACTION")
    image_add = image_commands.add_parser(
        "add",
        help="add an image archive to a site",
        description="Upload an image archive (`podman save` output, or a rootfs tar for "
        "`podman import`) to one agent. It enters the site once; every other host copies "
        "it from a site peer, verified by its sha256.",
    )
    image_add.add_argument("file", type=Path, help="the archive")
    image_add.add_argument("--ref", required=True, help="the image's name, e.g. shop/web:1.2")
    add_agent_flag(image_add, "api")
    image_add.set_defaults(handler=run_image_add)
    image_pull = image_commands.add_parser(
        "pull",
        help="pull an image from a registry into a site",
        description="The agent pulls REF from its registry (OCI distribution API; the\n"
        "manifest for its platform; every blob checked against its sha256) and names it\n"
        "in the site's catalogue pinned to the digest the tag has now: the other hosts\n"
        "copy that digest from their peers, so the site runs the same bytes everywhere.\n"
        "Layers shared with images already there are not downloaded again.",
        epilog="examples: meshorch image pull registry.example.com/pos/web:1.4\n"
        '  echo "$TOKEN" | meshorch image pull --username ci --password-stdin '
        "registry.example.com:5000/pos/web@sha256:<64 hex>",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    image_pull.add_argument(
        "ref", metavar="REF", help="e.g. registry.example.com:5000/pos/web:1.4, busybox:1.36"
    )
    image_pull.add_argument("--username", help="the registry user (else anonymous)")
    image_pull.add_argument(
        "--password-stdin", action="store_true", help="read the registry password from stdin"
    )
    image_pull.add_argument(
        "--secret",
        metavar="NAME",
        help='the registry credentials are the tenant\'s secret NAME: {"registry": HOST[:PORT], '
        '"username": ..., "password": ...}, used for that registry only',
    )
    image_pull.add_argument("--tenant", help="the tenant of --secret (default: default)")
    image_pull.add_argument(
        "--plain-http", action="store_true", help="the registry speaks HTTP, not HTTPS (a lab)"
    )
    image_pull.add_argument(
        "--pin",
        action="store_true",
        help="keep the image at the site even when no application names it (else it is "
        "removed after the agents' --image-grace)",
    )
    add_agent_flag(image_pull, "api")
    image_pull.set_defaults(handler=run_image_pull)
    image_list = image_commands.add_parser("list", help="the site's images and who holds them")
    add_agent_flag(image_list, "api")
    add_output_flag(image_list)
    image_list.set_defaults(handler=run_image_list)

    host = commands.add_parser("host", help="manage the hosts of a site")
    host_commands = host.add_subparsers(dest="host_command", required=True, metavar="ACTION")
    revoke = host_commands.add_parser(
        "revoke",
        help="cut a host from its site",
        description="Remove a host from the site's Raft cluster and from every peer's "
        "WireGuard mesh; it cannot join again with its old token or key.",
    )
    revoke.add_argument("host_id", metavar="HOST", help="the host id to revoke")
    add_agent_flag(revoke, "api")
    revoke.set_defaults(handler=run_host_revoke)
    listing = host_commands.add_parser(
        "list", help="the site's hosts: alive, drained, agent version, instances"
    )
    add_agent_flag(listing, "api")
    add_output_flag(listing)
    listing.set_defaults(handler=run_host_list)
    for name, text in (
        ("drain", "move a host's instances to other hosts; it stays a member of the site"),
        ("undrain", "let a drained host take work again"),
        ("remove", "drain a host, wait until its instances run elsewhere, then revoke it"),
    ):
        action = host_commands.add_parser(
            name, help=text, description=text[0].upper() + text[1:] + "."
        )
        action.add_argument("host_id", metavar="HOST")
        add_agent_flag(action, "api")
        if name != "undrain":
            action.add_argument(
                "--timeout", type=float, default=300.0, metavar="SECONDS",
                help="how long to wait for its instances to move (default %(default)s)",
            )  # fmt: skip
        if name == "drain":
            action.add_argument("--wait", action="store_true", help="wait until it runs nothing")
        action.set_defaults(handler=HOST_ACTIONS[name])


def parse_duration(text: str) -> float:
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    try:
        if text and text[-1] in units:
            return float(text[:-1]) * units[text[-1]]
        return float(text)
    except ValueError as exc:
        raise ConfigurationError(f"bad duration {text!r}: use e.g. 90s, 30m, 1h, 7d") from exc


def run_token_create(args: argparse.Namespace) -> int:
    status = call_agent(agent_address(args.api), "GET", "/v1/status")
    if status.get("site") != args.site:
        agent = agent_address(args.api)
        raise ConfigurationError(f"the agent at {agent} serves site {status.get('site')!r}")
    body = {"ttl_s": parse_duration(args.ttl), "single_use": args.single_use}
    token = call_agent(agent_address(args.api), "POST", "/v1/tokens", body)
    expires = time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(token["expires_at"]))
    print(token["token"])
    use = "single use" if token["single_use"] else "reusable"
    print(f"# site {args.site}, {use}, expires {expires}", file=sys.stderr)
    return 0


def run_app_apply(args: argparse.Namespace) -> int:
    path: Path = args.file
    try:
        body = path.read_bytes()
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from exc
    try:
        result = request_agent(
            agent_address(args.agent), "POST", "/v1/apps", body, content_type="application/yaml"
        )
    except AgentRefused as exc:
        print(f"meshorch: {path}: {exc.detail}", file=sys.stderr)
        return 1
    print(f"{result['app']} version {result['version']} applied ({result['digest'][:19]})")
    return 0


def run_app_list(args: argparse.Namespace) -> int:
    body = call_agent(agent_address(args.agent), "GET", "/v1/apps")
    if args.output == "json":
        print_json(body["apps"])
        return 0
    print(f"{'APP':20} {'VERSION':10} {'READY':>7}  ROLLOUT")
    for app in body["apps"]:
        rollout = app["rollout"]
        phase = f"{rollout['phase']} {rollout['from']}->{rollout['to']}" if rollout else "-"
        ready = f"{app['ready']}/{len(app['instances'])}"
        print(f"{app['name']:20} {app['version']:10} {ready:>7}  {phase}")
    return 0


def run_app_show(args: argparse.Namespace) -> int:
    app = call_agent(agent_address(args.agent), "GET", f"/v1/apps/{args.name}")
    print(f"{app['name']} version {app['version']}, {app['ready']} ready")
    print(f"  {'INSTANCE':28} {'HOST':10} {'VERSION':9} {'STATE':9} READY RESTARTS")
    for i in app["instances"]:
        print(f"  {i['instance_id']:28} {i['host']:10} {i['version']:9} {i['state']:9} "
              f"{i['ready']!s:5} {i['restarts']:>8}  {i['message']}")  # fmt: skip
    for event in app["events"][-10:]:
        when = time.strftime("%H:%M:%S", time.localtime(event["at"]))
        print(f"  {when} {event['kind']}: {event['detail']}")
    return 0


def run_app_delete(args: argparse.Namespace) -> int:
    call_agent(agent_address(args.agent), "DELETE", f"/v1/apps/{args.name}")
    print(f"deleted {args.name}")
    return 0


def run_image_add(args: argparse.Namespace) -> int:
    path: Path = args.file
    if not path.is_file():
        raise ConfigurationError(f"{path}: no such file")
    size = path.stat().st_size

    async def upload() -> dict[str, Any]:
        sent = 0
        started = time.monotonic()

        async def chunks() -> AsyncIterator[bytes]:
            nonlocal sent
            with open(path, "rb") as handle:
                while chunk := handle.read(1 << 20):
                    sent += len(chunk)
                    rate = sent / max(time.monotonic() - started, 1e-6) / 1e6
                    print(f"\r{sent * 100 // max(size, 1):3d}% {rate:6.1f} MB/s",
                          end="", file=sys.stderr)  # fmt: skip
                    yield chunk

        agent = agent_address(args.api)
        if is_socket(agent):
            url, connector = "http://localhost/v1/images", aiohttp.UnixConnector(path=agent)
        else:
            url, connector = f"http://{agent}/v1/images", None
        async with (
            aiohttp.ClientSession(connector=connector, headers=auth_headers(agent)) as session,
            session.post(url, params={"ref": args.ref}, data=chunks()) as response,
        ):
            body = dict(await response.json(content_type=None))
        print(file=sys.stderr)
        if response.status != 200:
            error = body.get("error", {})
            raise ConfigurationError(f"upload refused: {error.get('code')}: {error.get('message')}")
        return body

    try:
        body = asyncio.run(upload())
    except aiohttp.ClientError as exc:
        raise ConfigurationError(
            f"cannot reach the agent at {agent_address(args.api)}: {exc}"
        ) from exc
    image = body["image"]
    print(f"{image['ref']} {image['digest']} {image['size']} bytes")
    return 0


PULL_TIMEOUT_S = 3600.0  # the agent answers when every blob is here


def run_image_pull(args: argparse.Namespace) -> int:
    body: dict[str, object] = {"ref": args.ref, "plain_http": args.plain_http, "pin": args.pin}
    if args.password_stdin:
        if not args.username:
            raise ConfigurationError("--password-stdin needs --username")
        body["password"] = sys.stdin.readline().rstrip("\n")
    if args.username:
        body["username"] = args.username
        body.setdefault("password", "")
    if args.secret:
        if args.username:
            raise ConfigurationError("--secret or --username, not both")
        body["secret"] = args.secret
        if args.tenant:
            body["tenant"] = args.tenant
    answer = request_agent(
        agent_address(args.api), "POST", "/v1/images/pull", orjson.dumps(body),
        timeout=PULL_TIMEOUT_S,
    )  # fmt: skip
    image, pull = answer["image"], answer["pull"]
    print(f"{image['ref']} {image['source']} {image['size']} bytes")
    print(f"downloaded {pull['fetched_bytes']} B, {pull['reused_bytes']} B already here")
    return 0


def run_image_list(args: argparse.Namespace) -> int:
    body = call_agent(agent_address(args.api), "GET", "/v1/images")
    if args.output == "json":
        print_json(body["images"])
        return 0
    for image in body["images"]:
        holders = ", ".join(image["holders"]) or "-"
        print(f"{image['ref']:30} {image['digest'][:19]} {image['size']:>12}  on {holders}")
    return 0


def run_host_list(args: argparse.Namespace) -> int:
    hosts = call_agent(agent_address(args.api), "GET", "/v1/hosts")["hosts"]
    if args.output == "json":
        print_json(hosts)
        return 0
    print(
        f"{'HOST':16} {'ALIVE':6} {'DRAINED':8} {'LEADER':7} {'VERSION':12} {'PROTO':6} INSTANCES"
    )
    for h in hosts:
        print(
            f"{h['host_id']:16} {'yes' if h['alive'] else 'NO':6} "
            f"{'yes' if h['drained'] else '-':8} {'*' if h['leader'] else '':7} "
            f"{h['agent_version'] or '?':12} {h['protocol'] or '?'!s:6} {h['instances']}"
        )
    return 0


def _drain(args: argparse.Namespace, drained: bool) -> None:
    call_agent(
        agent_address(args.api), "PUT", f"/v1/hosts/{args.host_id}/drain", {"drained": drained}
    )


def _wait_empty(args: argparse.Namespace) -> bool:
    """Wait until no instance is placed on the host; show progress."""
    deadline = time.monotonic() + args.timeout
    last = None
    while time.monotonic() < deadline:
        hosts = {
            h["host_id"]: h
            for h in call_agent(agent_address(args.api), "GET", "/v1/hosts")["hosts"]
        }
        count = hosts[args.host_id]["instances"] if args.host_id in hosts else 0
        if count != last:
            print(f"{args.host_id}: {count} instance(s) still placed here", flush=True)
            last = count
        if count == 0:
            return True
        time.sleep(0.5)
    print(f"{args.host_id}: instances still placed after {args.timeout:g} s", file=sys.stderr)
    return False


def run_host_drain(args: argparse.Namespace) -> int:
    _drain(args, True)
    print(f"draining {args.host_id}: its instances move to other hosts")
    return 0 if not args.wait or _wait_empty(args) else 4


def run_host_undrain(args: argparse.Namespace) -> int:
    _drain(args, False)
    print(f"{args.host_id} takes work again")
    return 0


def run_host_remove(args: argparse.Namespace) -> int:
    _drain(args, True)
    if not _wait_empty(args):
        return 4
    result = call_agent(agent_address(args.api), "DELETE", f"/v1/members/{args.host_id}")
    print(f"removed {result['removed']['host_id']} from the site")
    return 0


HOST_ACTIONS = {"drain": run_host_drain, "undrain": run_host_undrain, "remove": run_host_remove}


def run_host_revoke(args: argparse.Namespace) -> int:
    result = call_agent(agent_address(args.api), "DELETE", f"/v1/members/{args.host_id}")
    print(f"revoked {result['removed']['host_id']}")
    return 0
