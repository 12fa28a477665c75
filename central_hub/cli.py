"""``python -m central_hub``: run the central hub (the only place that configures logging)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import uvloop

from central_hub.config import DAY_S, HubConfig
from central_hub.deltaformat import Mode, parse_mode
from central_hub.errors import HubConfigError
from central_hub.keyfiles import (
    KEK_ENV,
    Kek,
    default_kek_path,
    kek_from_env,
    new_kek_file,
    read_kek_file,
)
from central_hub.logs import parse_duration
from central_hub.replica import HubReplica, ReplicaConfig, parse_peer
from central_hub.service import Hub
from central_hub.tls import load as load_tls
from central_hub.tls import make_self_signed
from meshorch.errors import ConfigurationError
from meshorch.sizes import parse_size

logger = logging.getLogger(__name__)

EPILOG = """\
examples:
  first start: creates the data dir, the fleet root key and an admin token
    meshorch hub --data-dir /var/lib/meshorch-hub --listen 0.0.0.0:7900 --fleet acme
  then, with the printed admin token:
    TOKEN=$(cat /var/lib/meshorch-hub/admin.token)
    CA=/var/lib/meshorch-hub/tls.crt   # the self-signed certificate (HUB: a name in it)
    curl --cacert $CA -H "Authorization: Bearer $TOKEN" \\
      -d '{"id": "shop-1", "labels": {"region": "eu"}}' https://HUB:7900/v1/sites
    curl --cacert $CA -H "Authorization: Bearer $TOKEN" \\
      -d '{"spec": "...app spec YAML...", "placement": {"match": {"region": "eu"}}}' \\
      https://HUB:7900/v1/apps
  the API is described at https://HUB:7900/v1/openapi.json

Key files are sealed with a key-encryption key (--kek-file, $MESHORCH_HUB_KEK):
    meshorch hub new-kek /etc/meshorch/hub.kek
    meshorch hub --data-dir /var/lib/meshorch-hub --kek-file /etc/meshorch/hub.kek ...
    meshorch hub rotate-kek --data-dir /var/lib/meshorch-hub \\
      --old /etc/meshorch/hub.kek --new /etc/meshorch/hub-2.kek   (hub stopped)

The API is served over TLS: with --tls-cert/--tls-key, or a self-signed certificate made
at the first start in the data dir (tls.crt, tls.key) whose SHA-256 fingerprint is printed
at every start: sites pin it (agent flag --hub-fingerprint), the CLI pins it on first use
(~/.config/meshorch/known_hubs). Plain HTTP only with --insecure-http.

Sites are told the fleet name, the root public key and the TLS fingerprint printed at
start, out of band (agent flags --hub URL --fleet NAME --fleet-key HEX --hub-fingerprint
HEX); see docs/fleet-link.md.
"""


def build_parser(prog: str = "python -m central_hub") -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Run the meshorch central hub: operators declare applications and "
        "placement over HTTP; the hub issues signed deltas that sites fetch over their own "
        "outbound link. The hub never connects to sites.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG,
    )
    parser.add_argument(
        "--data-dir", required=True, type=Path, help="state directory (created 0700)"
    )
    parser.add_argument(
        "--listen",
        default="127.0.0.1:7900",
        metavar="HOST:PORT",
        help="HTTP address (default %(default)s; port 0 picks a free port)",
    )
    parser.add_argument(
        "--fleet",
        default=None,
        help="fleet name, fixed at the first start (default 'fleet'); a later start with "
        "another name is refused",
    )
    parser.add_argument(
        "--delta-ttl",
        type=float,
        default=7 * DAY_S,
        metavar="SECONDS",
        help="lifetime of each delta (default %(default)s)",
    )
    parser.add_argument(
        "--delta-keep",
        default="100000",
        metavar="N|none",
        help="compact the delta log below what every enrolled site applied, or to its last "
        "N deltas; sites further behind catch up by signed snapshot (default %(default)s; "
        "'none' keeps every delta)",
    )
    parser.add_argument(
        "--compact-every",
        type=float,
        default=60.0,
        metavar="SECONDS",
        help="how often the delta log's compaction is considered (default %(default)s)",
    )
    parser.add_argument(
        "--delta-format",
        default="auto",
        metavar="auto|1|2",
        help="format of the deltas issued: 2 sends each site only the operations of the "
        "deltas for it (per-site views), 1 sends every site everything; auto issues 2 once "
        "every host of every registered site runs an agent that reads it (default "
        "%(default)s; docs/fleet-link.md)",
    )
    parser.add_argument(
        "--wave-timeout",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="fail a rollout when a wave is not healthy this long after it started "
        "(default %(default)s)",
    )
    parser.add_argument(
        "--site-stale",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="a site whose last report is older is unreachable (default %(default)s)",
    )
    parser.add_argument(
        "--gossip",
        default=None,
        metavar="HOST:PORT",
        help="UDP address of the hub's gossip member (default: the --listen host and port "
        "number; UDP and TCP ports are separate)",
    )
    parser.add_argument(
        "--gossip-advertise",
        default=None,
        metavar="HOST:PORT",
        help="the gossip address sites are told (default: the --gossip address; with a "
        "wildcard host, sites use the host of their hub URL)",
    )
    parser.add_argument(
        "--gossip-preset",
        default="wan",
        choices=["wan", "lan", "local"],
        help="gossip timers, handed to the sites (default %(default)s)",
    )
    parser.add_argument(
        "--no-gossip",
        action="store_true",
        help="no gossip member: sites are seen through their own link only",
    )
    parser.add_argument(
        "--logs-max-age",
        default="30d",
        metavar="DURATION",
        help="drop fleet logs older than this: seconds or 90s, 12h, 7d, 'none' to keep them "
        "at any age (default %(default)s)",
    )
    parser.add_argument(
        "--logs-max-bytes",
        default="none",
        metavar="SIZE",
        help="drop the oldest fleet logs while the hub's log store is larger: bytes or "
        "500MiB, 50GiB, 1TB (default %(default)s: no limit)",
    )
    add_kek_flags(parser)
    add_tls_flags(parser)
    replicas = parser.add_argument_group(
        "replicated hub",
        "run this hub as one of 3 or 5 replicas sharing their state through Raft; any "
        "replica serves the API and the site link (README: 'A replicated hub')",
    )
    replicas.add_argument(
        "--raft",
        default=None,
        metavar="HOST:PORT",
        help="this replica's Raft address (one of the --peer addresses)",
    )
    replicas.add_argument(
        "--peer",
        action="append",
        default=[],
        metavar="RAFT_HOST:PORT=URL",
        help="a replica's Raft address and the URL it serves on; give one for every "
        "replica, this one included",
    )
    replicas.add_argument(
        "--durability",
        default="power",
        choices=["power", "process"],
        help="the replicas' Raft journal: fsync'd before a write is acknowledged (power, "
        "the default) or not (process)",
    )
    parser.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    return parser


def add_tls_flags(parser: argparse.ArgumentParser) -> None:
    tls = parser.add_argument_group(
        "TLS",
        "the API is served over TLS: the operator's certificate, or a self-signed one made "
        "at the first start in the data dir (its fingerprint is printed at every start, "
        "for sites to pin)",
    )
    tls.add_argument("--tls-cert", type=Path, metavar="PEM", help="certificate (chain) file")
    tls.add_argument("--tls-key", type=Path, metavar="PEM", help="its private key file")
    tls.add_argument(
        "--insecure-http",
        action="store_true",
        help="serve plain HTTP: tokens and enrollment tokens cross the network in clear "
        "(behind a TLS terminator, or tests)",
    )
    tls.add_argument(
        "--no-legacy-link-signatures",
        action="store_true",
        help="refuse site requests signed without a nonce (agents older than this hub) on "
        "every route; by default they are accepted on the link's GET routes only, so "
        "old agents can still fetch deltas and the agent release that upgrades them",
    )


def add_kek_flags(parser: argparse.ArgumentParser) -> None:
    kek = parser.add_argument_group(
        "key-encryption key",
        "the key files in the data dir are sealed with a KEK: 32 random bytes, hex or "
        f"base64 (`meshorch hub new-kek PATH` makes one), from --kek-file or ${KEK_ENV}. "
        "With neither, the hub uses DATA_DIR.kek next to the data dir, created at the "
        "first start with a warning (keep it out of the data dir's backups)",
    )
    kek.add_argument("--kek-file", type=Path, metavar="PATH", help="the KEK's file")
    kek.add_argument(
        "--insecure-no-kek",
        action="store_true",
        help="keep the key files in plain text (tests only; a sealed data dir is refused)",
    )


def kek_from_args(args: argparse.Namespace) -> Kek | None:
    """The KEK given (file, environment), or the default file (created if missing);
    None with --insecure-no-kek."""
    env = kek_from_env()
    given = [args.kek_file is not None, env is not None, args.insecure_no_kek]
    if sum(given) > 1:
        raise HubConfigError(f"give one of --kek-file, ${KEK_ENV} and --insecure-no-kek")
    if args.insecure_no_kek:
        logger.warning("--insecure-no-kek: the key files of %s are plain text", args.data_dir)
        return None
    if env is not None:
        return env
    if args.kek_file is not None:
        return read_kek_file(args.kek_file)
    path = default_kek_path(args.data_dir)
    if path.exists():
        kek = read_kek_file(path)
    else:
        kek = new_kek_file(path)
        logger.warning("created a KEK file %s", path)
    logger.warning(
        "NO KEK GIVEN: the key files of %s are sealed with the KEK file %s beside it; "
        "anyone with both has every key of the fleet. Move the KEK off this disk and give "
        "--kek-file PATH or $%s (docs: README, 'Keys at rest')",
        args.data_dir, path, KEK_ENV,
    )  # fmt: skip
    return kek


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise HubConfigError(f"{flag} {text!r} is not HOST:PORT")
    return host, int(port)


def parse_age(text: str, flag: str = "--logs-max-age") -> float | None:
    """Seconds, or a duration like the logs API's ``since`` (``90s``, ``12h``, ``7d``);
    ``none`` for no limit."""
    if text.lower() == "none":
        return None
    try:
        value: float | None = float(text)
    except ValueError:
        value = parse_duration(text)
    if value is None or not 0 < value < float("inf"):
        raise HubConfigError(f"{flag} {text!r} is not a duration like 3600, 12h, 7d or none")
    return value


def parse_keep(text: str) -> int | None:
    """``--delta-keep``: a number of deltas >= 0, or ``none``."""
    if text.lower() == "none":
        return None
    if not text.isdigit():
        raise HubConfigError(f"--delta-keep {text!r} is a number of deltas or none")
    return int(text)


def parse_format(text: str) -> Mode:
    """``--delta-format``: auto, 1 or 2."""
    try:
        return parse_mode(text)
    except ValueError as exc:
        raise HubConfigError(f"--delta-format {text!r}: {exc}") from None


def parse_bytes(text: str, flag: str = "--logs-max-bytes") -> int | None:
    """Bytes, or a size like ``500MiB``, ``50GiB``, ``50Gi``, ``1TB``; ``none`` for no limit."""
    if text.lower() == "none":
        return None
    try:
        value = parse_size(text)
    except ConfigurationError:
        value = 0
    if value < 1:
        raise HubConfigError(f"{flag} {text!r} is not a size like 500MiB, 50GiB or none")
    return value


def configure_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level.upper()),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )


def config_from_args(args: argparse.Namespace) -> HubConfig:
    host, port = parse_listen(args.listen)
    gossip_host, gossip_port = (
        (None, None) if args.gossip is None else parse_listen(args.gossip, "--gossip")
    )
    advertise = (
        None
        if args.gossip_advertise is None
        else parse_listen(args.gossip_advertise, "--gossip-advertise")
    )
    config = HubConfig(
        data_dir=args.data_dir,
        host=host,
        port=port,
        fleet=args.fleet,
        delta_ttl_s=args.delta_ttl,
        delta_keep=parse_keep(args.delta_keep),
        compact_every_s=args.compact_every,
        delta_format=parse_format(args.delta_format),
        wave_timeout_s=args.wave_timeout,
        site_stale_s=args.site_stale,
        gossip=not args.no_gossip,
        gossip_host=gossip_host,
        gossip_port=gossip_port,
        gossip_advertise=advertise,
        gossip_preset=args.gossip_preset,
        logs_max_age_s=parse_age(args.logs_max_age),
        logs_max_bytes=parse_bytes(args.logs_max_bytes),
        tls_cert=args.tls_cert,
        tls_key=args.tls_key,
        insecure_http=args.insecure_http,
        legacy_link_signatures=not args.no_legacy_link_signatures,
        kek=kek_from_args(args),
    )
    config.validate()
    return config


def new_cert_main(argv: Sequence[str], prog: str) -> int:
    """``new-cert``: one self-signed certificate for the replicas of a replicated hub."""
    parser = argparse.ArgumentParser(
        prog=f"{prog} new-cert",
        description="Make a self-signed TLS certificate and key for a hub's replicas: "
        "copy both to every replica and give them with --tls-cert/--tls-key; sites and the "
        "CLI pin its fingerprint (printed). Refuses to overwrite.",
    )
    parser.add_argument("--cert", type=Path, required=True, help="certificate file to write")
    parser.add_argument("--key", type=Path, required=True, help="key file to write (0600)")
    parser.add_argument(
        "--host",
        action="append",
        required=True,
        metavar="NAME|ADDRESS",
        help="a name or address the replicas are reached at (repeat for each)",
    )
    args = parser.parse_args(argv)
    for path in (args.cert, args.key):
        if path.exists():
            print(f"{prog} new-cert: {path} exists; not overwritten", file=sys.stderr)
            return 2
    make_self_signed(args.cert, args.key, args.host)
    tls = load_tls(args.cert.parent, args.cert, args.key, args.host[0])
    print(f"tls fingerprint: {tls.fingerprint}")
    return 0


def replica_from_args(args: argparse.Namespace) -> ReplicaConfig | None:
    if args.raft is None and not args.peer:
        return None
    if args.raft is None or not args.peer:
        raise HubConfigError("a replica needs --raft and a --peer for every replica")
    if args.kek_file is None and kek_from_env() is None:
        raise HubConfigError(
            "a replicated hub needs the same KEK on every replica (--kek-file or "
            f"${KEK_ENV}): it seals the keys the replicas share"
        )
    replica = ReplicaConfig(
        args.raft, dict(parse_peer(text) for text in args.peer), args.durability
    )
    replica.validate()
    return replica


async def serve_replica(config: HubConfig, replica: ReplicaConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with HubReplica(config, replica) as running:
        print(f"listen: {running.url}", flush=True)
        if running.tls is not None:
            print(f"tls fingerprint: {running.tls.fingerprint}", flush=True)
        print(f"raft: {replica.raft_address}", flush=True)
        await stop.wait()
        logger.info("stopping")


async def serve(config: HubConfig) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with Hub(config) as hub:
        print(f"listen: {hub.url}", flush=True)
        if hub.tls_fingerprint is not None:
            print(f"tls fingerprint: {hub.tls_fingerprint}", flush=True)
        else:
            logger.warning("--insecure-http: the API is plain HTTP, tokens travel in clear")
        if hub.gossip is not None:
            print(f"gossip: udp {hub.gossip.address}", flush=True)
        print(f"fleet: {hub.fleet}", flush=True)
        print(f"root key: {hub.root_key}", flush=True)
        print(f"admin token: {hub.admin_token_path}", flush=True)
        await stop.wait()
        logger.info("stopping")


def main(argv: Sequence[str] | None = None, prog: str = "python -m central_hub") -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["new-cert"]:
        return new_cert_main(argv[1:], prog)
    if argv[:1] in (["rotate-kek"], ["new-kek"]):
        from central_hub.kek_cli import main as kek_main

        return kek_main(argv, prog)
    args = build_parser(prog).parse_args(argv)
    configure_logging(args.log_level)
    try:
        replica = replica_from_args(args)  # first: it refuses a replica without a KEK
        config = config_from_args(args)
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            if replica is None:
                runner.run(serve(config))
            else:
                runner.run(serve_replica(config, replica))
    except HubConfigError as exc:
        print(f"central_hub: {exc}", file=sys.stderr)
        return 2
    return 0
