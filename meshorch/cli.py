"""The ``meshorch`` command line. The only place that configures logging."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from meshorch import __version__
from meshorch.agent_config import PASSWORD_ENV, AgentConfig, resolve_password
from meshorch.errors import ConfigurationError

logger = logging.getLogger("meshorch")


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
        epilog="Example: meshorch agent --site shop1 --host-id h1 --data-dir /var/lib/meshorch "
        "--api 0.0.0.0:7700 --raft 10.0.0.11:7800 --peer 10.0.0.12:7800 --peer 10.0.0.13:7800",
    )
    agent.add_argument("--site", required=True, help="site name (a-z, 0-9, '-')")
    agent.add_argument("--host-id", required=True, help="this host's id, unique in the site")
    agent.add_argument("--data-dir", required=True, type=Path, help="state directory")
    agent.add_argument("--api", required=True, metavar="HOST:PORT", help="HTTP API address")
    agent.add_argument("--raft", required=True, metavar="HOST:PORT", help="Raft address")
    agent.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="Raft address of another initial member (repeat for each)",
    )
    agent.add_argument(
        "--cluster-password-file",
        type=Path,
        help=f"file with the site's Raft password (else ${PASSWORD_ENV}, else the copy in "
        "the data dir; a lone first host generates one)",
    )
    agent.add_argument(
        "--preset",
        choices=["lan", "local"],
        default="lan",
        help="timeouts: 'lan' for real hosts, 'local' for fast elections on loopback",
    )

    demo = commands.add_parser(
        "demo",
        help="start a 3-host site on loopback and show it working",
        description="Start a site of agents on loopback (no root, no setup), write and read "
        "a key through Raft, show the status, and stay up until Ctrl-C.",
    )
    demo.add_argument("--hosts", type=int, default=3, help="number of hosts (default 3)")
    demo.add_argument(
        "--exit-after",
        type=float,
        default=None,
        metavar="SECONDS",
        help="stop by itself after this many seconds once up (default: wait for Ctrl-C)",
    )

    try:
        from meshorch.lab.cli import add_lab_commands  # type: ignore[import-not-found,unused-ignore]
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
    from meshorch.agent import Agent

    data_dir: Path = args.data_dir
    password = resolve_password(data_dir, args.cluster_password_file, bool(args.peer))
    config = AgentConfig(
        site=args.site,
        host_id=args.host_id,
        data_dir=data_dir,
        api_address=args.api,
        raft_address=args.raft,
        peers=tuple(args.peer),
        password=password,
        preset=args.preset,
    )
    config.validate()

    async def serve() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        async with Agent(config):
            await stop.wait()
            logger.info("stopping")

    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(serve())
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    configure_logging(args.log_level)
    try:
        if args.command == "agent":
            return run_agent(args)
        if args.command == "demo":
            from meshorch.demo import run_demo

            return run_demo(hosts=args.hosts, exit_after_s=args.exit_after)
        handler = getattr(args, "handler", None)
        if handler is not None:
            return int(handler(args))
    except ConfigurationError as exc:
        print(f"meshorch: {exc}", file=sys.stderr)
        return 2
    parser.error(f"unknown command {args.command}")
    return 2
