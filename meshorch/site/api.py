"""The agent's HTTP API (aiohttp, JSON by orjson).

Errors are JSON: ``{"error": {"code": "...", "message": "..."}}`` with a 4xx
for bad input (nothing changed) and 503/504 when a write could not be
committed. No write is answered 200 before it is committed and applied here.

This module builds the application: the error middleware, status and the key-value
routes; the other routes live by subject in ``member_api``, ``app_api``, ``fleet_api``,
``secret_api``, ``stream_api`` and ``host_api``, which share ``meshorch.site.http``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from aiohttp import web
from prometheus_client import CollectorRegistry

from meshorch import http_metrics
from meshorch.errors import RemoteInputError
from meshorch.secrets.service import SecretsRefused
from meshorch.site.access_api import add_access_routes
from meshorch.site.app_api import add_app_routes
from meshorch.site.fleet_api import add_fleet_routes
from meshorch.site.guard import Guard, caller_of
from meshorch.site.host_api import add_host_routes
from meshorch.site.http import (
    DEFAULT_LIST_LIMIT,
    MAX_LIST_LIMIT,
    SERVICES,
    ApiError,
    DeltaApiError,
    SiteServices,
    consistent_read,
    error_response,
    json_response,
    services,
)
from meshorch.site.member_api import add_member_routes
from meshorch.site.secret_api import add_secret_routes
from meshorch.site.stream_api import add_stream_routes
from meshorch.state.protocol import FeatureUnavailable
from meshorch.state.tables import (
    KV_TABLE,
    MAX_VALUE_BYTES,
    validate_kv_key,
)
from raft import Delete, Put
from raft.errors import EntryTooLargeError, NotCommittedError, OutcomeUnknownError, StateFullError
from raft.state_machine import NO_SPACE

logger = logging.getLogger(__name__)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except ApiError as exc:
        if isinstance(exc, DeltaApiError):
            error = {"code": exc.code, "message": exc.message, "version": exc.version}
            return json_response({"error": error}, exc.status)
        return error_response(exc.status, exc.code, exc.message)
    except SecretsRefused as exc:
        return error_response(exc.status, exc.code, str(exc))
    except RemoteInputError as exc:
        return error_response(400, exc.code, str(exc))
    except FeatureUnavailable as exc:
        return error_response(503, exc.code, str(exc))
    except EntryTooLargeError as exc:
        return error_response(413, exc.code, f"{exc}; nothing was written")
    except StateFullError as exc:
        return error_response(507, exc.code, f"{exc}; nothing was written")
    except NotCommittedError as exc:
        return error_response(503, "not_committed", f"{exc}; nothing was written, retry")
    except OutcomeUnknownError as exc:
        return error_response(504, "outcome_unknown", str(exc))
    except web.HTTPException as exc:
        if exc.empty_body:
            raise
        code = exc.reason.lower().replace(" ", "_")
        return error_response(exc.status, code, exc.text or exc.reason)
    except Exception:
        logger.exception("unhandled error in %s %s", request.method, request.path)
        return error_response(500, "internal", "internal error, see the agent log")


def add_kv_and_status_routes(app: web.Application) -> None:
    """Register status, liveness and the key-value routes."""
    app.router.add_get("/v1/status", get_status)
    app.router.add_get("/v1/ping", ping)
    app.router.add_get("/v1/kv/", list_keys)
    app.router.add_get("/v1/kv", list_keys)
    app.router.add_put("/v1/kv/{key:.+}", put_key)
    app.router.add_get("/v1/kv/{key:.+}", get_key)
    app.router.add_delete("/v1/kv/{key:.+}", delete_key)


def build_app(services: SiteServices, guard: Guard) -> web.Application:
    """``guard`` refuses what the caller may not do before any handler runs."""
    app = web.Application(
        middlewares=[errors_middleware, guard.middleware], client_max_size=MAX_VALUE_BYTES + 1
    )
    app[SERVICES] = services
    add_kv_and_status_routes(app)
    add_access_routes(app)
    add_member_routes(app)
    add_app_routes(app)
    add_fleet_routes(app)
    add_secret_routes(app)
    add_stream_routes(app, services.streams)
    add_host_routes(app, services.hosts)
    registry = CollectorRegistry()
    registry.register(services.metrics)
    http_metrics.install(app, registry, "meshorch_agent")
    return app


async def ping(_request: web.Request) -> web.Response:
    """Liveness for peers (``meshorch.net.app_network``): cheap, no state read."""
    return web.Response(status=204)


async def get_status(request: web.Request) -> web.Response:
    """Everything for the site's operators and peers; readiness alone for anyone else (the
    upgrade launcher of any release checks it without a credential)."""
    svc = services(request)
    status = svc.node.status()
    if caller_of(request).kind == "anonymous":
        return json_response({"ready": status.ready})
    records = {m.raft: m for m in svc.members.members()}
    leader = records.get(status.leader_address or "")
    members = [
        records[address].to_json()
        if address in records
        else {"host_id": None, "raft": address, "api": None}
        for address in status.members
    ]
    return json_response(
        {
            "site": svc.site_id,
            "host_id": svc.host_id,
            "leader": leader.host_id if leader else None,
            "leader_raft": status.leader_address,
            "is_leader": status.is_leader,
            "term": status.term,
            "commit_index": status.commit_index,
            "applied_index": svc.node.view.applied_index(),
            "members": members,
            # Members this host has a live Raft connection to (itself included).
            "reachable": sorted(svc.node.reachable()),
            "ready": status.ready,
            "cluster_password": svc.password_rotation.status(),
        }
    )


def _parse_int(request: web.Request, name: str, default: int | None) -> int | None:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit():
        raise ApiError(400, f"bad_{name}", f"{name} must be a non-negative integer")
    return int(raw)


async def put_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    expect_index = _parse_int(request, "expect_index", None)
    if request.content_length is not None and request.content_length > MAX_VALUE_BYTES:
        raise ApiError(413, "value_too_large", f"values are limited to {MAX_VALUE_BYTES} bytes")
    try:
        value = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise ApiError(
            413, "value_too_large", f"values are limited to {MAX_VALUE_BYTES} bytes"
        ) from exc
    # A plain put may be retried across a leader change; a compare-and-set may not.
    (result,) = await services(request).node.propose(
        [Put(KV_TABLE, key, value, expect_index)], idempotent=expect_index is None
    )
    if result.error == NO_SPACE:
        raise ApiError(507, NO_SPACE, "the site's state is full; nothing was written")
    if result.error == "conflict":
        raise ApiError(
            409,
            "conflict",
            f"expect_index={expect_index} but the key is at index {result.current_index}",
        )
    return json_response({"index": result.index})


async def get_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    await consistent_read(request)
    record = services(request).node.view.get(KV_TABLE, key)
    if record is None:
        raise ApiError(404, "not_found", "no such key")
    return web.Response(
        body=record.value,
        content_type="application/octet-stream",
        headers={"X-Meshorch-Index": str(record.mod_index)},
    )


async def delete_key(request: web.Request) -> web.Response:
    key = validate_kv_key(request.match_info["key"])
    (result,) = await services(request).node.propose([Delete(KV_TABLE, key)], idempotent=True)
    return json_response({"index": result.index, "deleted": result.existed})


async def list_keys(request: web.Request) -> web.Response:
    prefix = request.query.get("prefix", "")
    raw_prefix = validate_kv_key(prefix) if prefix else b""
    limit = _parse_int(request, "limit", DEFAULT_LIST_LIMIT)
    assert limit is not None
    if not 0 < limit <= MAX_LIST_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be 1..{MAX_LIST_LIMIT}")
    await consistent_read(request)
    records, more = services(request).node.view.scan(KV_TABLE, raw_prefix, limit)
    keys = [key.decode("utf-8", errors="replace") for key, _ in records]
    return json_response({"keys": keys, "more": more})
