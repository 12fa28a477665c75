"""``meshorch deltas export`` and ``meshorch deltas verify``: the delta log, checked offline.

    meshorch deltas export [--since V] [--site SITE] > log.jsonl   from the hub
    meshorch deltas verify log.jsonl --root-key HEX [--at TIME]    no hub, no network
    meshorch site diff SITE                 what the site does when it applies the rest
    meshorch site hold|release SITE         it applies nothing meanwhile

The export is one signed envelope a line, as sites receive them (``--site``: as that site
does); ``meshorch fleet export`` writes a site's own record in the same form, so the two
can be compared line for line. ``verify`` is ``meshorch.fleet.verify_log`` on a file.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote, urlencode

import orjson

from meshorch.cli.fleet import HUB_ENV, TOKEN_ENV, hub_call
from meshorch.errors import ConfigurationError
from meshorch.fleet.delta import MAX_DELTA_BYTES, is_hex, parse_key_id
from meshorch.fleet.verify_log import LogReport, target_text, verify_log

EXIT_INVALID = 1
EXPORT_PAGE = 500


def add_deltas_commands(commands: Any) -> None:
    parser = commands.add_parser(
        "deltas",
        help="the fleet's delta log: export it, verify an export offline",
        description="Export the hub's signed delta log, or check an export (from the hub or "
        "from a site, `meshorch fleet export`) with no hub and no network.",
    )
    actions = parser.add_subparsers(dest="deltas_command", required=True, metavar="ACTION")
    export = actions.add_parser(
        "export",
        help="write the signed delta envelopes, one a line (JSON Lines)",
        description="Write the hub's delta envelopes after --since, one a line, exactly as "
        "the hub signed them (or as --site receives them). A fleet-wide token is needed "
        "(any role). Once the hub compacted its log into a snapshot, an export starts "
        "after the snapshot's version (the hub says which).",
        epilog="example:\n  meshorch deltas export --hub http://hub:7900 > log.jsonl\n"
        "  meshorch deltas verify log.jsonl --root-key $(curl -s hub:7900/v1/fleet | jq -r "
        ".root_key)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    export.add_argument(
        "--since", type=int, default=0, metavar="V",
        help="only the deltas after version V (default 0: the whole log)",
    )  # fmt: skip
    export.add_argument(
        "--site", default=None,
        help="as this site receives them: format 2 deltas that do not target it without "
        "their operations (to compare with the site's `meshorch fleet export`)",
    )  # fmt: skip
    export.add_argument(
        "-f", "--file", type=Path, default=None, help="write here instead of standard output"
    )
    export.add_argument("--hub", default=os.environ.get(HUB_ENV), metavar="URL",
                        help=f"the hub, e.g. http://hub:7900 (default ${HUB_ENV})")  # fmt: skip
    export.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                        help=f"a fleet-wide operator token (default ${TOKEN_ENV})")  # fmt: skip
    export.set_defaults(handler=run_export)

    verify = actions.add_parser(
        "verify",
        help="check an exported log offline: signatures, chain, rotations, expiry",
        description="Check every delta of an export as a site would (fleet, signatures by "
        "the root key and the keys it rotated to, versions in order with none missing, the "
        "hash chain, a format 2 delta's operations against its signed hash), then expiry "
        "as of --at, and print what each delta did. Exit 0 when the log verifies, 1 at the "
        "first problem (its line, version and reason), 2 for a usage error.",
        epilog="A log that starts after version 1 (exported --since V, or after the hub "
        "compacted) is checked from its first delta on: the link to the deltas before is "
        "not. The root key may be the fleet's key at the log's start or the one it trusts "
        "now (GET /v1/fleet): either way every signature is checked.",
    )
    verify.add_argument("log", help="the export (JSON Lines; - for standard input)")
    verify.add_argument(
        "--root-key", required=True, metavar="HEX", help="the fleet root public key (64 hex)"
    )
    verify.add_argument(
        "--at", default=None, metavar="TIME",
        help="check expiry as of this time: unix seconds or ISO 8601 (2026-12-06T20:00:00Z); "
        "default now",
    )  # fmt: skip
    verify.add_argument(
        "--site", default=None,
        help="the log is this site's view (from `meshorch fleet export` or `export --site`)",
    )  # fmt: skip
    verify.add_argument(
        "--head", default=None, metavar="VERSION[:HASH]",
        help="the log must end at this version (and hash): a cut-off end is found only so",
    )  # fmt: skip
    verify.add_argument(
        "-o", "--output", choices=("text", "json"), default="text",
        help="text for people (default) or json: the whole report",
    )  # fmt: skip
    verify.set_defaults(handler=run_verify)


def add_site_diff(actions: Any) -> None:
    """``meshorch site diff|hold|release SITE`` (actions of ``meshorch site``)."""
    diff = actions.add_parser(
        "diff",
        help="what the site will do when it next applies the deltas it has not applied",
        description="Ask the hub what SITE will do when it next applies the deltas it has "
        "not applied yet: applications added, removed, upgraded (from which version to "
        "which), secrets, data key rotations, lock-down, agent upgrade, quotas, "
        "decommission, root key rotations, with the delta versions that cause each. "
        "Computed from the site's last report and the log: as old as that report (STALE "
        "when the site has not reported lately). A fleet-wide token is needed.",
    )
    diff.add_argument("site", help="the site id")
    diff.add_argument(
        "-o", "--output", choices=("text", "json"), default="text",
        help="text for people (default) or json: the hub's answer",
    )  # fmt: skip
    diff.add_argument("--hub", default=os.environ.get(HUB_ENV), metavar="URL",
                      help=f"the hub, e.g. http://hub:7900 (default ${HUB_ENV})")  # fmt: skip
    diff.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                      help=f"a fleet-wide operator token (default ${TOKEN_ENV})")  # fmt: skip
    diff.set_defaults(handler=run_site_diff)
    for name, help_text, description in (
        ("hold", "hold a site: it applies no delta until released",
         "Hold SITE at the hub: the deltas for it keep accumulating, but the site applies "
         "none (from the hub or relayed by other sites, once it heard of the hold) until "
         "`meshorch site release SITE`. Review a long-offline shop with `meshorch site diff` "
         "first. A fleet admin's token is needed."),
        ("release", "release a held site: it applies its pending deltas",
         "Release SITE: its next poll gets the deltas that accumulated."),
    ):  # fmt: skip
        parser = actions.add_parser(name, help=help_text, description=description)
        parser.add_argument("site", help="the site id")
        parser.add_argument("--hub", default=os.environ.get(HUB_ENV), metavar="URL",
                            help=f"the hub (default ${HUB_ENV})")  # fmt: skip
        parser.add_argument("--token", default=os.environ.get(TOKEN_ENV),
                            help=f"a fleet admin's token (default ${TOKEN_ENV})")  # fmt: skip
        parser.set_defaults(handler=run_site_hold, hold=name == "hold")


def run_site_hold(args: argparse.Namespace) -> int:
    action = "hold" if args.hold else "release"
    answer = hub_call(args, "POST", f"/v1/sites/{quote(args.site, safe='')}/{action}")
    held = answer["held"]
    if held is None:
        print(f"site {answer['site']} is not held: it applies its deltas")
    else:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held["since"]))
        print(f"site {answer['site']} is held since {since} UTC: it applies no delta")
    return 0


def run_site_diff(args: argparse.Namespace) -> int:
    answer = hub_call(args, "GET", f"/v1/sites/{quote(args.site, safe='')}/pending")
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(answer, option=orjson.OPT_INDENT_2) + b"\n")
        return 0
    for line in diff_lines(answer):
        print(line)
    return 0


def _caused(versions: list[int]) -> str:
    return f"  [delta{'s' if len(versions) > 1 else ''} {', '.join(map(str, versions))}]"


def diff_lines(p: dict[str, Any]) -> list[str]:
    """``GET /v1/sites/{id}/pending`` for people."""
    age = p["report_age_s"]
    reported = "no report yet" if age is None else f"last report {age:.0f} s ago"
    applied = "-" if p["applied_version"] is None else p["applied_version"]
    lines = [
        f"site {p['site']}: applied {applied}, head {p['head']}: {p['deltas_pending']} "
        f"delta(s) pending, {p['deltas_for_site']} for this site; {reported}"
        + (" (STALE: the site may have moved since)" if p["stale"] else "")
    ]
    for app in p["apps"]:
        owner = f" ({app['tenant']})" if app["tenant"] else ""
        change = {
            "added": f"added, version {app['to']}",
            "removed": f"removed (was {app['from']})",
            "upgraded": f"upgraded {app['from']} -> {app['to']}",
        }.get(app["change"], app["change"])
        lines.append(f"  app {app['app']}{owner}: {change}{_caused(app['versions'])}")
    for secret in p["secrets"]:
        change = secret["change"]
        if change == "rotated":
            change = f"rotated, version {secret['from']} -> {secret['to']}"
        lines.append(f"  secret {secret['secret']}: {change}{_caused(secret['versions'])}")
    if p["key_rotations"]:
        lines.append(f"  data keys rotated{_caused(p['key_rotations'])}")
    if p["lockdown"] is not None:
        lines.append(f"  lock-down: {p['lockdown']['change']}{_caused(p['lockdown']['versions'])}")
    upgrade = p["agent_upgrade"]
    if upgrade is not None:
        running = ",".join(upgrade["from"]) or "?"
        lines.append(f"  agent upgrade: {running} -> {upgrade['to']}{_caused(upgrade['versions'])}")
    for quota in p["quotas"]:
        limits = ", ".join(f"{k}={v}" for k, v in sorted(quota["to"].items())) or "unlimited"
        lines.append(f"  quota of {quota['tenant']}: {limits}{_caused(quota['versions'])}")
    if p["decommission"]:
        lines.append(f"  DECOMMISSION: stops every application, wipes its secrets"
                     f"{_caused(p['decommission'])}")  # fmt: skip
    if p["root_rotations"]:
        lines.append(f"  fleet root key rotated{_caused(p['root_rotations'])}")
    for op in p["other_ops"]:
        lines.append(f"  {op['op']} (not known to this client){_caused([op['version']])}")
    if len(lines) == 1:
        lines.append("  nothing changes at this site")
    held = p.get("held")
    if held:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(held["since"]))
        lines.append(f"  HELD since {since} UTC: none of this happens before `meshorch site "
                     "release`")  # fmt: skip
    if p["snapshot_first"]:
        lines.append("  (the site is behind the hub's compaction: it catches up by a snapshot "
                     "first; the changes folded into it are not listed)")  # fmt: skip
    if not p["complete"]:
        lines.append(f"  (only the deltas through version {p['scanned_through']} were read; "
                     "more follow)")  # fmt: skip
    return lines


# -- export -----------------------------------------------------------------------------


def run_export(args: argparse.Namespace) -> int:
    if args.since < 0:
        raise ConfigurationError("--since is a version, 0 or more")
    out: IO[bytes] = sys.stdout.buffer if args.file is None else _open(args.file)
    try:
        first, last, page = export_pages(
            lambda path: hub_call(args, "GET", path), args.since, args.site, out.write
        )
    finally:
        if args.file is not None:
            out.close()
    if first is None:
        print(f"no delta after version {args.since} (the head is {page['head']})", file=sys.stderr)
        return 0
    print(
        f"exported versions {first} to {last} of fleet {page['fleet']}; the head is "
        f"{page['head']} ({page['head_hash']}), the root key {page['root_key']}",
        file=sys.stderr,
    )
    return 0


def _open(path: Path) -> IO[bytes]:
    try:
        return path.open("wb")
    except OSError as exc:
        raise ConfigurationError(f"{path}: {exc.strerror}") from None


def export_pages(
    get: Callable[[str], Any], since: int, site: str | None, write: Callable[[bytes], Any]
) -> tuple[int | None, int | None, dict[str, Any]]:
    """Every page of ``GET /v1/deltas/export`` after ``since``, each envelope written as a
    line; returns the first and last versions written and the last page."""
    after, first, last = since, None, None
    while True:
        query: dict[str, Any] = {"after": after, "limit": EXPORT_PAGE}
        if site is not None:
            query["site"] = site
        page = get(f"/v1/deltas/export?{urlencode(query)}")
        for text in page["envelopes"]:
            write(text.encode() + b"\n")
        count = len(page["envelopes"])
        if count:
            first = after + 1 if first is None else first
            last = after + count
        if page["next_after"] is None or not count:
            return first, last, page
        after = int(page["next_after"])


# -- verify -----------------------------------------------------------------------------


def run_verify(args: argparse.Namespace) -> int:
    try:
        root_key = parse_key_id(args.root_key)
    except ValueError as exc:
        raise ConfigurationError(f"--root-key: {exc}") from None
    at = time.time() if args.at is None else parse_time(args.at)
    head, head_hash = parse_head(args.head)
    if args.log == "-":
        lines = read_lines(sys.stdin.buffer)
    else:
        try:
            with open(args.log, "rb") as stream:
                lines = read_lines(stream)
        except OSError as exc:
            raise ConfigurationError(f"{args.log}: {exc.strerror}") from None
    report = verify_log(lines, root_key, at, args.site, head, head_hash)
    if args.output == "json":
        sys.stdout.buffer.write(orjson.dumps(report.to_json(), option=orjson.OPT_INDENT_2))
        sys.stdout.write("\n")
    else:
        print_report(report, at)
    return 0 if report.ok else EXIT_INVALID


def read_lines(stream: IO[bytes]) -> list[bytes]:
    """The lines of ``stream``; a line longer than an envelope may be is cut to one byte
    over the limit (the verifier refuses it as too large) and the rest skipped."""
    lines: list[bytes] = []
    while True:
        line = stream.readline(MAX_DELTA_BYTES + 2)
        if not line:
            return lines
        if len(line) > MAX_DELTA_BYTES + 1 and not line.endswith(b"\n"):
            while (rest := stream.readline(1 << 16)) and not rest.endswith(b"\n"):
                pass
        lines.append(line)


def parse_time(text: str) -> float:
    try:
        return float(text)
    except ValueError:
        pass
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise ConfigurationError(
            f"--at: {text!r} is neither unix seconds nor an ISO 8601 time"
        ) from None
    if moment.tzinfo is None:
        raise ConfigurationError("--at: give the time zone (e.g. 2026-12-06T20:00:00Z)")
    return moment.timestamp()


def parse_head(text: str | None) -> tuple[int | None, str | None]:
    if text is None:
        return None, None
    version, _, digest = text.partition(":")
    if not version.isdigit() or (digest and (len(digest) != 64 or not is_hex(digest))):
        raise ConfigurationError("--head: VERSION or VERSION:HASH (64 lower-case hex)")
    return int(version), digest or None


def _when(seconds: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(seconds))


def print_report(report: LogReport, at: float) -> None:
    for entry in report.entries:
        delta = entry.delta
        prefix = f"{delta.version:>7}  {_when(delta.issued_at)}  {target_text(delta.target)}:"
        for i, action in enumerate(entry.actions):
            print(f"{prefix if i == 0 else ' ' * len(prefix)} {action}")
    if report.problem is not None:
        print(f"FAILED: {report.problem}")
        return
    start = (
        "from the genesis"
        if report.anchor == "genesis"
        else f"from version {report.first_version}'s prev (the deltas before are not in the log)"
    )
    trusted = "at its start" if report.anchoring == "start" else "at its end"
    print(
        f"OK: versions {report.first_version} to {report.last_version} ({len(report.entries)} "
        f"deltas), chained {start}; the root key is trusted {trusted}; head hash "
        f"{report.head}; fresh as of {_when(at)}"
    )
