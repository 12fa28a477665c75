"""The ``meshorch`` command line. The only place that configures logging.

Its size: the argument parser of every agent-side command and their thin handlers; the
hub's, the fleet's, the secrets' and the access tokens' commands live in modules beside it.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import uvloop

from meshorch import __version__
from meshorch.apps.settings import RUNTIMES, WorkloadSettings, parse_labels
from meshorch.chaos.cli import add_chaos_command
from meshorch.cli.access import add_access_commands
from meshorch.cli.agent_client import (
    AGENT_HELP,
    AgentRefused,
    agent_address,
    auth_headers,
    call_agent,
    is_socket,
    request_agent,
)
from meshorch.cli.fleet import add_fleet_commands
from meshorch.cli.fleetkey import add_fleet_site_commands
from meshorch.cli.logs import add_logs_command
from meshorch.cli.secrets import add_site_commands
from meshorch.errors import ConfigurationError, MeshorchError
from meshorch.join.mesh import (
    DEFAULT_OVERLAY_NETWORK,
    DEFAULT_RAFT_PORT,
    DEFAULT_WG_PORT,
    MeshSettings,
    detect_lan_ip,
)
from meshorch.net.app_network import NetworkSettings, parse_host_port
from meshorch.site.config import PASSWORD_ENV, AgentConfig, resolve_password
from meshorch.sizes import parse_size

logger = logging.getLogger("meshorch")

EXIT_REVOKED = 3


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="meshorch",
        description="Orchestrate containerised applications across edge sites.",
    )
    parser.add_argument("--version", action="version", version=f"meshorch {__version__}")
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    agent = commands.add_parser(
        "agent",
        help="run the agent of one host (Raft member + site API)",
        description="Run the agent of one host: a member of the site's Raft cluster that "
        "serves the site API over HTTP.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  first host of a new site (root):\n"
        "    meshorch agent --site shop1 --data-dir /var/lib/meshorch --bootstrap\n"
        "  another host, with a token from `meshorch token create --site shop1`:\n"
        "    meshorch agent --site shop1 --data-dir /var/lib/meshorch --join-token mojt1...\n"
        "  static addresses, no WireGuard:\n"
        "    meshorch agent --site shop1 --host-id h1 --data-dir /var/lib/meshorch \\\n"
        "      --raft 10.0.0.11:7800 --peer 10.0.0.12:7800 --peer 10.0.0.13:7800 \\\n"
        "      --cluster-password-file /etc/meshorch/cluster.password",
    )
    agent.add_argument("--site", required=True, help="site name (a-z, 0-9, '-')")
    agent.add_argument(
        "--host-id", default=None, help="this host's id, unique in the site (default: hostname)"
    )
    agent.add_argument("--data-dir", required=True, type=Path, help="state directory")
    agent.add_argument(
        "--api", default="0.0.0.0:7700", metavar="HOST:PORT", help="HTTP API (default %(default)s)"
    )
    agent.add_argument(
        "--socket",
        type=Path,
        metavar="PATH",
        help="the operator socket, mode 0600: full access for whoever may open it (default "
        "DATA_DIR/agent.sock; the CLI looks for /var/lib/meshorch/agent.sock or $MESHORCH_AGENT)",
    )
    agent.add_argument(
        "--operator-token-file",
        type=Path,
        metavar="FILE",
        help="an admin access token this agent accepts on --api (made there if absent); "
        "more tokens: `meshorch access-token create`",
    )
    static = agent.add_argument_group(
        "static membership", "name the Raft addresses yourself (no WireGuard, no discovery)"
    )
    static.add_argument("--raft", metavar="HOST:PORT", help="this agent's Raft address")
    static.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="Raft address of another initial member (repeat for each)",
    )
    static.add_argument(
        "--cluster-password-file",
        type=Path,
        help=f"file with the site's Raft password (else ${PASSWORD_ENV}, else the copy in "
        "the data dir; a lone first host generates one)",
    )
    mesh = agent.add_argument_group(
        "mesh membership (default when --raft is not given; needs root)",
        "find the site by mDNS, join with a token, run Raft over an automatic WireGuard mesh",
    )
    mesh.add_argument("--join-token", help="token from `meshorch token create` on the site")
    mesh.add_argument(
        "--bootstrap",
        action="store_true",
        help="start a new site (also done when no host of the site answers on the LAN)",
    )
    mesh.add_argument("--lan-ip", help="LAN address for mDNS and WireGuard (default: detected)")
    mesh.add_argument("--wg-interface", default="meshorch0", help="WireGuard interface name")
    mesh.add_argument("--wg-port", type=int, default=DEFAULT_WG_PORT, help="WireGuard UDP port")
    mesh.add_argument("--raft-port", type=int, default=DEFAULT_RAFT_PORT, help="Raft TCP port")
    mesh.add_argument(
        "--overlay-network",
        default=DEFAULT_OVERLAY_NETWORK,
        help="overlay network of a new site (default %(default)s)",
    )
    mesh.add_argument(
        "--discovery-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="how long to look for the site's hosts on the LAN",
    )
    work = agent.add_argument_group("workloads", "what this host offers to run applications")
    work.add_argument(
        "--runtime",
        choices=list(RUNTIMES),
        default="auto",
        help="podman containers, or plain processes (auto: podman when root and installed)",
    )
    work.add_argument(
        "--label", action="append", default=[], metavar="KEY=VALUE", help="a host label"
    )
    work.add_argument("--cpu", type=float, help="CPU cores offered (default: all)")
    work.add_argument("--memory", help="memory offered, e.g. 2Gi (default: all)")
    work.add_argument(
        "--evict-at-pct", type=float, default=95.0, metavar="PCT",
        help="disk or memory use at which this host moves its lowest-priority instances "
        "elsewhere, one every few seconds (default %(default)s)",
    )  # fmt: skip
    net = agent.add_argument_group(
        "application networking",
        "site DNS, the ingress address, tenant isolation (docs/networking.md)",
    )
    net.add_argument(
        "--dns", default="auto", metavar="IP:PORT|auto|off",
        help="where this host answers SERVICE.APP.TENANT.site.meshorch (auto: the overlay "
        "address, port 53, in mesh mode; off otherwise)",
    )  # fmt: skip
    net.add_argument(
        "--dns-upstream", action="append", default=None, metavar="IP[:PORT]",
        help="resolver for other names (repeatable; default: /etc/resolv.conf; 'none' refuses)",
    )  # fmt: skip
    net.add_argument(
        "--ingress-address", metavar="CIDR",
        help="the site's ingress address on the LAN, e.g. 10.1.0.200/24 (held by the leader)",
    )  # fmt: skip
    net.add_argument("--ingress-device", help="its interface (default: found from the subnet)")
    net.add_argument(
        "--isolate-tenants", choices=("auto", "on", "off"), default="auto",
        help="run containers as their tenant's uid and block cross-tenant connections "
        "(auto: with podman as root)",
    )  # fmt: skip
    fleet = agent.add_argument_group(
        "fleet link", "the hub this site takes its desired state from (docs/fleet-link.md)"
    )
    fleet.add_argument("--hub", metavar="URL", help="the hub's URL, e.g. https://hub:7900")
    fleet.add_argument("--fleet", metavar="NAME", help="the fleet this site belongs to")
    fleet.add_argument(
        "--fleet-key", metavar="HEX", help="the fleet root public key (from `meshorch hub`)"
    )
    fleet.add_argument(
        "--enroll-token", metavar="TOKEN", help="single-use token binding the site key at the hub"
    )
    agent.add_argument(
        "--preset",
        choices=["lan", "local"],
        default="lan",
        help="timeouts: 'lan' for real hosts, 'local' for fast elections on loopback",
    )
    agent.add_argument(
        "--durability",
        choices=["power", "process"],
        default="power",
        help="'power' (default): a write is acknowledged once its Raft entry is fdatasync'd "
        "on a majority, so it survives a power cut of every host; 'process': acknowledged "
        "from the page cache (faster; survives the agent's death, not the machine's)",
    )

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
    create.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
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
    apply.add_argument("--agent", "--api", dest="agent", default=None, help=AGENT_HELP)
    apply.set_defaults(handler=run_app_apply)
    app_list = app_commands.add_parser("list", help="applications and their readiness")
    app_list.add_argument("--agent", "--api", dest="agent", default=None, help=AGENT_HELP)
    app_list.set_defaults(handler=run_app_list)
    show = app_commands.add_parser("show", help="an application's instances and events")
    show.add_argument("name")
    show.add_argument("--agent", "--api", dest="agent", default=None, help=AGENT_HELP)
    show.set_defaults(handler=run_app_show)
    delete = app_commands.add_parser("delete", help="stop and remove an application")
    delete.add_argument("name")
    delete.add_argument("--agent", "--api", dest="agent", default=None, help=AGENT_HELP)
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
    image_add.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
    image_add.set_defaults(handler=run_image_add)
    image_list = image_commands.add_parser("list", help="the site's images and who holds them")
    image_list.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
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
    revoke.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
    revoke.set_defaults(handler=run_host_revoke)
    listing = host_commands.add_parser(
        "list", help="the site's hosts: alive, drained, agent version, instances"
    )
    listing.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
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
        action.add_argument("--agent", "--api", dest="api", default=None, help=AGENT_HELP)
        if name != "undrain":
            action.add_argument(
                "--timeout", type=float, default=300.0, metavar="SECONDS",
                help="how long to wait for its instances to move (default %(default)s)",
            )  # fmt: skip
        if name == "drain":
            action.add_argument("--wait", action="store_true", help="wait until it runs nothing")
        action.set_defaults(handler=HOST_ACTIONS[name])

    demo = commands.add_parser(
        "demo",
        help="start a hub and three sites, deploy an app, show where it runs (--lab: for real)",
        description="Start a central hub and three sites of agents on loopback (no root, no "
        "setup), register the sites, deploy a sample application through the hub with a "
        "placement policy, show each site's progress and where the instances run, print the "
        "dashboard's URL, and stay up until Ctrl-C. With --lab (root, `scripts/setup.sh "
        "--lab`) the same on network namespaces: mDNS discovery, WireGuard meshes, Raft, "
        "podman containers, the hub behind a WAN; everything is torn down on exit.",
    )
    demo.add_argument("--hosts", type=int, default=2, help="hosts per site (default 2)")
    demo.add_argument(
        "--lab", action="store_true",
        help="as root: run the sites on network namespaces (a LAN behind NAT each, the hub on a "
        "WAN), with mDNS, WireGuard meshes and podman containers instead of loopback processes",
    )  # fmt: skip
    demo.add_argument(
        "--dashboard", default="127.0.0.1:7980", metavar="HOST:PORT",
        help="with --lab: where this machine reaches the hub and its dashboard (default "
        "%(default)s), forwarded into the hub's namespace",
    )  # fmt: skip
    demo.add_argument(
        "--exit-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself after this many seconds once up (default: wait for Ctrl-C)",
    )

    commands.add_parser(
        "hub",
        help="run the central hub (options: `meshorch hub --help`)",
        add_help=False,
    )
    add_fleet_commands(commands)
    add_fleet_site_commands(commands)
    add_access_commands(commands)
    add_logs_command(commands)
    add_chaos_command(commands)
    add_site_commands(commands)

    try:
        from meshorch.lab.cli import add_lab_commands
    except ImportError:
        pass
    else:
        add_lab_commands(commands)
    return parser


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    # pysyncobj logs every refused connection at warning level.
    logging.getLogger("pysyncobj").setLevel(max(logging.ERROR, logging.getLogger().level))


def run_agent(args: argparse.Namespace) -> int:
    from meshorch.site.agent import Agent

    data_dir: Path = args.data_dir
    host_id = args.host_id or default_host_id()
    mesh: MeshSettings | None = None
    password: str | None = None
    if args.raft is not None:
        if args.join_token or args.bootstrap:
            raise ConfigurationError("--join-token and --bootstrap are for mesh mode, not --raft")
        password = resolve_password(data_dir, args.cluster_password_file, bool(args.peer))
    else:
        if os.geteuid() != 0:
            raise ConfigurationError(
                "mesh mode creates a WireGuard interface and needs root; "
                "for a site without WireGuard give --raft and --peer"
            )
        mesh = MeshSettings(
            lan_ip=args.lan_ip or detect_lan_ip(),
            wg_interface=args.wg_interface,
            wg_port=args.wg_port,
            raft_port=args.raft_port,
            overlay_network=args.overlay_network,
            join_token=args.join_token,
            bootstrap=args.bootstrap,
            discovery_timeout_s=args.discovery_timeout,
        )
    config = AgentConfig(
        site=args.site,
        host_id=host_id,
        data_dir=data_dir,
        api_address=args.api,
        raft_address=args.raft,
        peers=tuple(args.peer),
        password=password,
        preset=args.preset,
        durability=args.durability,
        hub=args.hub,
        fleet=args.fleet,
        fleet_key=args.fleet_key,
        enroll_token=args.enroll_token,
        socket=args.socket,
        operator_token_file=args.operator_token_file,
    )
    config.validate()
    workloads = WorkloadSettings(
        runtime=args.runtime,
        cpu_millis=int(args.cpu * 1000) if args.cpu else None,
        memory_bytes=parse_size(args.memory) if args.memory else None,
        labels=parse_labels(args.label),
        evict_at_pct=args.evict_at_pct,
    )
    network = network_settings(args)
    revoked = False
    upgrade = False

    async def serve() -> None:
        nonlocal revoked, upgrade
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Agent(config, mesh, workloads, network) as agent:
            stopped = asyncio.create_task(stop.wait())
            revoked_wait = asyncio.create_task(agent.revoked.wait())
            upgrade_wait = asyncio.create_task(agent.upgrades.restart_requested.wait())
            waits = {stopped, revoked_wait, upgrade_wait}
            await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
            for wait in waits:
                wait.cancel()
            revoked = agent.revoked.is_set()
            upgrade = agent.upgrades.restart_requested.is_set() and not stop.is_set()
            logger.info("stopping" + (" to restart on a new release" if upgrade else ""))

    try:
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            runner.run(serve())
    except ConfigurationError:
        raise
    except MeshorchError as exc:  # raised while joining or bootstrapping
        print(f"meshorch agent: {exc}", file=sys.stderr)
        return 1
    if upgrade:
        return restart_on_release(data_dir, args.api)
    return EXIT_REVOKED if revoked else 0


def restart_on_release(data_dir: Path, api: str) -> int:
    """Hand over to the upgrade launcher (meshorch.releases.launcher): it runs the release
    the agent put on trial, and the previous one again if that does not come up."""
    from meshorch.releases import launcher as upgrade_launcher

    if upgrade_launcher.supervised():
        return upgrade_launcher.EXIT_UPGRADE  # the launcher above restarts us
    logging.shutdown()
    argv = upgrade_launcher.launcher_argv(data_dir, upgrade_launcher.status_url(api))
    os.execv(argv[0], argv)


def default_host_id() -> str:
    """The hostname, lowered, with anything but a-z, 0-9 and '-' made '-'."""
    name = socket.gethostname().split(".")[0].lower()
    cleaned = "".join(c if c.isascii() and (c.isalnum() or c == "-") else "-" for c in name)
    return cleaned.strip("-")[:63] or "host"


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


def run_image_list(args: argparse.Namespace) -> int:
    body = call_agent(agent_address(args.api), "GET", "/v1/images")
    for image in body["images"]:
        holders = ", ".join(image["holders"]) or "-"
        print(f"{image['ref']:30} {image['digest'][:19]} {image['size']:>12}  on {holders}")
    return 0


def run_host_list(args: argparse.Namespace) -> int:
    hosts = call_agent(agent_address(args.api), "GET", "/v1/hosts")["hosts"]
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


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hub"]:
        # The hub sits above this package; it is imported only to run it.
        from central_hub.cli import main as hub_main

        return hub_main(argv[1:], prog="meshorch hub")
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "agent":
            return run_agent(args)
        if args.command == "demo" and args.lab:
            from meshorch.demo.lab import run_lab_demo

            return run_lab_demo(args.hosts, args.exit_after, args.dashboard)
        if args.command == "demo":
            from meshorch.demo.loopback import run_demo

            return run_demo(hosts=args.hosts, exit_after_s=args.exit_after)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
    except ConfigurationError as exc:
        print(f"meshorch: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2


def network_settings(args: argparse.Namespace) -> NetworkSettings:
    if args.dns not in ("auto", "off"):
        parse_host_port(args.dns, "--dns")
    upstream: tuple[tuple[str, int], ...] | None = None
    if args.dns_upstream is not None:
        items = [u for u in args.dns_upstream if u != "none"]
        upstream = tuple(
            parse_host_port(u if u.count(":") == 1 else f"{u}:53", "--dns-upstream") for u in items
        )
    if args.ingress_address is not None:
        try:
            ipaddress.ip_interface(args.ingress_address)
        except ValueError:
            raise ConfigurationError(
                "--ingress-address: expected a CIDR like 10.1.0.200/24, "
                f"got {args.ingress_address!r}"
            ) from None
    isolate = {"auto": None, "on": True, "off": False}[args.isolate_tenants]
    return NetworkSettings(args.dns, upstream, args.ingress_address, args.ingress_device, isolate)
