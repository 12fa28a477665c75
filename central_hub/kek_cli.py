"""``meshorch hub new-kek`` and ``meshorch hub rotate-kek``: the key-encryption key of the
hub's key files (``central_hub.keyfiles``). ``rotate-kek`` runs offline: it takes the data
dir's lock, so it refuses while a hub serves the directory."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from central_hub.errors import HubConfigError
from central_hub.keyfiles import (
    KEK_ENV,
    Kek,
    default_kek_path,
    kek_from_env,
    new_kek_file,
    read_kek_file,
    rotate,
)
from meshorch.dirlock import hold
from meshorch.errors import ConfigurationError


def build_parser(prog: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog, description="the hub's key-encryption key")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    new = commands.add_parser(
        "new-kek",
        help="write a new random KEK (hex) to a file, mode 0600",
        description="Write a new random KEK to PATH (never overwritten). Keep it off the "
        "hub's data dir and its backups.",
    )
    new.add_argument("path", type=Path, metavar="PATH")
    rot = commands.add_parser(
        "rotate-kek",
        help="re-seal the hub's key files with a new KEK (the hub must be stopped)",
        description="Re-seal every key file of the data dir with the KEK of --new, opening "
        "them with the KEK of --old (plain-text files need none). Crash-safe: rerun with "
        "the same flags after an interruption, or start the hub with the new KEK. Refused "
        "while a hub runs on the data dir.",
    )
    rot.add_argument("--data-dir", required=True, type=Path)
    rot.add_argument(
        "--old",
        type=Path,
        metavar="PATH",
        help=f"the current KEK's file (default: ${KEK_ENV}, else DATA_DIR.kek if it exists)",
    )
    rot.add_argument("--new", required=True, type=Path, metavar="PATH", help="the new KEK's file")
    return parser


def _old_kek(args: argparse.Namespace) -> Kek | None:
    if args.old is not None:
        return read_kek_file(args.old)
    env = kek_from_env()
    if env is not None:
        return env
    default = default_kek_path(args.data_dir)
    return read_kek_file(default) if default.exists() else None


def run(args: argparse.Namespace) -> str:
    if args.command == "new-kek":
        kek = new_kek_file(args.path)
        return f"new KEK {kek.id} in {args.path}"
    data_dir: Path = args.data_dir
    if not data_dir.is_dir():
        raise HubConfigError(f"{data_dir} is not a directory")
    old, new = _old_kek(args), read_kek_file(args.new)
    try:
        lock = hold(data_dir, "meshorch hub rotate-kek")
    except ConfigurationError as exc:
        raise HubConfigError(str(exc)) from None
    with lock:
        files = rotate(data_dir, old, new)
    names = ", ".join(p.name for p in files) or "no key files"
    return f"re-sealed with KEK {new.id}: {names}"


def main(argv: Sequence[str], prog: str) -> int:
    args = build_parser(prog).parse_args(argv)
    try:
        print(run(args), flush=True)
    except HubConfigError as exc:
        print(f"{prog} {args.command}: {exc}", file=sys.stderr)
        return 2
    return 0
