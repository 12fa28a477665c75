"""The site's HTTP client of the fleet link (docs/fleet-link.md), one per site.

It knows nothing of agents or Raft: give it the hub URL, the site id and the site's
signing key; it enrolls, fetches deltas (long-poll), sends reports and asks for its gossip
membership (certificate, the hub's gossip address, peers), every request but enrollment
signed with ``meshorch.fleet.link_auth.sign_request``. Deltas come back as envelope bytes, ready
for ``meshorch.fleet.delta.verify_batch``.

Exceptions::

    LinkError                   root (a MeshorchError)
    ├── HubUnreachable          no answer: connection refused or reset, timeout, 5xx
    │   └── HubNotTrusted       TLS: not the pinned certificate, or not signed by the CA
    └── RemoteLinkError         the hub answered, but not what the site asked for
        ├── LinkRefused         a 4xx; ``status`` and ``code`` say which
        │   └── LinkUnauthorized    401 bad_site_signature (unknown site, wrong key, clock)
        └── BadHubAnswer        a 2xx that is not the documented JSON
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import ipaddress
import logging
import ssl
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from nacl.signing import SigningKey
from yarl import URL

from meshorch.errors import MeshorchError
from meshorch.fleet.link_auth import sign_request, url_host
from meshorch.fleet.report_stream import QUIET_PROTOCOL, STREAM_PATH, ReportStream, StreamClosed
from meshorch.http_body import read_limited

logger = logging.getLogger(__name__)

DEFAULT_WAIT_S = 20.0
MAX_WAIT_S = 30.0
REQUEST_TIMEOUT_S = 10.0
MAX_ANSWER_BYTES = 512 * 1024 * 1024
# Reports go on one WebSocket per site (docs/fleet-link.md, meshorch.fleet.report_stream),
# signed once when it opens; a hub that refuses the upgrade (an older hub: 404) is asked
# again after this long, its reports meanwhile sent with POST.
NO_STREAM_S = 300.0
MAX_STREAM_ANSWER_BYTES = 64 * 1024
STREAM_CLOSE_S = 2.0  # for the hub's answer to a close
# A report the replica did not take on an open stream whose path is sound (a 5xx answer:
# a follower whose leader is slow or cut off; no answer in time while the hub's host
# acknowledged every byte: a busy replica) keeps the stream. The site moves to the next
# replica after this many in a row. Dropping the stream at the first one sent a saturated
# hub a burst of new TLS connections and signed upgrades, which kept it saturated (at
# 10,000 sites here: half of them never linked). A cut path (``ReportStream.stalled``) is
# dropped at once: a new connection is what finds the hub after a heal.
STREAM_FAIL_OVER_AFTER = 3
# A quiet report (``report(..., quiet=True)``) is not waited for, unless no answer came on
# the stream for this long: the hub answers only changes. A cut path is found by the
# report after the cut (``ReportStream.stalled``); where the kernel cannot say, every
# report is asked.
QUIET_MAX_S = 30.0


MAX_RELEASE_BYTES = 64 * 1024 * 1024


class LinkError(MeshorchError):
    """Root of the fleet link client's errors."""


class HubUnreachable(LinkError):
    """The hub did not answer (network error, timeout, or a 5xx)."""


class HubNotTrusted(HubUnreachable):
    """The hub's TLS certificate is not the one pinned (``--hub-fingerprint``) or not
    signed by the hub's CA (``--hub-ca``): nothing was sent to it."""


def normalize_fingerprint(text: str) -> str:
    """A certificate's SHA-256 fingerprint as 64 lowercase hex digits; accepts a
    ``sha256:`` prefix and colons (``AB:CD:...``); ValueError otherwise."""
    value = text.strip().lower().removeprefix("sha256:").replace(":", "")
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise ValueError("a SHA-256 fingerprint is 64 hex digits (colons allowed)")
    return value


def certificate_fingerprint(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


@dataclass(frozen=True, slots=True)
class HubTrust:
    """How the site checks the hub's TLS certificate: its pinned SHA-256 ``fingerprint``
    (a self-signed hub), or the ``ca_pem`` that signed it; neither: the system's CAs."""

    fingerprint: str | None = None
    ca_pem: str | None = None

    def ssl_for(self, url: URL) -> aiohttp.Fingerprint | ssl.SSLContext | bool:
        if url.scheme != "https":
            return True  # plain HTTP: the hub runs with --insecure-http
        if self.fingerprint is not None:
            return aiohttp.Fingerprint(bytes.fromhex(self.fingerprint))
        if self.ca_pem is not None:
            return ssl.create_default_context(cadata=self.ca_pem)
        return True


class RemoteLinkError(LinkError):
    """The hub answered something other than what was asked."""


class LinkRefused(RemoteLinkError):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"hub refused ({status} {code}): {message}")
        self.status = status
        self.code = code
        self.message = message


class LinkUnauthorized(LinkRefused):
    """401: the hub does not know this site, or not this key (or the clocks differ)."""


class BadHubAnswer(RemoteLinkError):
    """A successful answer that is not the documented JSON."""


Address = tuple[str, int]
GOSSIP_PRESETS = ("wan", "lan", "local")
MAX_GOSSIP_PEERS = 256


@dataclass(frozen=True, slots=True)
class GossipInfo:
    """``GET /v1/link/gossip``: this site's gossip certificate and whom to talk to.

    ``hub_addr``'s host may be unspecified (``0.0.0.0``, ``::``) when the hub listens on
    every address and advertises none: the site then uses the host of the hub's URL.
    """

    cert: bytes
    hub_id: str
    hub_addr: Address
    preset: str
    peers: Mapping[str, Address] = field(default_factory=dict)


def parse_address(text: object) -> Address:
    """``IP:PORT`` or ``[IPv6]:PORT`` as (host, port); ValueError otherwise."""
    if not isinstance(text, str):
        raise ValueError("an address is a string IP:PORT")
    host, sep, port = text.rpartition(":")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    if not sep or not port.isascii() or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text[:80]!r} is not IP:PORT")
    ipaddress.ip_address(host)
    return host, int(port)


def format_address(addr: Address) -> str:
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_gossip_info(data: Mapping[str, Any]) -> GossipInfo:
    """The documented answer, or BadHubAnswer; peer entries that are not valid are skipped."""
    try:
        cert = base64.b64decode(str(data["cert"]), validate=True)
        hub = data["hub"]
        hub_id, hub_addr = str(hub["id"]), parse_address(hub["addr"])
        preset = data.get("preset", "wan")
    except (KeyError, TypeError, ValueError, binascii.Error) as exc:
        raise BadHubAnswer(f"not a gossip answer: {exc}") from None
    if preset not in GOSSIP_PRESETS or not hub_id:
        raise BadHubAnswer(f"not a gossip answer: preset {preset!r}, hub id {hub_id!r}")
    peers: dict[str, Address] = {}
    raw_peers = data.get("peers", [])
    for entry in raw_peers[:MAX_GOSSIP_PEERS] if isinstance(raw_peers, list) else []:
        try:
            peers[str(entry["id"])] = parse_address(entry["addr"])
        except (KeyError, TypeError, ValueError):
            continue
    return GossipInfo(cert, hub_id, hub_addr, str(preset), peers)


def first_replica(site_id: str, replicas: int) -> int:
    """Which of a replicated hub's URLs a site calls first: spread over the replicas by
    its id (each replica carries its share of the reports and long-polls, not all of them
    the first one listed), and the same after a restart."""
    digest = hashlib.blake2b(site_id.encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") % replicas


class LinkClient:
    """``async with LinkClient(hub, site_id, key) as client: head, raws = await client.fetch(0)``.

    One aiohttp session; pass ``session`` to share one (it is then not closed here).
    """

    def __init__(
        self,
        hub_url: str,
        site_id: str,
        key: SigningKey,
        *,
        session: aiohttp.ClientSession | None = None,
        clock: Callable[[], float] = time.time,
        request_timeout_s: float = REQUEST_TIMEOUT_S,
        trust: HubTrust | None = None,
    ) -> None:
        # A replicated hub: several URLs, comma-separated; a failed call moves to the next.
        self.hub_urls = [url.strip().rstrip("/") for url in hub_url.split(",") if url.strip()]
        if not self.hub_urls:
            raise ValueError("no hub URL")
        self.site_id = site_id
        self.key = key
        self.clock = clock
        self.request_timeout_s = request_timeout_s
        self.site_head: int | None = None  # from the last report's answer (``report``)
        self.held = False  # the hub holds this site (its last poll's or report's answer)
        self.trust = trust or HubTrust()
        self._use(first_replica(site_id, len(self.hub_urls)))
        self._session = session
        self._own_session = session is None
        self._stream: ReportStream | None = None
        self._stream_lock = asyncio.Lock()  # one report on it at a time
        self._last_answer: dict[str, Any] = {}  # the hub's last 200 answer to a report
        self._no_stream_until: dict[str, float] = {}  # by hub URL (monotonic)
        self._closing: set[asyncio.Task[Any]] = set()

    def _use(self, index: int) -> None:
        self._current = index % len(self.hub_urls)
        self.hub_url = self.hub_urls[self._current]
        self._base = URL(self.hub_url)
        # The hub's address as this site knows it: signed, and sent as the Host header.
        self._host = url_host(self.hub_url)
        self._ssl = self.trust.ssl_for(self._base)

    def _fail_over(self) -> None:
        """The next call goes to the next replica of a replicated hub (if several)."""
        if len(self.hub_urls) > 1:
            self._use(self._current + 1)

    async def __aenter__(self) -> LinkClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._drop_stream()
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        if self._own_session and self._session is not None:
            await self._session.close()
        self._session = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(
                # 4 for requests, and the report stream's
                connector=aiohttp.TCPConnector(limit=5),
                raise_for_status=False,
            )
            self._own_session = True
        return self._session

    # -- the calls -------------------------------------------------------------------

    async def enroll(self, token: str) -> str:
        """Bind this site's public key at the hub with a single-use token; returns the id."""
        body = orjson.dumps(
            {"site": self.site_id, "public_key": self.key.verify_key.encode().hex(), "token": token}
        )
        answer = await self._request("POST", "/v1/link/enroll", "", body, signed=False)
        site = answer.get("site")
        if not isinstance(site, str):
            raise BadHubAnswer(f"enroll answer without 'site': {answer!r}")
        return site

    async def fetch(
        self, after: int, wait_s: float = DEFAULT_WAIT_S, limit: int | None = None
    ) -> tuple[int, list[bytes]]:
        """Deltas after version ``after`` (long-poll up to ``wait_s``): (head, envelopes)."""
        wait = max(0, min(int(wait_s), int(MAX_WAIT_S)))
        query = f"after={int(after)}&wait={wait}"
        if limit is not None:
            query += f"&limit={int(limit)}"
        answer = await self._request(
            "GET", "/v1/link/deltas", query, b"", timeout_s=wait + self.request_timeout_s
        )
        head, deltas = answer.get("head"), answer.get("deltas")
        if type(head) is not int or not isinstance(deltas, list):
            raise BadHubAnswer("a deltas answer is {'head': int, 'deltas': [...]}")
        self.held = answer.get("held") is True
        # The signature covers the body string, which re-encoding keeps.
        return head, [orjson.dumps(envelope) for envelope in deltas]

    async def snapshot(self, after: int) -> tuple[bytes, list[bytes]]:
        """This site's signed snapshot at the hub's head and the root rotations after
        version ``after`` (``GET /v1/link/snapshot``): (envelope, rotation envelopes), for
        ``meshorch.fleet.snapshot.verify_snapshot``."""
        answer = await self._request(
            "GET", "/v1/link/snapshot", f"after={int(after)}", b"", timeout_s=60.0
        )
        snapshot, rotations = answer.get("snapshot"), answer.get("rotations")
        if not isinstance(snapshot, dict) or not isinstance(rotations, list):
            raise BadHubAnswer("a snapshot answer is {'snapshot': {...}, 'rotations': [...]}")
        return orjson.dumps(snapshot), [orjson.dumps(r) for r in rotations]

    async def report(
        self, report: dict[str, Any], timeout_s: float | None = None, *, quiet: bool = False
    ) -> int:
        """Send a site report (on the site's report stream, else with POST); returns the
        hub's head version. ``quiet``: a routine report whose answer the site need not
        wait for; on a hub that answers only changes it returns at once, with what the
        hub last answered (or answered since), and the error of an earlier quiet report
        is raised by the next call."""
        body = orjson.dumps(report)
        answer = await self._report_on_stream(body, timeout_s or self.request_timeout_s, quiet)
        if answer is None:
            answer = await self._request("POST", "/v1/link/report", "", body, timeout_s=timeout_s)
        self._last_answer = answer
        head, site_head = answer.get("head"), answer.get("site_head")
        if type(head) is not int:
            raise BadHubAnswer(f"report answer without an integer 'head': {answer!r}")
        # A hub serving per-site views says the newest version that concerns this site:
        # its long-poll answers at once only for those (docs/fleet-link.md).
        self.site_head = site_head if type(site_head) is int else None
        self.held = answer.get("held") is True
        return head

    async def gossip_info(self) -> GossipInfo:
        """This site's gossip certificate, the hub's gossip address and the peers' addresses;
        LinkRefused 404 ``gossip_disabled`` when the hub does not gossip."""
        return parse_gossip_info(await self._request("GET", "/v1/link/gossip", "", b""))

    async def escrow_key(self) -> dict[str, Any]:
        """The hub's escrow key with its root-key signature and this site's escrow state
        (``GET /v1/link/escrow-key``; ``meshorch.fleet.escrow.verify_escrow_key`` checks it)."""
        return await self._request("GET", "/v1/link/escrow-key", "", b"")

    async def escrow(self, sealed: str, ssk_public: str) -> dict[str, Any]:
        """Escrow the site's unseal key (base64 of a SealedBox to the escrow key)."""
        body = orjson.dumps({"sealed": sealed, "ssk_public": ssk_public})
        return await self._request("POST", "/v1/link/escrow", "", body)

    async def unseal(self, public_key: str) -> str:
        """The site's unseal key sealed to ``public_key`` (hex X25519), base64; LinkRefused
        403 ``unseal_not_approved`` unless an operator approved it at the hub."""
        answer = await self._request(
            "POST", "/v1/link/unseal", "", orjson.dumps({"public_key": public_key})
        )
        sealed = answer.get("sealed_key")
        if not isinstance(sealed, str):
            raise BadHubAnswer("an unseal answer is {'sealed_key': base64}")
        return sealed

    async def stream_positions(self) -> dict[str, int]:
        """The last sequence the hub stored of each of this site's streams."""
        return _positions(await self._request("GET", "/v1/link/streams", "", b""))

    async def push_streams(
        self, streams: list[dict[str, Any]]
    ) -> tuple[dict[str, int], dict[str, str]]:
        """Forward stream chunks (``docs/streams.md``); returns (positions, refused): the
        hub's position of each stream and a message for each stream it refused."""
        answer = await self._request(
            "POST", "/v1/link/streams", "", orjson.dumps({"streams": streams})
        )
        refused = answer.get("refused", {})
        if not isinstance(refused, dict) or not all(isinstance(v, str) for v in refused.values()):
            raise BadHubAnswer("a streams answer's 'refused' maps streams to messages")
        return _positions(answer), refused

    async def rotate_key(self, body: bytes, key: SigningKey | None = None) -> str:
        """Move this site to a new key (``meshorch.fleet.sitekey.rotation_body``), the request
        signed by ``key`` (default: the client's); returns the key the hub now holds."""
        answer = await self._request("POST", "/v1/link/key", "", body, key=key)
        public_key = answer.get("public_key")
        if not isinstance(public_key, str):
            raise BadHubAnswer("a key rotation answer is {'public_key': hex, 'rotated': bool}")
        return public_key

    async def fetch_release(self, digest: str) -> bytes:
        """An agent release's wheel by its sha256 (``GET /v1/link/releases/{digest}``)."""
        path = f"{self._base.path.rstrip('/')}/v1/link/releases/{digest}"
        headers = sign_request(
            self.key, self.site_id, "GET", path, b"", self.clock(), host=self._host
        )
        url = self._base.with_path(path, encoded=True)
        timeout = aiohttp.ClientTimeout(total=300)
        try:
            async with self._client().get(
                url, headers=headers, timeout=timeout, ssl=self._ssl
            ) as response:
                data = await read_limited(response.content, MAX_RELEASE_BYTES)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise self._unreachable(f"GET release {digest[:12]}", exc) from exc
        if status != 200 or len(data) > MAX_RELEASE_BYTES:
            raise LinkRefused(status, "release", f"the hub answered {status} for {digest[:12]}")
        return data

    # -- the report stream ---------------------------------------------------------------

    async def _report_on_stream(
        self, body: bytes, timeout_s: float, quiet: bool
    ) -> dict[str, Any] | None:
        """The hub's answer to a report sent on the stream; None when this replica offers
        no stream or closed it (the report then goes with POST, which says why if the
        hub refuses it). Errors as ``_request`` raises them."""
        if time.monotonic() < self._no_stream_until.get(self.hub_url, 0.0):
            return None
        async with self._stream_lock:
            what = f"report on {self.hub_url}{STREAM_PATH}"
            stream: ReportStream | None = None
            number = 0
            try:
                async with asyncio.timeout(timeout_s):
                    stream = await self._open_stream()
                    if stream is not None and stream.stalled():
                        # The last reports never reached the hub's host: the path is cut.
                        logger.info("report stream to %s stalled: reconnecting", self.hub_url)
                        self._drop_stream_soon()
                        self._fail_over()
                        what = f"report on {self.hub_url}{STREAM_PATH}"
                        stream = await self._open_stream()
                    if stream is None:
                        return None
                    answer = stream.take_news()  # an earlier quiet report's error: raised
                    if answer is not None and answer[0] == 200:
                        self._last_answer, answer = answer[1], None
                    if answer is None:
                        number, waiter = await stream.send(body, quiet=not self._ask(stream, quiet))
                        if waiter is None:
                            return self._last_answer
                        answer = await waiter
            except TimeoutError as exc:
                if stream is None or not number:
                    why = f"not sent within {timeout_s:g} s"
                elif self._outwaits_silence(stream):
                    stream.give_up(number)  # the stream stays: a late answer is news
                    raise HubUnreachable(f"{what}: no answer within {timeout_s:g} s") from exc
                elif stream.watched:
                    why = f"no answer within {timeout_s:g} s: the path is cut"
                else:
                    why = f"no answer within {timeout_s:g} s"
                # Not sent, or a cut path (or one the kernel says nothing of): a new
                # connection, at the next replica, is what finds out.
                self._drop_stream_soon()
                self._fail_over()
                raise HubUnreachable(f"{what}: {why}") from exc
            except StreamClosed as exc:
                await self._drop_stream()
                if exc.malformed:
                    raise BadHubAnswer(f"{what}: {exc}") from None
                return None  # closed by the hub (stopping, moved, key changed)
            except (aiohttp.ClientError, OSError) as exc:
                self._drop_stream_soon()
                unreachable = self._unreachable(what, exc)
                self._fail_over()
                raise unreachable from exc
            except BaseException:
                if stream is not None and number:
                    stream.give_up(number)  # cancelled while waiting: the stream is sound
                else:
                    self._drop_stream_soon()  # cancelled while sending: it may be cut
                raise
            return await self._stream_answer(stream, answer, what)

    def _ask(self, stream: ReportStream, quiet: bool) -> bool:
        """Whether a report waits for its answer: every one but a quiet report on a stream
        that has answered within QUIET_MAX_S and whose cut the kernel would tell."""
        if not quiet or stream.sent == 0 or not self._last_answer:
            return True
        if time.monotonic() - stream.answered_at >= QUIET_MAX_S:
            return True
        return not stream.watched

    async def _stream_answer(
        self, stream: ReportStream, answer: tuple[int, dict[str, Any]], what: str
    ) -> dict[str, Any]:
        """A report's answer read from the stream: its body, or the error it says."""
        status, body = answer
        if status >= 500:
            if not self._missed(stream):
                await self._drop_stream()
                self._fail_over()
            raise HubUnreachable(f"{what}: hub answered {status} ({_error_of(body, status)[0]})")
        stream.misses = 0
        if status >= 400:
            code, text = _error_of(body, status)
            raise (LinkUnauthorized if status == 401 else LinkRefused)(status, code, text)
        return body

    def _outwaits_silence(self, stream: ReportStream) -> bool:
        """Whether a stream whose report went unanswered stays: its path is sound (the
        hub's host acknowledged every byte: a busy replica) and this is not the
        STREAM_FAIL_OVER_AFTER-th report in a row it did not take."""
        return stream.stalled() is False and self._missed(stream)

    @staticmethod
    def _missed(stream: ReportStream) -> bool:
        """Count a report the stream's replica did not take; False when that makes
        STREAM_FAIL_OVER_AFTER in a row: the caller drops the stream and fails over."""
        stream.misses += 1
        return stream.misses < STREAM_FAIL_OVER_AFTER

    async def _open_stream(self) -> ReportStream | None:
        """The stream to the current replica, opened (signed) if it is not; None when
        the replica refuses the upgrade with a 4xx (remembered for NO_STREAM_S)."""
        stream = self._stream
        if stream is not None and not stream.closed and stream.url == self.hub_url:
            return stream
        await self._drop_stream()
        full_path = self._base.path.rstrip("/") + STREAM_PATH
        headers = sign_request(
            self.key, self.site_id, "GET", full_path, b"", self.clock(), host=self._host
        )
        try:
            ws = await self._client().ws_connect(
                self._base.with_path(full_path, encoded=True),
                headers=headers,
                ssl=self._ssl,
                max_msg_size=MAX_STREAM_ANSWER_BYTES,
                timeout=aiohttp.ClientWSTimeout(ws_close=STREAM_CLOSE_S),
                protocols=(QUIET_PROTOCOL,),
            )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status >= 500:
                raise
            logger.info(
                "hub %s refused a report stream (%d): reports go with POST",
                self.hub_url,
                exc.status,
            )
            self._no_stream_until[self.hub_url] = time.monotonic() + NO_STREAM_S
            return None
        self._stream = ReportStream(ws, self.hub_url)
        return self._stream

    async def _drop_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is not None:
            await stream.close()

    def _drop_stream_soon(self) -> None:
        """``_drop_stream`` from a task that may be cancelled: closed in the background."""
        stream, self._stream = self._stream, None
        if stream is not None:
            task = asyncio.get_running_loop().create_task(stream.close())
            self._closing.add(task)
            task.add_done_callback(self._closing.discard)

    # -- plumbing ----------------------------------------------------------------------

    async def _request(
        self,
        method: str,
        path: str,
        query: str,
        body: bytes,
        *,
        signed: bool = True,
        timeout_s: float | None = None,
        key: SigningKey | None = None,
    ) -> dict[str, Any]:
        full_path = self._base.path.rstrip("/") + path
        path_qs = f"{full_path}?{query}" if query else full_path
        url = self._base.with_path(full_path, encoded=True)
        if query:
            url = URL(f"{url}?{query}", encoded=True)
        headers = {"Content-Type": "application/json"}
        if signed:
            headers.update(
                sign_request(
                    key or self.key,
                    self.site_id,
                    method,
                    path_qs,
                    body,
                    self.clock(),
                    host=self._host,
                )
            )
        timeout = aiohttp.ClientTimeout(total=timeout_s or self.request_timeout_s)
        try:
            async with self._client().request(
                method, url, data=body or None, headers=headers, timeout=timeout, ssl=self._ssl
            ) as response:
                raw = await read_limited(response.content, MAX_ANSWER_BYTES)
                status = response.status
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            unreachable = self._unreachable(f"{method} {self.hub_url}{path}", exc)
            self._fail_over()
            raise unreachable from exc
        except asyncio.CancelledError:
            raise
        if status >= 500:
            self._fail_over()
            raise HubUnreachable(f"{method} {path}: hub answered {status}")
        try:
            data = orjson.loads(raw) if raw else None
        except orjson.JSONDecodeError:
            data = None
        if status >= 400:
            code, message = _error_of(data, status)
            cls = LinkUnauthorized if status == 401 else LinkRefused
            raise cls(status, code, message)
        if not isinstance(data, dict):
            raise BadHubAnswer(f"{method} {path}: the answer is not a JSON object")
        return data

    def _unreachable(self, what: str, exc: BaseException) -> HubUnreachable:
        if isinstance(exc, aiohttp.ServerFingerprintMismatch):
            return HubNotTrusted(
                f"{what}: the hub at {self._host} presents a TLS certificate with SHA-256 "
                f"fingerprint {exc.got.hex()}, not the pinned {exc.expected.hex()}: nothing "
                "was sent. If the hub's certificate was replaced on purpose, give the site "
                "the new fingerprint (printed by `meshorch hub` at start) with "
                'PUT /v1/fleet/link {..., "hub_fingerprint": ...}; otherwise something '
                "else answers at that address"
            )
        if isinstance(exc, aiohttp.ClientConnectorCertificateError | ssl.SSLCertVerificationError):
            return HubNotTrusted(
                f"{what}: the hub's TLS certificate is not trusted ({exc}): pin its "
                "fingerprint (--hub-fingerprint) or give the CA that signed it (--hub-ca)"
            )
        return HubUnreachable(f"{what}: {exc!r}")


def _positions(answer: dict[str, Any]) -> dict[str, int]:
    positions = answer.get("positions")
    if not isinstance(positions, dict) or not all(type(v) is int for v in positions.values()):
        raise BadHubAnswer("a streams answer is {'positions': {stream: last sequence}}")
    return positions


def _error_of(data: object, status: int) -> tuple[str, str]:
    if isinstance(data, dict) and isinstance(data.get("error"), dict):
        error = data["error"]
        return str(error.get("code", status)), str(error.get("message", ""))
    return str(status), ""
