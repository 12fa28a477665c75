"""Sites' long-polls answered by the follower replica they reach, from its replicated log.

The signed delta log is replicated through Raft: every replica applies the same deltas, in
the same order, as the leader signed them. A follower of a replicated hub
(``central_hub.replica``) therefore answers ``GET /v1/link/deltas`` itself instead of
holding a second TLS hop open to the leader for each waiting site, and the leader holds
only the long-polls of the sites connected to it:

- authentication exactly as the leader's (``central_hub.api``), before any work: the
  site's signature with the site's key from this replica's replicated view, the signed
  ``Host`` this replica's own (the front refuses one naming another replica), the nonce in
  the replica's replay cache (``central_hub.replay.admit``; a GET signed before the cache
  began is admitted, as at the leader); a refused request costs O(1) and changes nothing;
- the answer is the leader's, byte for byte: the same per-site views and waiters
  (``central_hub.siteviews``, shared with the leader's ledger) over the same replicated
  log, the same limits, the head of the replicated log;
- a delta applied here wakes the polls of the sites it targets only (``on_applied`` of the
  Raft node: the new deltas are read once and indexed by their targets); a leadership
  change or the replica stopping answers every waiting poll at once.

What the answer depends on that only the leader holds, and how a follower does without:

- whether the site knows per-site views (``DeltaFormat.site_ready``, from the site's
  latest report, which only the leader keeps) decides which deltas wake its poll (its
  own, or any: an agent older than per-site views), never what the answer holds: the
  follower uses what the leader answered to the site's latest report through this
  replica (``ReportRelay.knows_views``; a change of the site's protocols is urgent, so
  known before that report is answered). A poll that finds no such answer waits for one
  up to ``relay.FIRST_ANSWER_WAIT_S`` (out of its own wait): a site that connects sends
  its first report and its first poll together. A site the follower still has no answer
  for (it reports to another replica, or has not reported since this replica started)
  is forwarded to the leader;
- holds are replicated (the site's record): a held site is forwarded (the leader's
  ``held_poll``), a hold set while the poll waited answers ``held`` as at the leader;
- compaction: a poll whose deltas right after ``after`` are gone is forwarded (the
  leader's 410 ``compacted``); detected from the lowest stored delta, O(1);
- while the replica knows no leader (it may be cut off from the others, its log behind
  theirs), a poll is not answered here (503 ``no_leader``: the site fails over to another
  replica); the polls waiting when the leader is lost answer at once;
- requests signed for a name other than this replica's, and legacy signatures (an agent
  before nonces; once checked here) are forwarded.

The index of each site's newest delta starts at the replicated head when the follower
began (as the leader's starts at its head when its hub started): a site polling after an
older version is answered at once with the views after it (what the leader answers after
its wait, when no delta for the site comes meanwhile), then waits.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from aiohttp import web

from central_hub import holds, siteviews
from central_hub.api import DEFAULT_WAIT_S, MAX_LINK_LIMIT, ROUTES
from central_hub.contract import QueryContract
from central_hub.errors import ApiError, InputProblems
from central_hub.ledger import MAX_DELTA_RESPONSE_BYTES
from central_hub.relay import FIRST_ANSWER_WAIT_S, ReportRelay, enrolled_site
from central_hub.replay import NonceCache, admit
from central_hub.routing import error_response, json_response
from central_hub.siteviews import SiteViews
from central_hub.store import Store
from meshorch.fleet.link_auth import LinkAuthError, is_legacy, verify_request
from meshorch.http_body import read_limited

logger = logging.getLogger(__name__)

POLL_PATH = "/v1/link/deltas"
CHECK_S = 1.0  # the replicated head is read this often too (a full dump installs no entry)
CATCH_UP = 5000  # at most this many new deltas are indexed one by one; past it, all wake
_ROUTE = next(r for r in ROUTES if r.method == "GET" and r.path == POLL_PATH)


class FollowerPolls:
    """A follower's long-polls (module docstring). ``authority``: this replica's own
    ``host:port`` as sites sign it; ``store``: the replicated view; ``leading``: whether
    this replica leads now (its hub answers the polls: nothing to index here)."""

    def __init__(
        self,
        authority: str,
        store: Store,
        nonces: NonceCache,
        relay: ReportRelay,
        clock: Callable[[], float],
        max_body_bytes: int,
        leading: Callable[[], bool] = lambda: False,
    ) -> None:
        self.authority = authority.lower()
        self._store = store
        self.nonces = nonces
        self._relay = relay
        self._clock = clock
        self._max_body = max_body_bytes
        self._leading = leading
        self._queries = QueryContract(_ROUTE.query)
        self.views = SiteViews()
        self._indexed = 0  # the replicated head this replica indexed up to
        self._scheduled = False
        self._task: asyncio.Task[None] | None = None

    def _head(self) -> int:
        head = self._store.get_json("meta", "head")
        return int(head["version"]) if isinstance(head, dict) else 0

    async def start(self) -> None:
        self._indexed = self._head()
        self.views.known_from(self._indexed)
        self._task = asyncio.create_task(self._check_loop(), name="follower-polls")

    async def stop(self) -> None:
        self.views.close()
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    def interrupt(self) -> None:
        """The leader changed: every waiting poll answers now."""
        self.views.interrupt()

    # -- the replicated log -----------------------------------------------------------------

    def applied(self) -> None:
        """An entry was applied (``RaftNode.on_applied``, during a tick): index soon."""
        if not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._catch_up)

    async def _check_loop(self) -> None:
        while True:
            await asyncio.sleep(CHECK_S)
            self._catch_up()

    def _catch_up(self) -> None:
        """Index the deltas applied since the last call, waking their sites' polls."""
        self._scheduled = False
        if self.views.closing:
            return
        try:
            head = self._head()
            if head <= self._indexed:
                return
            if self._leading() or head - self._indexed > CATCH_UP:
                # The leader's hub answers the polls (its ledger indexes its deltas), or
                # too much to index (a full dump installed): known from the head on.
                self._indexed = head
                self.views.known_from(head)
                return
            while self._indexed < head:
                page = self._store.deltas_after(self._indexed, 500, MAX_DELTA_RESPONSE_BYTES)
                if not page:
                    break
                for version, raw in page:
                    self.views.index_envelope(version, raw)
                self._indexed = page[-1][0]
            self._indexed = max(self._indexed, head)
        except Exception:  # the view is closing; the next check reads it again
            logger.exception("follower polls: indexing the applied deltas failed")

    # -- a site's long-poll -------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse | bytes | None:
        """Answer a site's long-poll here, or None / the body read to forward it to the
        leader (module docstring: what is forwarded)."""
        if request.host.lower() != self.authority:
            return None
        if self.views.closing:
            return None
        body = await read_limited(request.content, self._max_body)
        if len(body) > self._max_body:
            return error_response(413, "body_too_large", f"the body exceeds {self._max_body} bytes")
        now = self._clock()
        try:
            site, key, record = enrolled_site(self._store, request.headers)
            signed_at, nonce = verify_request(
                key, request.headers, request.method, request.host, request.raw_path, body, now
            )
        except LinkAuthError as exc:
            return error_response(401, "bad_site_signature", str(exc))
        if is_legacy(request.headers):
            return body  # signed by an old agent: the leader's deprecation window decides
        try:
            admit(self.nonces, site, nonce, signed_at, now, changes=False)
            repeated = [n for n in set(request.query) if len(request.query.getall(n)) > 1]
            query = self._queries.parse(request.query, repeated)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message, details=exc.details)
        except InputProblems as exc:
            return error_response(400, exc.code, str(exc), exc.problems)
        after: int = query.get("after", 0)  # type: ignore[assignment]
        wait_s = float(query.get("wait", DEFAULT_WAIT_S))  # type: ignore[arg-type]
        limit: int = query.get("limit", MAX_LINK_LIMIT)  # type: ignore[assignment]
        if holds.held_record(record) or self._compacted_after(after):
            return body  # the leader's answer (module docstring)
        started = time.monotonic()
        knows_views = await self._relay.views_known(site, min(wait_s, FIRST_ANSWER_WAIT_S))
        if knows_views is None:
            return body  # no report of the site here: the leader's answer
        wait_s = max(0.0, wait_s - (time.monotonic() - started))
        if knows_views:
            await self.views.wait(site, after, wait_s)
        else:  # as the leader's ``wait_for_deltas``: any delta
            await self.views.wait_any(after, wait_s, lambda: self._indexed)
        if holds.held_record(self._store.get_json("sites", site)):
            return json_response(holds.held_answer(after))  # held while it waited
        head = self._head()
        deltas = self._store.deltas_after(after, limit, MAX_DELTA_RESPONSE_BYTES)
        return json_response(siteviews.answer(head, self.views.views(deltas, site)))

    def _compacted_after(self, after: int) -> bool:
        """Whether deltas right after ``after`` may be gone (compacted into a snapshot)."""
        lowest = self._store.first_sequence("deltas")
        if lowest == 0:
            return self._head() > after
        return after + 1 < lowest
