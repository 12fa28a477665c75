"""The ``meshorch`` command line. The only place that configures logging.

Its size: the parser and the agent command; the other commands live in modules beside it
(``agent_ops``: token, app, image, host; the hub's, the fleet's, the secrets' and the access
tokens' commands), imported only when a command other than the agent is parsed, so that an
agent process loads none of them.
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
from collections.abc import Sequence
from pathlib import Path

import uvloop

from meshorch import __version__
from meshorch.apps.settings import RUNTIMES, WorkloadSettings, parse_labels
from meshorch.errors import ConfigurationError, MeshorchError
from meshorch.join.mesh import (
    DEFAULT_OVERLAY_NETWORK,
    DEFAULT_RAFT_PORT,
    DEFAULT_WG_PORT,
    MeshSettings,
    detect_lan_ip,
)
from meshorch.net.app_network import NetworkSettings, parse_host_port
from meshorch.site.config import PASSWORD_ENV, AgentConfig, lock_data_dir, resolve_password
from meshorch.sizes import parse_size

logger = logging.getLogger("meshorch")

EXIT_REVOKED = 3

# A file the agent writes its imported modules to, once serving and again on SIGUSR1: the
# test that an agent loads only what its configuration uses reads it.
DEBUG_MODULES_ENV = "MESHORCH_DEBUG_MODULES"


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``command="agent"``, of the agent command alone."""
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
        "--plain-http-registry", action="append", default=[], metavar="HOST[:PORT]",
        help="a registry the site pulls images from over plain HTTP instead of HTTPS "
        "(a lab or a LAN; repeat for several)",
    )  # fmt: skip
    work.add_argument(
        "--evict-at-pct", type=float, default=95.0, metavar="PCT",
        help="disk or memory use at which this host moves its lowest-priority instances "
        "elsewhere, one every few seconds, and gives up its copies of images it does "
        "not need, unused ones first (default %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--image-grace", type=float, default=3600.0, metavar="SECONDS",
        help="how long an image no application names stays at the site before it is "
        "removed, unless pinned (meshorch image pull --pin) (default %(default)s)",
    )  # fmt: skip
    work.add_argument(
        "--image-store-max", metavar="SIZE",
        help="the most this host's image store may hold, e.g. 20Gi; over it, the host gives "
        "up its copies of images it does not need, unused ones first (default: no limit)",
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
    fleet.add_argument(
        "--hub",
        metavar="URL",
        help="the hub's URL, e.g. https://hub:7900; a replicated hub's URLs, comma-separated "
        "(the link moves to the next one when a replica fails)",
    )
    fleet.add_argument("--fleet", metavar="NAME", help="the fleet this site belongs to")
    fleet.add_argument(
        "--fleet-key", metavar="HEX", help="the fleet root public key (from `meshorch hub`)"
    )
    fleet.add_argument(
        "--enroll-token", metavar="TOKEN", help="single-use token binding the site key at the hub"
    )
    fleet.add_argument(
        "--hub-fingerprint", metavar="SHA256",
        help="pin the hub's TLS certificate: its SHA-256 fingerprint (printed by `meshorch "
        "hub` at start); every connection to the hub checks it",
    )  # fmt: skip
    fleet.add_argument(
        "--hub-ca", type=Path, metavar="PEM",
        help="or the CA certificate that signed the hub's (default: the system's CAs)",
    )  # fmt: skip
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
    if command == "agent":
        return parser
    add_operator_commands(commands)
    return parser


def add_operator_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Every command but the agent. Their modules are imported here, not at the top, so that
    an agent process never loads them: the clients, the lab, the chaos suite."""
    from meshorch.chaos.cli import add_chaos_command
    from meshorch.cli.access import add_access_commands
    from meshorch.cli.agent_ops import add_agent_ops_commands
    from meshorch.cli.deltas import add_deltas_commands
    from meshorch.cli.fleet import add_fleet_commands
    from meshorch.cli.fleetkey import add_fleet_site_commands
    from meshorch.cli.logs import add_logs_command
    from meshorch.cli.secrets import add_site_commands

    add_agent_ops_commands(commands)
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
    add_deltas_commands(commands)
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
    if args.raft is not None and (args.join_token or args.bootstrap):
        raise ConfigurationError("--join-token and --bootstrap are for mesh mode, not --raft")
    # Held until the process ends (or execs the upgrade launcher), taken before anything
    # in the data dir is read or written: DataDirBusy if another agent runs on it.
    data_dir_lock = lock_data_dir(data_dir)
    if args.raft is not None:
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
        hub_fingerprint=args.hub_fingerprint,
        hub_ca=args.hub_ca,
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
        plain_http_registries=tuple(args.plain_http_registry),
        image_grace_s=args.image_grace,
        image_store_max_bytes=parse_size(args.image_store_max) if args.image_store_max else None,
    )
    workloads.validate()
    network = network_settings(args)
    revoked = False
    upgrade = False

    async def serve() -> None:
        nonlocal revoked, upgrade
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Agent(config, mesh, workloads, network, data_dir_lock) as agent:
            modules_file = os.environ.get(DEBUG_MODULES_ENV)
            if modules_file:
                write_modules(Path(modules_file))
                loop.add_signal_handler(signal.SIGUSR1, write_modules, Path(modules_file))
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


def write_modules(path: Path) -> None:
    """The names of the modules this process has imported, one a line (``DEBUG_MODULES_ENV``)."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(f"{name}\n" for name in sorted(sys.modules)))
    temporary.replace(path)  # a reader never sees half a list


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


def command_word(argv: Sequence[str]) -> str | None:
    """The command ``argv`` names: its first word after the global options."""
    words = iter(argv)
    for word in words:
        if word == "--log-level":
            next(words, None)  # its value
        elif not word.startswith("-"):
            return word
    return None


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["hub"]:
        # The hub sits above this package; it is imported only to run it.
        from central_hub.cli import main as hub_main

        return hub_main(argv[1:], prog="meshorch hub")
    parser = build_parser(command_word(argv))
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
