"""``meshorch lab ...``: build and drive a lab of edge sites on this machine.

``add_lab_commands`` registers the ``lab`` command on a parent parser; every subcommand
sets ``handler``, a function of the parsed args returning the exit code. Progress goes to
stderr, results (``status``) to stdout.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

import orjson

from meshorch.lab.agents import LabAgents
from meshorch.lab.errors import LabError
from meshorch.lab.lab import Lab
from meshorch.lab.plan import DEFAULT_PREFIX
from meshorch.lab.state import DEFAULT_STATE_DIR, STATE_DIR_ENV
from meshorch.lab.status import format_status

PREFIX_ENV = "MESHORCH_LAB_PREFIX"
LOG_LEVEL_ENV = "MESHORCH_LAB_LOG_LEVEL"

Handler = Callable[[argparse.Namespace], int]

_DESCRIPTION = """\
A lab of edge sites on this machine, made of network namespaces: a WAN with the hub
(172.30.0.2), and per site N a LAN 10.N.0.0/24 behind a NAT router (WAN address
172.30.0.(10+N)) with hosts sN-hM at 10.N.0.(10+M). Hosts reach the hub; the hub cannot
reach into a site. Needs root. Several labs coexist under different --prefix values.
"""

_TEMPLATE_HELP = (
    "placeholders: {site} (s1), {host} (s1-h2), {lan_ip}, {data_dir} (per host, under the "
    "state dir), {netns}, {hub_ip}, {prefix}; '{{' and '}}' for literal braces"
)


def _progress(message: str) -> None:
    print(f"lab: {message}", file=sys.stderr, flush=True)


def _lab(args: argparse.Namespace) -> Lab:
    return Lab(args.prefix, args.state_dir, progress=_progress)


def _guard(fn: Handler) -> Handler:
    """Turn lab errors into a message and exit code 1 (Ctrl-C into 130)."""

    def handler(args: argparse.Namespace) -> int:
        try:
            return fn(args)
        except LabError as exc:
            print(f"meshorch lab: error: {exc}", file=sys.stderr)
            return 1
        except KeyboardInterrupt:
            print("meshorch lab: interrupted", file=sys.stderr)
            return 130

    return handler


def _cmd_up(args: argparse.Namespace) -> int:
    if args.agents and args.agent_cmd:
        raise LabError("--agents and --agent-cmd exclude each other")
    lab = _lab(args)
    lab.up(args.sites, args.hosts, agent_cmd=args.agent_cmd, hub_cmd=args.hub_cmd)
    if args.agents:
        _progress("starting meshorch agents: the first host of each site bootstraps it")
        LabAgents(lab).start_all()
        _progress("every agent is a Raft member over the WireGuard mesh")
    return 0


def _cmd_add_host(args: argparse.Namespace) -> int:
    lab = _lab(args)
    host = lab.add_host(args.site)
    agents = LabAgents(lab)
    if agents.enabled:
        agents.join(host.name)
    print(host.name)
    return 0


def _cmd_kill(args: argparse.Namespace) -> int:
    _lab(args).kill(args.node)
    return 0


def _cmd_restart(args: argparse.Namespace) -> int:
    _lab(args).restart(args.node)
    return 0


def _cmd_partition(args: argparse.Namespace) -> int:
    _lab(args).partition(args.a, args.b)
    return 0


def _cmd_heal(args: argparse.Namespace) -> int:
    if (args.a is None) != (args.b is None):
        print("meshorch lab: error: heal takes two endpoints or none", file=sys.stderr)
        return 2
    _lab(args).heal(args.a, args.b)
    return 0


def _cmd_exec(args: argparse.Namespace) -> int:
    argv: list[str] = list(args.cmd)
    if "--" in argv:
        # REMAINDER swallows options given after NODE; take them back up to the "--".
        cut = argv.index("--")
        if cut:
            _common_parser().parse_args(argv[:cut], namespace=args)
        argv = argv[cut + 1 :]
    if not argv:
        print("meshorch lab: error: exec needs a command after '--'", file=sys.stderr)
        return 2
    return _lab(args).exec(args.node, argv)


def _interrupt(_signum: int, _frame: object) -> None:
    raise KeyboardInterrupt


def _cmd_registry(args: argparse.Namespace) -> int:
    from meshorch.lab.registry import LabRegistry  # only this command needs it

    lab = _lab(args)
    plan = lab.plan
    password = sys.stdin.readline().rstrip("\n")
    if not password:
        print("meshorch lab: error: registry needs the password on stdin", file=sys.stderr)
        return 2
    work = lab.store.lab_dir / "registry"
    registry = LabRegistry.on_wan(plan, work, {args.user: password}, args.port)
    registry.start()
    # Stopped like an interrupt, so the registry process goes with this one.
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        print(f"registry {registry.host} (user {args.user}, log {registry.log_path}); "
              "sites pull through their routers; Ctrl-C stops it", flush=True)  # fmt: skip
        while registry.running():
            time.sleep(0.5)
        print(f"meshorch lab: error: the registry stopped; see {registry.log_path}",
              file=sys.stderr)  # fmt: skip
        return 1
    finally:
        registry.stop()


def _cmd_status(args: argparse.Namespace) -> int:
    status = _lab(args).status()
    if args.json:
        sys.stdout.write(orjson.dumps(status.to_json(), option=orjson.OPT_INDENT_2).decode())
        sys.stdout.write("\n")
    else:
        print(format_status(status))
    return 0


def _cmd_down(args: argparse.Namespace) -> int:
    lab = _lab(args)
    if lab.exists():
        agents = LabAgents(lab)
        if agents.enabled:
            _progress("removing the hosts' containers and podman storage")
            agents.teardown()
    lab.down(keep_logs=args.keep_logs)
    return 0


def _common_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--prefix",
        default=os.environ.get(PREFIX_ENV, DEFAULT_PREFIX),
        help=f"the lab's name: starts every namespace and interface name; 1-6 chars "
        f"(default ${PREFIX_ENV}, else {DEFAULT_PREFIX!r})",
    )
    common.add_argument(
        "--state-dir",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"where the state file PREFIX.json, logs and data dirs live "
        f"(default ${STATE_DIR_ENV}, else {DEFAULT_STATE_DIR})",
    )
    return common


def add_lab_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register ``lab`` and its subcommands on ``subparsers``."""
    lab = subparsers.add_parser(
        "lab",
        help="build and drive a lab of edge sites in network namespaces (root)",
        description=_DESCRIPTION,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = lab.add_subparsers(dest="lab_command", required=True, metavar="SUBCOMMAND")
    common = _common_parser()

    def add(
        name: str, handler: Handler, help_: str, epilog: str | None = None
    ) -> argparse.ArgumentParser:
        parser = sub.add_parser(
            name,
            parents=[common],
            help=help_,
            description=help_[0].upper() + help_[1:] + ".",
            epilog=epilog,
        )
        parser.set_defaults(handler=_guard(handler))
        return parser

    up = add(
        "up",
        _cmd_up,
        "create the WAN, the hub, and the sites with their routers and hosts",
        epilog="Example: lab up --sites 2 --hosts 3 --agent-cmd "
        "'meshorch agent --site {site} --host-id {host} --data-dir {data_dir} ...'",
    )
    up.add_argument("--sites", type=int, required=True, metavar="N", help="number of sites")
    up.add_argument("--hosts", type=int, required=True, metavar="M", help="hosts per site")
    up.add_argument(
        "--agents",
        action="store_true",
        help="run meshorch agents in mesh mode: each site's first host bootstraps it, the "
        "others join by mDNS with a token (and so do hosts added later)",
    )
    up.add_argument(
        "--agent-cmd",
        metavar="TEMPLATE",
        help="command to start on every host, output to a log under the state dir "
        f"(default: none, pure topology); {_TEMPLATE_HELP}",
    )
    up.add_argument(
        "--hub-cmd",
        metavar="TEMPLATE",
        help="command to start in the hub's namespace (default: none); same placeholders, "
        "{host} is 'hub' and {lan_ip} the hub's WAN address",
    )

    add_host = add("add-host", _cmd_add_host, "add one host to a site (and start its agent)")
    add_host.add_argument("site", help="site name, e.g. s1")

    kill = add("kill", _cmd_kill, "SIGKILL the process of a host (or the hub) and its children")
    kill.add_argument("node", help="host name, e.g. s1-h2, or 'hub'")

    restart = add("restart", _cmd_restart, "kill a host's process if alive and start it again")
    restart.add_argument("node", help="host name, e.g. s1-h2, or 'hub'")

    partition = add(
        "partition",
        _cmd_partition,
        "drop all traffic between A and B, both ways",
        epilog="A and B are 'hub', a site (s1) or a host (s1-h2). Hosts of different sites "
        "only see each other's site NAT address, so partitioning them also cuts each from "
        "the other site's public address.",
    )
    partition.add_argument("a", metavar="A")
    partition.add_argument("b", metavar="B")

    heal = add("heal", _cmd_heal, "remove all partitions, or only the one between A and B")
    heal.add_argument("a", metavar="A", nargs="?")
    heal.add_argument("b", metavar="B", nargs="?")

    exec_ = add(
        "exec",
        _cmd_exec,
        "run a command in a node's namespace; exits with its exit code",
        epilog="Nodes: hosts (s1-h2), routers (s1-r), 'hub'. Example: lab exec s1-h1 -- ip addr",
    )
    exec_.add_argument("node", help="s1-h2, s1-r or hub")
    exec_.add_argument("cmd", nargs=argparse.REMAINDER, metavar="-- CMD ...")

    registry = add(
        "registry",
        _cmd_registry,
        "run a real OCI registry (Debian's docker-registry) on the WAN beside the hub",
        epilog="The registry listens on the hub's WAN address, plain HTTP, with one "
        "htpasswd user (the password read from stdin), storage under the lab's state dir; "
        "it runs until Ctrl-C. Push with podman from the hub's namespace, e.g.: "
        "lab exec hub -- podman push --tls-verify=false --creds USER:PW IMAGE "
        "HUB_IP:5000/NAME:TAG; sites pull with 'meshorch image pull --plain-http'.",
    )
    registry.add_argument("--user", default="lab", help="the registry user (default: lab)")
    registry.add_argument("--port", type=int, default=5000, help="its port (default: 5000)")

    status = add("status", _cmd_status, "show topology, processes (alive/dead) and partitions")
    status.add_argument("--json", action="store_true", help="machine-readable output")

    down = add(
        "down",
        _cmd_down,
        "kill the lab's processes and delete its namespaces, links, rules and state",
        epilog="Works after a crashed or half-built 'up' too: finds namespaces by prefix.",
    )
    down.add_argument(
        "--keep-logs", action="store_true", help="keep the logs and data dirs of the hosts"
    )


def main(argv: list[str] | None = None) -> int:
    """``python -m meshorch.lab ...``: the ``lab`` command on its own.

    Logging goes to stderr at the level in ``$MESHORCH_LAB_LOG_LEVEL`` (default warning).
    """
    import logging

    level = os.environ.get(LOG_LEVEL_ENV, "warning").upper()
    logging.basicConfig(
        level=getattr(logging, level, logging.WARNING),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    parser = argparse.ArgumentParser(prog="meshorch", add_help=False)
    add_lab_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["lab", *(sys.argv[1:] if argv is None else argv)])
    handler: Handler = args.handler
    return handler(args)
