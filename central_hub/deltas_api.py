"""The HTTP route of the delta log's export: the signed envelopes, for offline checks.

``GET /v1/deltas/export`` answers the envelopes after a version exactly as the hub signed
them (or as one site receives them, ``site=``), a page at a time, for ``meshorch deltas
export``; ``meshorch deltas verify`` checks them with no hub (``meshorch.fleet.verify_log``).
Fleet-wide tokens only (``deltas.read``: the log holds every tenant's specs); a page is at
most ``MAX_EXPORT_LIMIT`` envelopes and ``ledger.MAX_DELTA_RESPONSE_BYTES``.

Registered by ``central_hub.api`` (``DELTAS_ROUTES`` is appended to its ``ROUTES``).
"""

from __future__ import annotations

from aiohttp import web

from central_hub.errors import ApiError
from central_hub.model import validate_site_id
from central_hub.routing import Query, Route, hub_of, json_response, query_int

MAX_EXPORT_LIMIT = 500


async def export_deltas(request: web.Request) -> web.Response:
    hub = hub_of(request)
    after = query_int(request, "after", 0, 0, 2**63)
    limit = query_int(request, "limit", MAX_EXPORT_LIMIT, 1, MAX_EXPORT_LIMIT)
    raw_site = request.query.get("site")
    site = None if raw_site is None else validate_site_id(raw_site)
    compacted = hub.snapshots.compacted
    if after < compacted:
        raise ApiError(
            410,
            "compacted",
            f"the deltas up to version {compacted} were compacted into a snapshot: export "
            f"from version {compacted} on (after={compacted})",
        )
    ledger = hub.ledger
    page = ledger.deltas_after(after, limit)
    envelopes = [raw if site is None else ledger.view(v, raw, site) for v, raw in page]
    last = page[-1][0] if page else after
    return json_response(
        {
            "fleet": ledger.fleet,
            "root_key": ledger.root_key,
            "head": ledger.head.version,
            "head_hash": ledger.head.hash,
            "compacted": compacted,
            "site": site,
            "envelopes": [e.decode() for e in envelopes],
            "next_after": last if page and last < ledger.head.version else None,
        }
    )


DELTAS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/deltas/export", export_deltas, "deltas.read",
          "The signed delta envelopes after a version, as sites receive them (each a JSON "
          "string, byte for byte), a page at a time (follow next_after); 410 compacted "
          "below the snapshot base (compacted)", response="DeltaExport",
          query=(Query("after", "integer", "only deltas with a version greater than this"),
                 Query("limit", "integer", f"at most this many (1-{MAX_EXPORT_LIMIT})"),
                 Query("site", "string", "the envelopes as this site receives them (format "
                       "2 deltas that do not target it without their operations)"))),
)  # fmt: skip
