"""The agent API's gate: who is calling, and whether the route's rule lets them (an adapter).

Runs before any handler and before any body is read: a refused request costs a header
parse, a hash and at most one read of the local state. A token that passed is
remembered by its SHA-256 (never the token itself) until the system table changes (a
token made or revoked) or it expires: a request with a known token costs one hash, and
a revocation still takes effect with the first request after this host applied it.
The caller is

* ``local`` on the root-only Unix socket (the file's mode is the authentication);
* ``token`` with a valid ``Authorization: Bearer moat1...`` (``meshorch.site.access``);
* ``peer`` with a valid host signature (``meshorch.state.peer_auth``) from a member;
* ``anonymous`` otherwise.

The decision is ``meshorch.site.authz.decide``. Join attempts are limited per source address
(a token bucket), so guessing tokens from the LAN is slow and cheap to refuse.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import orjson
from aiohttp import web

from meshorch.apps.records import host_protocols
from meshorch.site.access import RECORD_PREFIX, AccessRecord, AccessRefused, AccessToken
from meshorch.site.authz import ANONYMOUS, LOCAL, RULES, Caller, Rule, decide, route_key
from meshorch.state import peer_auth
from meshorch.state.ports import SiteState
from meshorch.state.protocol import FEATURES, site_protocol
from meshorch.state.tables import MEMBER_PREFIX, SYSTEM_TABLE, MemberRecord

logger = logging.getLogger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
_CALLER: web.RequestKey[Caller] = web.RequestKey("meshorch_caller", Caller)

JOIN_BURST = 10  # attempts a source may make at once
JOIN_PER_S = 0.5  # then one every 2 s
MAX_SOURCES = 4096  # sources remembered; the oldest is forgotten first
VERIFIED_TOKENS = 1024  # tokens remembered as verified; the oldest is forgotten first


@dataclass(frozen=True, slots=True)
class _Verified:
    """A token found valid, and what its validity was checked against."""

    caller: Caller
    expires_at: float | None
    access_changes: int  # the system table's change count then (see StateView.changes)


@dataclass
class JoinLimiter:
    """A token bucket per source address, bounded in memory."""

    burst: float = JOIN_BURST
    rate_per_s: float = JOIN_PER_S
    buckets: OrderedDict[str, tuple[float, float]] = field(default_factory=OrderedDict)

    def allow(self, source: str, now: float) -> bool:
        tokens, at = self.buckets.pop(source, (self.burst, now))
        tokens = min(self.burst, tokens + (now - at) * self.rate_per_s)
        allowed = tokens >= 1.0
        self.buckets[source] = (tokens - 1.0 if allowed else tokens, now)
        while len(self.buckets) > MAX_SOURCES:
            self.buckets.popitem(last=False)
        return allowed


class Guard:
    """The aiohttp middleware; ``bootstrap`` is the token given by file, if any."""

    def __init__(
        self,
        site: SiteState,
        bootstrap: AccessRecord | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.site = site
        self.bootstrap = bootstrap
        self.clock = clock
        self.joins = JoinLimiter()
        # SHA-256 of the token's text -> its verification: a request that repeats a valid
        # token skips the parse, the record's read and decoding.
        self._verified: dict[bytes, _Verified] = {}
        # (method, route) -> its rule: only routes that exist get here, so it stays small.
        self._rules: dict[tuple[str, str], Rule | None] = {}

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        route = request.match_info.route.resource
        if request.match_info.http_exception is not None or route is None:
            return await handler(request)  # 404 / 405 as aiohttp answers them
        method_route = (request.method, route.canonical)
        try:
            rule = self._rules[method_route]
        except KeyError:
            rule = self._rules[method_route] = RULES.get(route_key(*method_route))
        caller = self.caller(request)
        request[_CALLER] = caller
        tenant = None
        if rule is not None and rule.tenant_from == "query":
            tenant = request.query.get("tenant")
        elif rule is not None and rule.tenant_from == "path":
            tenant = request.match_info.get("tenant")
        decision = decide(rule, caller, tenant)
        if decision.allowed and rule is not None and rule.surface == "join":
            source = request.remote or "?"
            if caller.kind != "local" and not self.joins.allow(source, time.monotonic()):
                return _refusal(429, "too_many_attempts", "too many join attempts; wait")
        if not decision.allowed:
            peer_route = rule is not None and rule.surface == "peer"
            if peer_route and decision.status == 401 and not self._peer_auth_required():
                return await handler(request)
            return _refusal(decision.status, decision.code, decision.message)
        return await handler(request)

    def caller(self, request: web.Request) -> Caller:
        sock = request.transport.get_extra_info("socket") if request.transport else None
        if sock is not None and sock.family == socket.AF_UNIX:
            return LOCAL
        authorization = request.headers.get("Authorization", "")
        if authorization.startswith("Bearer "):
            return self._token_caller(authorization[len("Bearer ") :].strip())
        host_id = peer_auth.claimed_host(request.headers)
        if host_id is not None:
            return self._peer_caller(request, host_id)
        return ANONYMOUS

    def _token_caller(self, text: str) -> Caller:
        now = self.clock()
        # Any write to the system table (a token made or revoked, a snapshot installed)
        # changes the count: every remembered token is then checked again.
        changes = self.site.view.changes(SYSTEM_TABLE)
        digest = hashlib.sha256(text.encode()).digest()
        known = self._verified.get(digest)
        if (
            known is not None
            and known.access_changes == changes
            and (known.expires_at is None or now < known.expires_at)
        ):
            return known.caller
        caller, expires_at = self._verify(text, now)
        if caller is ANONYMOUS:
            self._verified.pop(digest, None)
            return caller
        if len(self._verified) >= VERIFIED_TOKENS:
            del self._verified[next(iter(self._verified))]
        self._verified[digest] = _Verified(caller, expires_at, changes)
        return caller

    def _verify(self, text: str, now: float) -> tuple[Caller, float | None]:
        """The token's caller and expiry against the access records; ANONYMOUS if invalid."""
        try:
            token = AccessToken.parse(text)
        except AccessRefused:
            return ANONYMOUS, None
        record = self.bootstrap
        if record is None or record.token_id != token.token_id:
            stored = self.site.view.get(SYSTEM_TABLE, RECORD_PREFIX + token.token_id.encode())
            try:
                record = None if stored is None else AccessRecord.decode(stored.value)
            except (ValueError, KeyError, TypeError):
                record = None
        if record is None or not record.matches(token.secret, now):
            return ANONYMOUS, None
        return Caller("token", record.role, record.tenant, record.token_id), record.expires_at

    def _peer_caller(self, request: web.Request, host_id: str) -> Caller:
        stored = self.site.view.get(SYSTEM_TABLE, MEMBER_PREFIX + host_id.encode())
        try:
            member = None if stored is None else MemberRecord.decode(stored.value)
        except (ValueError, KeyError, TypeError):
            member = None
        if member is None or not member.peer_key:
            return ANONYMOUS
        try:
            peer_auth.verify(
                member.peer_key, request.headers, request.method, request.path_qs, self.clock()
            )
        except peer_auth.PeerAuthError as exc:
            logger.info("refused a peer request claiming %s: %s", host_id, exc)
            return ANONYMOUS
        return Caller("peer", name=host_id)

    def _peer_auth_required(self) -> bool:
        """While a host of the site runs a release that does not sign, peers go unsigned."""
        protocols = host_protocols(self.site.view)
        return site_protocol(protocols) >= FEATURES["peer_auth"]


def caller_of(request: web.Request) -> Caller:
    caller = request.get(_CALLER)
    return caller if isinstance(caller, Caller) else ANONYMOUS


def _refusal(status: int, code: str, message: str) -> web.Response:
    body = orjson.dumps({"error": {"code": code, "message": message}})
    headers = {"WWW-Authenticate": "Bearer"} if status == 401 else {}
    return web.Response(status=status, body=body, content_type="application/json", headers=headers)
