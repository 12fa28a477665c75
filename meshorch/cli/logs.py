"""``meshorch logs``: search and follow the fleet's logs through the hub (``GET /v1/logs``)."""

from __future__ import annotations

import argparse
import datetime
import sys
import time
import urllib.parse
from collections.abc import Callable
from typing import Any

import orjson

from meshorch.cli.fleet import _hub_flags, hub_call

PAGE = 1000
FOLLOW_POLL_S = 1.0
LEVELS = ("emerg", "alert", "crit", "error", "warn", "notice", "info", "debug")
FILTERS = ("site", "app", "tenant", "stream", "host", "since", "until", "level", "grep", "regex")


def add_logs_command(commands: Any) -> None:
    logs = commands.add_parser(
        "logs",
        help="search and follow application logs across the fleet (from the hub)",
        description="Search the logs and events the sites forwarded to the hub: filters are "
        "combined (AND); lines print oldest first, ending with the newest. A tenant token "
        "sees only its tenant's streams. Events a site holds but has not forwarded yet (its "
        "uplink is down) appear once it reconnects.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n"
        "  meshorch logs --site shop-1 --app pos --since 1h --grep 'payment failed'\n"
        "  meshorch logs --app pos --level 3 --since 1d          # errors of a day\n"
        "  meshorch logs --site shop-1 --app pos --follow        # like tail -f",
    )
    logs.add_argument("--site", help="only this site")
    logs.add_argument("--app", help="only this application")
    logs.add_argument("--tenant", help="only this tenant (fleet-wide tokens)")
    logs.add_argument("--stream", help="only this stream, tenant/app/name (default: every stream)")
    logs.add_argument("--host", help="only lines from this host")
    logs.add_argument(
        "--since", default="1h", help="from this long ago (90s, 15m, 1h, 2d) or unix seconds "
        "(default %(default)s)",
    )  # fmt: skip
    logs.add_argument("--until", help="up to this long ago, or unix seconds")
    logs.add_argument(
        "--level", type=int, choices=range(8), metavar="0-7",
        help="severity at most this: 3 errors, 4 and warnings, 6 and info",
    )  # fmt: skip
    logs.add_argument("--grep", metavar="TEXT", help="lines containing TEXT (case-sensitive)")
    logs.add_argument("--regex", metavar="RE", help="lines matching this regular expression")
    logs.add_argument("--limit", type=int, default=100, help="at most this many lines (newest)")
    logs.add_argument("--count", action="store_true", help="also print how many lines match")
    logs.add_argument("-f", "--follow", action="store_true", help="keep printing new lines")
    logs.add_argument(
        "-o", "--output", choices=("text", "json"), default="text",
        help="text for people (default) or json: one JSON object per line (JSON Lines, "
        "also with --follow), as GET /v1/logs answers them",
    )  # fmt: skip
    _hub_flags(logs)
    logs.set_defaults(handler=run_logs)


def _params(args: argparse.Namespace) -> dict[str, str]:
    return {name: str(value) for name in FILTERS if (value := getattr(args, name)) is not None}


def _fetch(
    args: argparse.Namespace, params: dict[str, str], limit: int
) -> tuple[list[dict[str, Any]], int | None]:
    """Up to ``limit`` newest hits (following cursors), and the total when counted."""
    hits: list[dict[str, Any]] = []
    cursor: str | None = None
    total = None
    while len(hits) < limit:
        query = {**params, "limit": str(min(PAGE, limit - len(hits)))}
        if cursor:
            query["cursor"] = cursor
        if args.count and total is None:
            query["count"] = "true"
        page = hub_call(args, "GET", "/v1/logs?" + urllib.parse.urlencode(query))
        hits.extend(page["logs"])
        total = page.get("total") if total is None else total
        cursor = page.get("next_cursor")
        if not cursor:
            break
    return hits, total


def format_hit(hit: dict[str, Any]) -> str:
    stamp = datetime.datetime.fromtimestamp(hit["time"], datetime.UTC)
    level = hit.get("level")
    severity = LEVELS[level] if isinstance(level, int) and 0 <= level < len(LEVELS) else "-"
    app = hit["stream"].split("/")[1]
    when = f"{stamp:%Y-%m-%dT%H:%M:%S.%f}"[:-3] + "Z"
    return f"{when} {hit['site']}/{hit['host']} {app} {severity:6} {hit['text']}"


def _printer(output: str) -> Callable[[dict[str, Any]], None]:
    def as_text(hit: dict[str, Any]) -> None:
        print(format_hit(hit), flush=True)

    def as_json_line(hit: dict[str, Any]) -> None:
        print(orjson.dumps(hit).decode(), flush=True)

    return as_json_line if output == "json" else as_text


def run_logs(args: argparse.Namespace) -> int:
    if args.limit < 1:
        print("--limit must be at least 1", file=sys.stderr)
        return 2
    params = _params(args)
    hits, total = _fetch(args, params, args.limit)
    seen = {(h["site"], h["stream"], h["seq"]) for h in hits}
    show = _printer(args.output)
    for hit in reversed(hits):
        show(hit)
    if total is not None:
        print(f"{total} matching lines", file=sys.stderr)
    if not args.follow:
        return 0
    newest = max((h["time"] for h in hits), default=time.time() - 5)
    try:
        while True:
            time.sleep(FOLLOW_POLL_S)
            # Lines arrive late from sites that were cut off: look back a little, skip seen.
            fresh, _ = _fetch(args, {**params, "since": str(newest - 30)}, PAGE)
            for hit in reversed(fresh):
                key = (hit["site"], hit["stream"], hit["seq"])
                if key not in seen:
                    seen.add(key)
                    show(hit)
            newest = max([newest, *(h["time"] for h in fresh)])
    except KeyboardInterrupt:
        return 0
