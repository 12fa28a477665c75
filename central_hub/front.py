"""The front of a hub replica: every request, to whichever replica is the leader.

Each replica of a replicated hub (``central_hub.replica``) listens on its public address
with this front. The leader's hub (its API, site link, dashboard) runs inside the leader
replica; the front of the leader hands requests to its application in-process (no second
HTTP hop), the front of a follower forwards them to the leader's front over HTTPS.
Operators and sites may therefore use any replica, and fail over between them (like
Consul's servers, which forward to their leader).

Trust: the hub limits failed authentications per source address, so the address of the
client travels with a forwarded request in ``X-Meshorch-Client``, authenticated with a key
every replica derives from the KEK (``client_header``/``trusted_client``). A header that
does not verify is dropped: a client cannot choose the address it is counted under.

Some requests a replica answers itself (``handlers``, given by the replica): a follower
answers the sites' reports (``central_hub.relay``) and their long-polls for deltas
(``central_hub.replica_polls``, from its replicated log: the leader holds only the polls of
the sites connected to it), the leader takes the followers' batches of reports. What such
a handler does not answer (e.g. a held site's poll) is forwarded like any request.

A site request (``X-Meshorch-Site``) whose signed ``Host`` names another replica is
refused (421 ``misdirected_request``): a request captured at one replica cannot be
replayed to another, whose replay cache never saw it.

Bounded: a request body larger than the hub's limit is refused here (413) before anything
is forwarded; a request already forwarded by a replica is never forwarded again (503
``no_leader`` instead of a loop); without a known leader, 503 ``no_leader`` with
``Retry-After``.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import logging
from collections.abc import Awaitable, Callable, Mapping

import aiohttp
from aiohttp import web

from central_hub.routing import error_response
from meshorch.fleet.link_auth import SITE_HEADER
from meshorch.http_body import read_limited

logger = logging.getLogger(__name__)

CLIENT_HEADER = "X-Meshorch-Client"
# On every answer of a replicated hub: the Raft address of the replica whose hub answered.
SERVED_BY_HEADER = "X-Meshorch-Served-By"
# Hop-by-hop headers (RFC 9110 7.6.1) and what the proxy sets itself.
_NOT_FORWARDED = frozenset(
    {
        "connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
        "trailer", "transfer-encoding", "upgrade", "content-length", CLIENT_HEADER.lower(),
    }
)  # fmt: skip
# A long-poll forwarded to the leader waits there up to 30 s; forwarded reads may take that.
UPSTREAM_READ_S = 120.0
RETRY_AFTER_S = "1"

# Where a request goes: (base URL, TLS setting for aiohttp), None when no leader is known.
Target = tuple[str, "aiohttp.Fingerprint | bool"]
# A request the replica answers itself: its answer, the body it read (to forward), or
# None (not its own: handled as any other, its body unread).
Handler = Callable[[web.Request], Awaitable["web.StreamResponse | bytes | None"]]


def forwarding_key(kek: bytes) -> bytes:
    """The key replicas authenticate forwarded client addresses with."""
    return hashlib.blake2b(kek, digest_size=32, person=b"meshorch-fwd").digest()


def client_header(key: bytes, address: str) -> str:
    tag = hmac.new(key, address.encode(), hashlib.sha256).hexdigest()
    return f"{address} {tag}"


def trusted_client(key: bytes, header: str | None) -> str | None:
    """The client address ``header`` carries, if the key authenticates it."""
    if not header or len(header) > 200:
        return None
    address, _, tag = header.partition(" ")
    try:
        ipaddress.ip_address(address)
    except ValueError:
        return None
    expected = hmac.new(key, address.encode(), hashlib.sha256).hexdigest()
    return address if hmac.compare_digest(tag, expected) else None


def forwarded_client(key: bytes) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Middleware of the hub behind a front: the request's source is the address the
    front authenticated (a request without one keeps its own)."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        address = trusted_client(key, request.headers.get(CLIENT_HEADER))
        if address is not None:
            request = request.clone(remote=address)
        return await handler(request)

    return middleware


def _error(status: int, code: str, message: str) -> web.Response:
    response = error_response(status, code, message)
    if status == 503:
        response.headers["Retry-After"] = RETRY_AFTER_S
    return response


class Front:
    """The front's one handler (module docstring). ``route`` answers where a request
    goes (the leader's URL, or this replica's hub application), and whether that is this
    replica's own hub."""

    def __init__(
        self,
        key: bytes,
        route: Callable[[], tuple[Target | web.Application | None, bool]],
        max_body_bytes: int,
        name: str = "",
        handlers: Mapping[tuple[str, str], Handler] | None = None,
        other_hosts: frozenset[str] = frozenset(),
    ) -> None:
        """``handlers``: by (method, path); ``other_hosts``: the other replicas'
        ``host:port`` as sites sign them."""
        self._key = key
        self._name = name
        self._handlers = handlers or {}
        self._other_hosts = other_hosts
        self._route = route
        self._max_body = max_body_bytes
        self._session: aiohttp.ClientSession | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self._max_body)
        app.router.add_route("*", "/{tail:.*}", self.forward)
        app.on_cleanup.append(self._close)
        return app

    async def _close(self, _app: web.Application) -> None:
        if self._session is not None:
            await self._session.close()

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=0), auto_decompress=False
            )
        return self._session

    async def forward(self, request: web.Request) -> web.StreamResponse:
        forwarded = trusted_client(self._key, request.headers.get(CLIENT_HEADER))
        body: bytes | None = None
        if forwarded is None:
            if SITE_HEADER in request.headers and request.host.lower() in self._other_hosts:
                return _error(
                    421,
                    "misdirected_request",
                    f"this request is signed for the hub replica at {request.host[:100]!r}, "
                    "not this one: send it there",
                )
            handler = self._handlers.get((request.method, request.path))
            if handler is not None:
                got = await handler(request)
                if isinstance(got, web.StreamResponse):
                    return got
                body = got
        target, local = self._route()
        if target is None or (forwarded is not None and not local):
            return _error(503, "no_leader", "no hub replica is the leader right now: retry")
        if isinstance(target, web.Application):
            if body is not None:  # read for forwarding, and this replica leads meanwhile
                return _error(503, "no_leader", "the hub's leader changed: retry")
            # This replica's own hub: no second HTTP hop (its routes bound their bodies);
            # a follower's authenticated client address is taken by its middleware.
            response = await target._handle(request)
            if self._name and not response.prepared:
                response.headers[SERVED_BY_HEADER] = self._name
            return response
        if body is None:
            body = await read_limited(request.content, self._max_body)
        if len(body) > self._max_body:
            return _error(413, "body_too_large", f"the body exceeds {self._max_body} bytes")
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED}
        headers[CLIENT_HEADER] = client_header(self._key, forwarded or request.remote or "")
        base, tls = target
        timeout = aiohttp.ClientTimeout(total=None, connect=5.0, sock_read=UPSTREAM_READ_S)
        answer: web.StreamResponse | None = None
        try:
            async with self._client().request(
                request.method,
                base + request.rel_url.raw_path_qs,
                data=body or None,
                headers=headers,
                ssl=tls,
                timeout=timeout,
                allow_redirects=False,
            ) as upstream:
                answer = web.StreamResponse(status=upstream.status, reason=upstream.reason)
                for name, value in upstream.headers.items():
                    if name.lower() not in _NOT_FORWARDED:
                        answer.headers.add(name, value)
                if local and self._name:
                    answer.headers[SERVED_BY_HEADER] = self._name
                if upstream.headers.get("Content-Length") is not None:
                    answer.content_length = int(upstream.headers["Content-Length"])
                await answer.prepare(request)
                async for chunk in upstream.content.iter_any():
                    await answer.write(chunk)
                await answer.write_eof()
                return answer
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            logger.info(
                "forwarding %s %s to %s failed: %s", request.method, request.path, base, exc
            )
            if answer is not None and answer.prepared:
                return answer  # cut short: the client sees the connection end
            return _error(503, "leader_unreachable", "the hub's leader did not answer: retry")
