"""Prometheus ``GET /metrics`` for an aiohttp app, and a latency histogram of its routes
(``meshorch.promtext``: the text format without prometheus-client's import cost).

Shared by the agent's and the hub's APIs; what each exports is its own collector.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from meshorch.promtext import CONTENT_TYPE, Histogram, Registry, render

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_REGISTRY: web.AppKey[Registry] = web.AppKey("metrics_registry")
_LATENCY: web.AppKey[Histogram] = web.AppKey("metrics_latency")


def latency_histogram(registry: Registry, prefix: str) -> Histogram:
    histogram = Histogram(
        f"{prefix}_api_request_seconds",
        "API request latency by route and status class",
        ["route", "status"],
        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
    )
    registry.register(histogram)
    return histogram


def install(app: web.Application, registry: Registry, prefix: str) -> None:
    """``GET /metrics`` from ``registry`` and a latency histogram of every other route."""
    app[_REGISTRY] = registry
    app[_LATENCY] = latency_histogram(registry, prefix)
    app.middlewares.append(_timing)
    app.router.add_get("/metrics", _metrics)


@web.middleware
async def _timing(request: web.Request, handler: Handler) -> web.StreamResponse:
    started = time.perf_counter()
    status = 500
    try:
        response = await handler(request)
        status = response.status
        return response
    except web.HTTPException as exc:
        status = exc.status
        raise
    finally:
        route = request.match_info.route.resource
        name = route.canonical if route is not None else "unmatched"
        request.app[_LATENCY].labels(name, f"{status // 100}xx").observe(
            time.perf_counter() - started
        )


async def _metrics(request: web.Request) -> web.Response:
    body = render(request.app[_REGISTRY])
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
