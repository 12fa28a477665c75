"""A small hub for tests: the link endpoints of docs/fleet-link.md over envelopes signed
here with a real root key (a relay, as far as the site is concerned)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import orjson
from aiohttp import web
from nacl.signing import SigningKey

from meshorch.fleet.delta import ALL_SITES, GENESIS_HASH, Delta, Target, key_id, next_delta, sign
from meshorch.fleet.link_auth import LinkAuthError, claimed_site, verify_request


class StubHub:
    def __init__(self, fleet: str, root: SigningKey, port: int = 0) -> None:
        self.fleet = fleet
        self.signers: list[SigningKey] = [root]
        self.port = port
        self.envelopes: list[bytes] = []
        self.head_hash = GENESIS_HASH
        self.site_keys: dict[str, str] = {}
        self.tokens: set[str] = set()
        self.reports: list[dict[str, Any]] = []
        self.fetches: list[int] = []
        self.skip_once: set[int] = set()  # versions left out of the next answer (a gap)
        self._appended = asyncio.Event()
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def head(self) -> int:
        return len(self.envelopes)

    def publish(
        self,
        ops: Iterable[Mapping[str, Any]],
        target: Target = ALL_SITES,
        ttl_s: float = 3600.0,
        now: float | None = None,
        keys: Sequence[SigningKey] | None = None,
    ) -> Delta:
        delta = next_delta(
            self.fleet, self.head, self.head_hash, ops, target, now or time.time(), ttl_s
        )
        envelope, signed = sign(delta, keys or self.signers)
        self.envelopes.append(envelope)
        self.head_hash = signed.digest
        self._appended.set()
        self._appended = asyncio.Event()
        return signed

    def rotate(self, new: SigningKey) -> Delta:
        delta = self.publish(
            [{"op": "root.rotate", "new_key": key_id(new)}], keys=[*self.signers, new]
        )
        self.signers = [new]
        return delta

    async def start(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/link/enroll", self._enroll)
        app.router.add_get("/v1/link/deltas", self._deltas)
        app.router.add_post("/v1/link/report", self._report)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", self.port)
        await site.start()
        if self.port == 0:
            server = site._server
            assert server is not None
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def __aenter__(self) -> StubHub:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    # -- endpoints -------------------------------------------------------------------

    async def _authenticate(self, request: web.Request) -> web.Response | None:
        """None when the request is signed by a known site, else the 401 answer."""
        body = await request.read()
        try:
            site = claimed_site(request.headers)
            key = self.site_keys.get(site)
            if key is None:
                raise LinkAuthError("unknown site")
            verify_request(
                key,
                request.headers,
                request.method,
                request.host,
                request.path_qs,
                body,
                time.time(),
            )
        except LinkAuthError as exc:
            error = {"error": {"code": "bad_site_signature", "message": str(exc)}}
            return web.Response(
                body=orjson.dumps(error), status=401, content_type="application/json"
            )
        return None

    async def _enroll(self, request: web.Request) -> web.Response:
        data = orjson.loads(await request.read())
        if data.get("token") not in self.tokens:
            return web.json_response({"error": {"code": "bad_enroll_token"}}, status=403)
        self.tokens.discard(data["token"])
        self.site_keys[data["site"]] = data["public_key"]
        return web.json_response({"site": data["site"]})

    async def _deltas(self, request: web.Request) -> web.Response:
        refused = await self._authenticate(request)
        if refused is not None:
            return refused
        after = int(request.query.get("after", "0"))
        wait_s = min(float(request.query.get("wait", "25")), 30.0)
        limit = min(int(request.query.get("limit", "500")), 500)
        self.fetches.append(after)
        if self.head <= after:
            appended = self._appended
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(appended.wait(), wait_s)
        chosen = [
            (version, raw)
            for version, raw in enumerate(self.envelopes[after:][:limit], start=after + 1)
            if version not in self.skip_once
        ]
        if len(chosen) < len(self.envelopes[after:][:limit]):
            self.skip_once.clear()
        body = {"head": self.head, "deltas": [orjson.loads(raw) for _, raw in chosen]}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def _report(self, request: web.Request) -> web.Response:
        refused = await self._authenticate(request)
        if refused is not None:
            return refused
        self.reports.append(orjson.loads(await request.read()))
        return web.Response(body=orjson.dumps({"head": self.head}), content_type="application/json")
