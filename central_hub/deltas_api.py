"""The HTTP routes of the delta log seen by operators: its export, a site's preview, holds.

``GET /v1/deltas/export`` answers the envelopes after a version exactly as the hub signed
them (or as one site receives them, ``site=``), a page at a time, for ``meshorch deltas
export``; ``meshorch deltas verify`` checks them with no hub (``meshorch.fleet.verify_log``).
Fleet-wide tokens only (``deltas.read``: the log holds every tenant's specs); a page is at
most ``MAX_EXPORT_LIMIT`` envelopes and ``ledger.MAX_DELTA_RESPONSE_BYTES``.

``GET /v1/sites/{id}/pending`` previews what a site will do when it next applies the
deltas it has not applied (``central_hub.pending``, from its last report and the log; at
most ``MAX_PENDING_SCAN`` deltas read, in pages that yield to the loop);
``POST /v1/sites/{id}/hold`` and ``/release`` hold a site until reviewed
(``central_hub.holds``).

Registered by ``central_hub.api`` (``DELTAS_ROUTES`` is appended to its ``ROUTES``).
"""

from __future__ import annotations

import asyncio

from aiohttp import web

from central_hub import holds, pending
from central_hub.errors import ApiError
from central_hub.model import ID_PATTERN, validate_site_id
from central_hub.routing import (
    SITE_ID_PATH,
    Query,
    Route,
    hub_of,
    json_response,
    query_value,
    read,
    token_of,
)
from meshorch.fleet.delta import Delta, DeltaRejected, parse, view_for

MAX_EXPORT_LIMIT = 500
MAX_PENDING_SCAN = 2000  # deltas read for one preview (a page of 500 at a time)
PENDING_PAGE = 500


async def export_deltas(request: web.Request) -> web.Response:
    hub = hub_of(request)
    after = int(query_value(request, "after", 0))
    limit = int(query_value(request, "limit", MAX_EXPORT_LIMIT))
    site = query_value(request, "site")
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
    # view_for, not the ledger's cache of views: a long export would push the versions
    # the sites' polls ask for out of it.
    envelopes = [raw if site is None else view_for(raw, site) for _, raw in page]
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


async def site_pending(request: web.Request) -> web.Response:
    hub = hub_of(request)
    site = validate_site_id(request.match_info["id"])
    hub.sites.site(site)  # 404 when not registered
    report, received_at = hub.reports.view_args(site)
    ledger = hub.ledger
    now = ledger.now()
    applied = 0 if report is None else int(report["applied_version"])
    compacted = hub.snapshots.compacted
    after = max(applied, compacted)
    found: list[Delta] = []
    while len(found) < MAX_PENDING_SCAN:
        page = ledger.deltas_after(after, min(PENDING_PAGE, MAX_PENDING_SCAN - len(found)))
        if not page:
            break
        for version, raw in page:
            try:
                found.append(parse(raw)[0])
            except DeltaRejected:  # never stored by the hub
                raise ApiError(500, "internal", f"stored delta {version} does not parse") from None
        after = page[-1][0]
        await asyncio.sleep(0)  # a long log is read in pages, other requests in between
    head = ledger.head.version
    age = None if received_at is None else max(0.0, now - received_at)
    answer = pending.preview(site, report, age, hub.sites.times.site_stale_s, found)
    answer.update(
        head=head,
        scanned_through=after,
        complete=after >= head,
        snapshot_first=applied < compacted,
        held=holds.hold_of(ledger, site),
    )
    return json_response(answer)


async def hold_site(request: web.Request) -> web.Response:
    site = validate_site_id(request.match_info["id"])
    await read(request)  # no body expected; a body is ignored
    hub = hub_of(request)
    return json_response(await holds.set_hold(hub.ledger, site, token_of(request), True))


async def release_site(request: web.Request) -> web.Response:
    site = validate_site_id(request.match_info["id"])
    await read(request)
    hub = hub_of(request)
    return json_response(await holds.set_hold(hub.ledger, site, token_of(request), False))


DELTAS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/deltas/export", export_deltas, "deltas.read",
          "The signed delta envelopes after a version, as sites receive them (each a JSON "
          "string, byte for byte), a page at a time (follow next_after); 410 compacted "
          "below the snapshot base (compacted)", response="DeltaExport",
          query=(Query("after", "integer", "only deltas with a version greater than this",
                       minimum=0, maximum=2**63 - 1),
                 Query("limit", "integer", f"at most this many (1-{MAX_EXPORT_LIMIT})",
                       minimum=1, maximum=MAX_EXPORT_LIMIT),
                 Query("site", "string", "the envelopes as this site receives them (format "
                       "2 deltas that do not target it without their operations)",
                       pattern=ID_PATTERN, error="bad_site_id"))),
    Route("GET", "/v1/sites/{id}/pending", site_pending, "deltas.read",
          "What the site will do when it next applies the deltas it has not applied: apps "
          "added, removed, upgraded (from, to), secrets, lock-down, agent upgrade, quotas, "
          "with the delta versions causing each; from its last report (report_age_s, "
          "stale) and the log (at most 2000 deltas read: complete, scanned_through)",
          response="SitePending", path_params=(SITE_ID_PATH,)),
    Route("POST", "/v1/sites/{id}/hold", hold_site, "sites.write",
          "Hold a site: deltas keep accumulating, the site applies none until released "
          "(its poll answers no delta, held: true); idempotent", response="SiteHold",
          path_params=(SITE_ID_PATH,)),
    Route("POST", "/v1/sites/{id}/release", release_site, "sites.write",
          "Release a held site: its next poll gets the deltas; idempotent",
          response="SiteHold", path_params=(SITE_ID_PATH,)),
)  # fmt: skip
