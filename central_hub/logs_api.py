"""The HTTP routes of the fleet logs (``central_hub.logs``).

Registered by ``central_hub.api`` (``LOGS_ROUTES`` is appended to its ``ROUTES``).
"""

from __future__ import annotations

from aiohttp import web

from central_hub.logindex import MAX_LEVEL, MAX_REGEX_CHARS
from central_hub.logs import MAX_QUERY_LIMIT
from central_hub.model import ID_PATTERN
from central_hub.routing import Query, Route, hub_of, json_response, read_json, site_of, token_of


async def link_stream_positions(request: web.Request) -> web.Response:
    return json_response(await hub_of(request).logs.positions(site_of(request)))


async def link_push_streams(request: web.Request) -> web.Response:
    hub = hub_of(request)
    return json_response(await hub.logs.ingest(site_of(request), await read_json(request)))


async def query_logs(request: web.Request) -> web.Response:
    params = dict(request.query)
    if len(params) != len(request.query):
        return json_response(
            {"error": {"code": "bad_query", "message": "each parameter may appear once"}}, 400
        )
    return json_response(await hub_of(request).logs.query(token_of(request), params))


async def list_log_streams(request: web.Request) -> web.Response:
    return json_response(await hub_of(request).logs.streams(token_of(request)))


_SEGMENT = ID_PATTERN  # a stream name's part (meshorch.streams.model.SEGMENT_RE)
_NUMBER = r"-?[0-9]+(\.[0-9]+)?"
_TIME = rf"{_NUMBER}|([0-9]+(\.[0-9]+)?[smhd])+"  # central_hub.logs.parse_time
_LOG_QUERY = (
    Query("tenant", "string", "only this tenant's streams (a tenant token sees only its own)",
          pattern=_SEGMENT),
    Query("site", "string", "only this site", pattern=_SEGMENT),
    Query("app", "string", "only this application: name or tenant/name",
          pattern=rf"{_SEGMENT}(/{_SEGMENT})?"),
    Query("stream", "string", "only this stream, tenant/app/name",
          pattern=rf"{_SEGMENT}/{_SEGMENT}/{_SEGMENT}"),
    Query("host", "string", "only events produced on this host", max_length=253),
    Query("since", "string", "from this time: unix seconds or a duration back (15m, 1h, 2d)",
          pattern=_TIME, max_length=64),
    Query("until", "string", "before this time: unix seconds or a duration back",
          pattern=_TIME, max_length=64),
    Query("level", "integer", "severity at most this (0-7: 3 error, 4 warning, 6 info)",
          minimum=0, maximum=MAX_LEVEL),
    Query("grep", "string", "the text contains this substring (case-sensitive)",
          min_length=1, max_length=1000),
    Query(
        "regex",
        "string",
        "the text matches this regular expression (RE2 syntax, "
        "linear time: no backreferences or lookarounds, 400 bad_regex; at most "
        f"{MAX_REGEX_CHARS} characters)",
        min_length=1,
        max_length=MAX_REGEX_CHARS,
    ),
    Query("limit", "integer",
          f"at most this many lines, newest first (1-{MAX_QUERY_LIMIT}, default 100)",
          minimum=1, maximum=MAX_QUERY_LIMIT),
    Query("cursor", "string", "the next_cursor of the previous page (opaque: 400 bad_cursor "
          "for one this hub did not give)"),
    Query("count", "string", "'true': also count every match (total)",
          enum=("true", "false", "1", "0", "yes", "no")),
)  # fmt: skip

LOGS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/logs", query_logs, "logs.read",
          "Search the fleet's logs and events: newest first, paginated; a query stops "
          "after its time budget (5 s) and says what it scanned (truncated); 429 with "
          "Retry-After while 16 queries run or wait", response="LogPage",
          query=_LOG_QUERY),
    Route("GET", "/v1/logs/streams", list_log_streams, "logs.read",
          "Every stream the hub holds: site, position, events the site's retention dropped "
          "(dropped) and the hub's retention dropped (hub_dropped)",
          response="LogStreams"),
    Route("GET", "/v1/link/streams", link_stream_positions, "site",
          "The last sequence the hub stored of each of the site's streams",
          response="StreamPositions"),
    Route("POST", "/v1/link/streams", link_push_streams, "site",
          "Forward stream chunks; idempotent by site, stream and sequence",
          request="StreamPush", response="StreamPositions"),
)  # fmt: skip
