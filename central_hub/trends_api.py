"""``GET /v1/sites/{id}/trends``: a site's recent host use and restarts (``central_hub.trends``).

Fleet-wide tokens only (``sites.trends``): host CPU, memory and disk are the fleet's
infrastructure, and the restart count sums every tenant's instances. The answer is the
site's ring, at most ``trends.RING_SIZE`` samples, oldest first: a bounded cost whatever
the caller asks. 404 for a site that is not registered.

Registered by ``central_hub.api`` (``TRENDS_ROUTES`` is appended to its ``ROUTES``).
"""

from __future__ import annotations

from aiohttp import web

from central_hub.model import validate_site_id
from central_hub.routing import SITE_ID_PATH, Route, hub_of, json_response


async def site_trends(request: web.Request) -> web.Response:
    hub = hub_of(request)
    site = validate_site_id(request.match_info["id"])
    hub.sites.site(site)  # 404 when not registered
    book = hub.trends
    return json_response(
        {
            "site": site,
            "every_s": book.every_s,
            "window_s": book.every_s * book.size,
            "samples": [s.to_json() for s in book.samples(site)],
        }
    )


TRENDS_ROUTES: tuple[Route, ...] = (
    Route("GET", "/v1/sites/{id}/trends", site_trends, "sites.trends",
          "The site's recent trends, oldest first: per sample (at most one per every_s, "
          "the last window_s) the busiest live host's cpu_pct (1-minute load per core), "
          "memory_pct and disk_pct (null: not reported) and restarts, the sum of its "
          "instances' restart counts", response="Object", path_params=(SITE_ID_PATH,)),
)  # fmt: skip
