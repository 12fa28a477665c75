"""The hub's web dashboard: a static single page app (``central_hub/dashboard/``).

``add_dashboard(app)`` registers ``GET /`` and ``GET /dashboard`` (redirects to
``/dashboard/``) and ``GET /dashboard/{file}``. The page talks to the hub's JSON API with
the operator's bearer token (kept in the browser's sessionStorage), so these routes need
no credentials and serve nothing but the files below.

Only the files of ``ASSETS`` are served, by exact name: nothing else under the package
is reachable, whatever the path (``..``, encoded slashes, symlinks). They are read once,
when the routes are added, so a missing asset fails the hub's start rather than a page.
"""

from __future__ import annotations

from pathlib import Path
from typing import Final

from aiohttp import web

ASSET_DIR: Final = Path(__file__).with_name("dashboard")
ASSETS: Final = {
    "index.html": "text/html",
    "app.js": "text/javascript",
    "style.css": "text/css",
}
# The page loads nothing but its own files and talks only to this hub: a strict policy
# keeps an injected string (a site label, a log line) from ever running as code.
SECURITY_HEADERS: Final = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "X-Frame-Options": "DENY",
    # Revalidate each load, so an upgraded hub never runs a stale app.js.
    "Cache-Control": "no-cache",
}
_FILES: web.AppKey[dict[str, bytes]] = web.AppKey("dashboard_files", dict)


def load_assets(directory: Path = ASSET_DIR) -> dict[str, bytes]:
    return {name: (directory / name).read_bytes() for name in ASSETS}


def add_dashboard(app: web.Application) -> None:
    """Register the dashboard's routes on the hub's application (once; a second call does
    nothing)."""
    if _FILES in app:
        return
    app[_FILES] = load_assets()
    app.router.add_get("/", _to_dashboard)
    app.router.add_get("/dashboard", _to_dashboard)
    app.router.add_get("/dashboard/{name:.*}", _serve)


async def _to_dashboard(request: web.Request) -> web.Response:
    # A plain response, not a raised HTTPFound: the API's error middleware turns raised
    # HTTP exceptions into JSON errors and would drop the Location header.
    return web.Response(status=302, headers={"Location": "/dashboard/"})


async def _serve(request: web.Request) -> web.Response:
    name = request.match_info["name"] or "index.html"
    body = request.app[_FILES].get(name)
    if body is None:
        raise web.HTTPNotFound(text=f"the dashboard has no file {name[:100]!r}")
    return web.Response(
        body=body, content_type=ASSETS[name], charset="utf-8", headers=SECURITY_HEADERS
    )
