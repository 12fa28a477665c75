"""The HTTP routes of the hub's secrets, lock-down and escrow (``central_hub.vault``).

Registered by ``central_hub.api`` (``VAULT_ROUTES`` is appended to its ``ROUTES``). Every
handler checks the token with ``central_hub.vault.check_access`` on the object it touches
(the secret's tenant; a fleet-wide admin for a site's lock-down, unseal and rotation).
"""

from __future__ import annotations

import orjson
from aiohttp import web

from central_hub import vault
from central_hub.errors import ApiError
from central_hub.model import ID_PATTERN
from central_hub.routing import (
    PAGE_QUERIES,
    Handler,
    Query,
    Route,
    hub_of,
    json_response,
    page_query,
    query_value,
    read,
    read_json,
    site_of,
    token_of,
)
from meshorch.secrets.keyring import SECRET_NAME_PATTERN


def _name(request: web.Request) -> str:
    return vault.check_name(request.match_info["name"])


async def create_secret(request: web.Request) -> web.Response:
    wanted = vault.parse_secret_request(await read_json(request))
    status, answer = await hub_of(request).vault.put_secret(token_of(request), wanted)
    return json_response(answer, status)


async def list_secrets(request: web.Request) -> web.Response:
    page = page_query(request, "secrets")
    found, last = hub_of(request).vault.page_secrets(token_of(request), page.after, page.limit)
    return json_response({"secrets": found, "next_cursor": page.next_cursor(last)})


async def get_secret(request: web.Request) -> web.Response:
    hub, name, tenant = hub_of(request), _name(request), query_value(request, "tenant")
    return json_response(hub.vault.get_secret(token_of(request), name, tenant))


async def delete_secret(request: web.Request) -> web.Response:
    hub, name, tenant = hub_of(request), _name(request), query_value(request, "tenant")
    return json_response(await hub.vault.delete_secret(token_of(request), name, tenant))


async def _empty_body(request: web.Request) -> None:
    body = await read(request)
    if body.strip() in (b"", b"{}"):
        return
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ApiError(400, "bad_json", f"the body is not JSON: {exc}") from None
    if data != {}:
        raise ApiError(400, "bad_request", "this route takes no fields: send {} or nothing")


def _site_route(op: str) -> Handler:
    async def handler(request: web.Request) -> web.Response:
        await _empty_body(request)
        hub = hub_of(request)
        return json_response(
            await hub.vault.site_op(token_of(request), request.match_info["id"], op)
        )

    return handler


async def approve_unseal(request: web.Request) -> web.Response:
    await _empty_body(request)
    hub = hub_of(request)
    return json_response(
        await hub.vault.approve_unseal(token_of(request), request.match_info["id"])
    )


async def link_escrow_key(request: web.Request) -> web.Response:
    return json_response(hub_of(request).vault.escrow_key_info(site_of(request)))


async def link_escrow(request: web.Request) -> web.Response:
    hub = hub_of(request)
    return json_response(await hub.vault.upload_escrow(site_of(request), await read_json(request)))


async def link_unseal(request: web.Request) -> web.Response:
    key = vault.parse_ephemeral_key(await read_json(request))
    return json_response(await hub_of(request).vault.unseal_request(site_of(request), key))


_TENANT = Query(
    "tenant",
    "string",
    "the secret's tenant (default: the token's, or 'default')",
    pattern=ID_PATTERN,
    error="bad_tenant",
)

_NAME = Query("name", "string", "the secret's name", pattern=SECRET_NAME_PATTERN)

VAULT_ROUTES: tuple[Route, ...] = (
    Route("POST", "/v1/secrets", create_secret, "secrets.write",
          "Create a secret or a new version of it (operator+ of its tenant); it is sealed "
          "to each target site's key and sent in a secret.put delta (201 new, 200 update)",
          request="SecretRequest", response="Secret", status=201, also=(200,)),
    Route("GET", "/v1/secrets", list_secrets, "secrets.read",
          "The secrets the token's tenants can see: versions, target sites, per-site "
          "delivery state (never a value); paginated", response="SecretList",
          query=PAGE_QUERIES),
    Route("GET", "/v1/secrets/{name}", get_secret, "secrets.read",
          "One secret (never its value)", response="Secret", query=(_TENANT,),
          path_params=(_NAME,)),
    Route("DELETE", "/v1/secrets/{name}", delete_secret, "secrets.write",
          "Delete a secret (secret.delete delta to the sites that have it)",
          response="SecretDeleted", query=(_TENANT,), path_params=(_NAME,)),
    Route("POST", "/v1/sites/{id}/lockdown", _site_route("site.lockdown"), "fleet.lockdown",
          "Lock a site down (site.lockdown delta): it drops its keys, stops serving "
          "secrets and starts nothing until unlocked and unsealed", response="SiteOp"),
    Route("POST", "/v1/sites/{id}/unlock", _site_route("site.unlock"), "fleet.lockdown",
          "End a site's lock-down (site.unlock delta); it then needs an unseal",
          response="SiteOp"),
    Route("POST", "/v1/sites/{id}/secrets/rotate", _site_route("secrets.rotate"), "fleet.lockdown",
          "Rotate a site's data keys now (secrets.rotate delta)", response="SiteOp"),
    Route("POST", "/v1/sites/{id}/unseal", approve_unseal, "fleet.lockdown",
          "Approve for 10 minutes one unseal of a sealed site from the hub's escrow",
          response="UnsealApproval"),
    Route("GET", "/v1/link/escrow-key", link_escrow_key, "site",
          "The hub's escrow key signed by the fleet root key, and the site's escrow state",
          response="EscrowKey"),
    Route("POST", "/v1/link/escrow", link_escrow, "site",
          "Escrow the site's unseal key, sealed to the hub's escrow key",
          request="EscrowUpload", response="Object"),
    Route("POST", "/v1/link/unseal", link_unseal, "site",
          "The site's unseal key sealed to an ephemeral key, while an operator's approval "
          "holds (403 unseal_not_approved otherwise)", request="UnsealRequest",
          response="SealedKey"),
)  # fmt: skip
