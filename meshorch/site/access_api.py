"""The agent's access token routes (admins only: ``meshorch.site.authz``).

POST   /v1/access-tokens             {"role", "tenant"?, "ttl_s"?} -> the token, once
GET    /v1/access-tokens             every token's id, role, tenant, expiry
DELETE /v1/access-tokens/{token_id}  revoke it (at once, on every host)
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from meshorch.http_body import read_limited
from meshorch.site.access import (
    MAX_TOKENS,
    RECORD_PREFIX,
    AccessRecord,
    new_token,
    parse_create_request,
)
from meshorch.site.guard import caller_of
from meshorch.site.http import ApiError, json_object, json_response, services
from meshorch.state.tables import SYSTEM_TABLE
from raft import Delete, Put

logger = logging.getLogger(__name__)

MAX_BODY = 1024


def add_access_routes(app: web.Application) -> None:
    """Register the access token routes."""
    app.router.add_get("/v1/access-tokens", list_tokens)
    app.router.add_post("/v1/access-tokens", create_token)
    app.router.add_delete("/v1/access-tokens/{token_id}", delete_token)


def _records(request: web.Request) -> list[AccessRecord]:
    found, _ = services(request).node.view.scan(SYSTEM_TABLE, RECORD_PREFIX, MAX_TOKENS + 1)
    return [AccessRecord.decode(record.value) for _, record in found]


async def list_tokens(request: web.Request) -> web.Response:
    await services(request).node.barrier()
    return json_response({"tokens": [r.to_json() for r in _records(request)]})


async def create_token(request: web.Request) -> web.Response:
    body = await read_limited(request.content, MAX_BODY)
    if len(body) > MAX_BODY:
        raise ApiError(413, "too_large", f"the body is limited to {MAX_BODY} bytes")
    role, tenant, ttl_s = parse_create_request(json_object(body))
    svc = services(request)
    await svc.node.barrier()
    if len(_records(request)) >= MAX_TOKENS:
        raise ApiError(409, "too_many_tokens", f"a site keeps at most {MAX_TOKENS} tokens")
    token, record = new_token(role, tenant, ttl_s, time.time())
    await svc.node.propose([Put(SYSTEM_TABLE, record.key(), record.encode(), expect_index=0)])
    logger.info("access token %s (%s) made by %s", record.token_id, role, caller_of(request).name)
    return json_response({**record.to_json(), "token": token.encode()}, 201)


async def delete_token(request: web.Request) -> web.Response:
    token_id = request.match_info["token_id"]
    key = RECORD_PREFIX + token_id.encode()
    svc = services(request)
    await svc.node.barrier()
    if svc.node.view.get(SYSTEM_TABLE, key) is None:
        raise ApiError(404, "not_found", f"no access token {token_id!r}")
    await svc.node.propose([Delete(SYSTEM_TABLE, key)], idempotent=True)
    logger.info("access token %s revoked by %s", token_id, caller_of(request).name)
    return json_response({"revoked": token_id})
