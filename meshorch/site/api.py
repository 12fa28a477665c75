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
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence

from aiohttp import web

from meshorch import http_metrics
from meshorch.apps.records import host_protocols
from meshorch.errors import RemoteInputError
from meshorch.promtext import Registry
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
    ApiNode,
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
from meshorch.state.protocol import FEATURES, FeatureUnavailable, require, site_protocol
from meshorch.state.tables import (
    APPS_TABLE,
    KV_TABLE,
    MAX_VALUE_BYTES,
    validate_kv_key,
)
from raft import ClientRequest, Delete, Op, OpResult, Put, StateView
from raft.errors import (
    EntryTooLargeError,
    NotCommittedError,
    OutcomeUnknownError,
    SessionError,
    StateFullError,
)
from raft.sessions import SESSION_EXPIRED, SESSION_STALE, SessionPool
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
    app.router.add_post("/v1/sessions", new_session)


# The agent's own sessions, for requests that name none (raft.sessions.SessionPool).
SESSION_POOL: web.AppKey[SessionPool] = web.AppKey("session_pool")


class _HostProtocols:
    """``host_protocols`` of the view, read again only once the hosts' table changed (every
    write asks which protocol the site speaks)."""

    def __init__(self) -> None:
        self._changes = -1
        self._protocols: dict[str, int] = {}

    def of(self, view: StateView) -> dict[str, int]:
        changes = view.changes(APPS_TABLE)
        if changes != self._changes:
            self._protocols = host_protocols(view)
            self._changes = changes
        return self._protocols


PROTOCOLS: web.AppKey[_HostProtocols] = web.AppKey("host_protocols")


def build_app(services: SiteServices, guard: Guard) -> web.Application:
    """``guard`` refuses what the caller may not do before any handler runs."""
    app = web.Application(
        middlewares=[errors_middleware, guard.middleware], client_max_size=MAX_VALUE_BYTES + 1
    )
    app[SERVICES] = services
    node = services.node
    app[SESSION_POOL] = SessionPool(_new_client, lambda: _floor(node))
    app[PROTOCOLS] = _HostProtocols()
    add_kv_and_status_routes(app)
    add_access_routes(app)
    add_member_routes(app)
    add_app_routes(app)
    add_fleet_routes(app)
    add_secret_routes(app)
    add_stream_routes(app, services.streams)
    add_host_routes(app, services.hosts)
    registry = Registry()
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
    (result,) = await propose_request(request, [Put(KV_TABLE, key, value, expect_index)])
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
    (result,) = await propose_request(request, [Delete(KV_TABLE, key)])
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


# A client session (raft.sessions) as clients name it: "<floor>.<token>", the floor an
# applied index seen before the session's first request.
CLIENT_HEADER = "X-Meshorch-Client"
SEQ_HEADER = "X-Meshorch-Seq"
_CLIENT_ID = re.compile(r"(\d{1,19})\.[A-Za-z0-9_-]{8,40}")


async def new_session(request: web.Request) -> web.Response:
    """A client id for the session headers: no Raft round (see ``session_floor``)."""
    floor = session_floor(request)
    return json_response({"client": f"{floor}.{secrets.token_urlsafe(16)}", "seq": 1})


def session_floor(request: web.Request) -> int:
    """A new session's floor: the commit index this host knows (every entry of the session
    comes later). Not the applied index: a host catching up would give a floor below
    sessions dropped meanwhile, and its writes would be refused as expired."""
    return _floor(services(request).node)


def _new_client() -> bytes:
    return b"agent." + secrets.token_bytes(16)


def _floor(node: ApiNode) -> int:
    return max(node.view.applied_index(), node.status().commit_index)


def client_request(request: web.Request) -> tuple[ClientRequest, bool]:
    """The caller's session request from its headers, or the next request of one of the
    agent's own sessions (so that resending it inside the agent is safe: ``SessionPool``);
    True if the caller named it."""
    client = request.headers.get(CLIENT_HEADER)
    seq = request.headers.get(SEQ_HEADER)
    if client is None and seq is None:
        return session_pool(request).take(), False
    match = _CLIENT_ID.fullmatch(client or "")
    if match is None or seq is None or not seq.isdigit() or not 0 < int(seq) < 2**63:
        raise ApiError(
            400,
            "bad_session",
            f"{CLIENT_HEADER} (from POST /v1/sessions) and {SEQ_HEADER} (1, 2, ...: one "
            "more for each new write) go together",
        )
    assert client is not None
    return ClientRequest(client.encode(), int(seq), int(match.group(1))), True


def session_pool(request: web.Request) -> SessionPool:
    return request.app[SESSION_POOL]


async def propose_request(request: web.Request, ops: Sequence[Op]) -> list[OpResult]:
    """Commit a client's write exactly once. The node resends it under its session until
    it gets an answer (leader changes included); what is left unknown is said in words."""
    session, named = client_request(request)
    if named:
        return await _propose_session(request, ops, session, named=True)
    pool = session_pool(request)
    for attempt in (1, 2):
        try:
            results = await _propose_session(request, ops, session, named=False)
        except ApiError as exc:
            if exc.code == SESSION_EXPIRED and attempt == 1:
                # The state dropped this reused session (unused for long, or too many
                # sessions): nothing was applied, and a new session cannot be expired.
                session = pool.fresh()
                continue
            if exc.code != SESSION_EXPIRED:
                pool.give_back(session)
            raise
        except Exception:
            pool.give_back(session)
            raise
        pool.give_back(session)
        return results
    raise AssertionError("unreachable: the second attempt returns or raises")


async def _propose_session(
    request: web.Request, ops: Sequence[Op], session: ClientRequest, *, named: bool
) -> list[OpResult]:
    node = services(request).node
    protocols = request.app[PROTOCOLS].of(node.view)
    if site_protocol(protocols) < FEATURES["sessions"]:
        if named:
            require("sessions", protocols)
        # A host would skip the entry: the old rule, resend only what certainly did nothing
        # (a compare-and-set not even that).
        cas = any(isinstance(op, Put) and op.expect_index is not None for op in ops)
        return await node.propose(ops, idempotent=not cas)
    try:
        return await node.propose(ops, session=session)
    except SessionError as exc:
        raise ApiError(409, exc.code, _SESSION_REFUSALS.get(exc.code, str(exc))) from exc
    except OutcomeUnknownError as exc:
        if named:
            advice = (
                f"send it again with the same {CLIENT_HEADER} and {SEQ_HEADER} to learn its "
                "outcome (it is applied at most once), or read the key before writing again"
            )
        else:
            advice = (
                "read the key before writing again: sent again as a new request, it could be "
                f"applied twice ({CLIENT_HEADER} and {SEQ_HEADER} make a resend safe)"
            )
        raise ApiError(
            504,
            "outcome_unknown",
            f"the write may or may not have been applied ({exc}); the agent resent it for "
            f"{node.session_retry_s:g}s without getting an answer, as no majority of the site "
            f"answered. {advice}",
        ) from exc


_SESSION_REFUSALS = {
    SESSION_EXPIRED: (
        "this write was not applied: the client session was dropped (unused for too long, "
        "or too many sessions), so whether its earlier write was applied cannot be told; "
        "read the key, then write with a new session (POST /v1/sessions)"
    ),
    SESSION_STALE: (
        "this write was not applied: a later write of the same client session was applied "
        "already (each new write takes the next sequence number)"
    ),
}
