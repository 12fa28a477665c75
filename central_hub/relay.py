"""Site reports handled by the hub replica they reach (soft state stays soft).

A report is soft state: the latest one of each site, sent again every few seconds. A
follower replica of a replicated hub (``central_hub.replica``) therefore answers ``POST
/v1/link/report`` itself instead of forwarding it to the leader over a second TLS hop:

- it checks the site's signature with the site's key from its own replicated view, the
  nonce in its own replay cache, and the report's shape (the route's contract and
  ``parse_report``): a refused request costs no work beyond that and changes nothing;
- it pushes what it received to the leader in one batched request every ``PUSH_EVERY_S``
  (``POST RELAY_PATH``, authenticated with the replicas' forwarding key): a report whose
  ``progress`` did not change goes as a compact mark (``seen``: the site, its nonce, its
  clock, the digest of the report it renews), in full at least every ``full_every_s``
  (its hosts' resource samples; the leader's ``Reports.renew_s``);
- the leader merges a batch as if each report had reached it (``merge``: the same
  ``Sites.record_report``, so alerts, the vault's triggers and the rollout driver see it)
  and answers, per site, what the site's report answer carries (``site_head``, ``held``)
  with the fleet's head; the follower answers the site from that. A mark renews the
  leader's kept report (``Reports.seen``: its time, when the site was heard) and nothing
  else; a mark for a site whose report the leader does not keep (a new leader) is not
  answered, so that site's next report goes in full.

The leader's answers kept here also tell the follower's long-polls which deltas wake a
site's poll (``knows_views``: the site knows per-site views; ``central_hub.replica_polls``):
a site's long-polls are answered by the replica its reports reach, not forwarded.

A report the leader must see at once waits for its push, which starts at once: the
site's first report at this replica (no answer known yet) and a report whose progress
changed (applied version, applications, rejections, agent upgrade, decommission, secrets;
``progress``): a rollout waiting for sites' acknowledged versions is not slowed down.

Replays: a link request's signature covers the ``Host`` it was sent to, and each replica
handles only requests signed for itself (its own URL's host; the front refuses one naming
another replica, ``misdirected``), so a request captured at one replica and replayed to
another is refused, and one replayed to the same replica is in its replay cache, which
the replica keeps across leadership changes (its hub uses the same cache). The leader
checks every merged report's nonce in that cache too (a replayed batch records nothing).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import secrets
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from central_hub.contract import BodyContract
from central_hub.errors import ApiError, InputProblems
from central_hub.fleetview import parse_report, progress, progress_digest
from central_hub.openapi import SCHEMAS
from central_hub.replay import NonceCache, ReplayCacheFull, admit
from central_hub.report_stream import Answer, Streams, enrolled_with
from central_hub.reports import RENEW_S
from central_hub.routing import error_body, error_response, json_response
from central_hub.store import Store
from central_hub.vault import parse_report_secrets
from meshorch.fleet.link_auth import (
    LinkAuthError,
    claimed_site,
    is_legacy,
    verify_request,
)
from meshorch.http_body import read_limited

if TYPE_CHECKING:
    from central_hub.parts import HubParts

logger = logging.getLogger(__name__)

RELAY_PATH = "/v1/replica/reports"
REPORT_PATH = "/v1/link/report"
RELAY_HEADER = "X-Meshorch-Relay"
RELAY_VERSION = 1
PUSH_EVERY_S = 1.0
# A site waits this long for the leader's answer to its urgent report, then 503: less than
# a site's own report timeout (4 s, ``meshorch.fleet.site_link``), so it is answered.
WAIT_S = 3.0
MAX_PUSH = 2000  # reports per push; more wait for the next one
# How long a site's poll waits at a follower for the leader's answer to the site's first
# report there (the two usually set out together): a push and the leader's answer.
FIRST_ANSWER_WAIT_S = 3.0
MAX_SEEN = 20_000  # marks per push (about 110 bytes each)
MAX_RELAY_BYTES = 64 * 1024 * 1024
RELAY_WINDOW_S = 30.0  # a push is accepted this long after it was made
# What a report answer says of one site: the newest version that concerns it (None:
# the site is served the whole fleet log), whether the hub holds it.
SiteAnswer = tuple[int | None, bool]
# Posts a push's body to the leader, returns its answer (RelayError when it cannot).
Sender = Callable[[bytes], Awaitable[dict[str, Any]]]


class RelayError(Exception):
    """The leader did not take a push (none known, unreachable, or it refused)."""


class UnknownSite(RelayError):
    """The leader does not know the site (deleted since this replica checked it)."""


# -- the push's authentication ----------------------------------------------------------


def _tag(key: bytes, sent_at: str, body: bytes) -> str:
    return hmac.new(key, sent_at.encode() + b"\n" + body, hashlib.sha256).hexdigest()


def relay_header(key: bytes, now: float, body: bytes) -> str:
    sent_at = f"{now:.3f}"
    return f"{sent_at} {_tag(key, sent_at, body)}"


def relay_recent(header: str, now: float) -> bool:
    """Whether ``header`` says its push was made within RELAY_WINDOW_S (checked before
    the body is read: a stale or malformed header costs no read)."""
    try:
        at = float(header.partition(" ")[0])
    except ValueError:
        return False
    return abs(now - at) <= RELAY_WINDOW_S  # False for NaN


def relay_authentic(key: bytes, header: str, body: bytes, now: float) -> bool:
    """Whether ``header`` proves a replica made ``body`` less than RELAY_WINDOW_S ago."""
    sent_at, _, tag = header.partition(" ")
    if not relay_recent(header, now):
        return False
    return hmac.compare_digest(tag, _tag(key, sent_at, body))


# -- what a report answer carries ---------------------------------------------------------


def answer_of(head: int, site: SiteAnswer, report: Mapping[str, Any]) -> dict[str, Any]:
    """The answer ``api.link_report`` gives (held: the site's own version as the head)."""
    site_head, held = site
    if held:
        applied = int(report["applied_version"])
        return {"head": applied, "site_head": applied, "held": True}
    if site_head is None:
        return {"head": head}
    return {"head": head, "site_head": site_head}


# -- the leader's side ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Push:
    """A follower's push: reports in full, and marks of unchanged ones (``Seen``)."""

    reports: list[dict[str, Any]]
    seen: list[Seen]


# A mark: the site, its request's nonce and signing time, the report's own ``time``, and
# the ``progress_digest`` of the report it renews.
Seen = tuple[str, str, float, float, str]


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def parse_push(body: bytes) -> Push:
    """The reports and marks of a push (ValueError when it is not one)."""
    data = orjson.loads(body)
    if not isinstance(data, dict) or data.get("v") != RELAY_VERSION:
        raise ValueError(f"a push is an object of version {RELAY_VERSION}")
    reports = data.get("reports")
    if not isinstance(reports, list):
        raise ValueError("a push carries a list of reports")
    for entry in reports:
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("site"), str)
            and isinstance(entry.get("report"), dict)
            and isinstance(entry.get("nonce"), str)
            and _is_number(entry.get("signed_at"))
        ):
            raise ValueError("a pushed report is {site, report, nonce, signed_at}")
    marks = data.get("seen", [])  # absent in a push of an older replica
    if not isinstance(marks, list):
        raise ValueError("a push's marks are a list")
    seen: list[Seen] = []
    for mark in marks:
        if not (
            isinstance(mark, list)
            and len(mark) == 5
            and isinstance(mark[0], str)
            and isinstance(mark[1], str)
            and _is_number(mark[2])
            and _is_number(mark[3])
            and isinstance(mark[4], str)
        ):
            raise ValueError("a pushed mark is [site, nonce, signed_at, time, digest]")
        seen.append((mark[0], mark[1], float(mark[2]), float(mark[3]), mark[4]))
    return Push(reports, seen)


async def merge(parts: HubParts, nonces: NonceCache, push: Push) -> bytes:
    """Keep the pushed reports as if they had reached this hub (``link_report`` after the
    follower's checks) and renew the marked ones; the answer: the fleet's head and each
    site's ``SiteAnswer`` (none for a mark of a site whose report is not kept here)."""
    ledger = parts.ledger
    answers: dict[str, SiteAnswer] = {}

    def fresh(site: str, nonce: str, signed_at: float) -> bool:
        try:
            return nonces.check_and_add(site, nonce, signed_at, ledger.now())
        except ReplayCacheFull:
            return False

    def answer(site: str, held: bool) -> None:
        site_head = ledger.site_head(site) if parts.delta_format.site_ready(site) else None
        answers[site] = (site_head, held)

    # One read of each site's record: its key (deleted, or its key withdrawn, since the
    # follower checked it: skipped) and whether it is held.
    for entry in push.reports:
        site = entry["site"]
        key, held = parts.site_facts.of(site)
        if key is None:
            continue
        if fresh(site, entry["nonce"], entry["signed_at"]):
            await parts.sites.record_report(site, entry["report"])
        answer(site, held)
    for site, nonce, signed_at, site_time, digest in push.seen:
        key, held = parts.site_facts.of(site)
        if key is None:
            continue
        if fresh(site, nonce, signed_at) and not parts.sites.reports.seen(site, site_time, digest):
            continue  # not the report kept here (a new leader): the site's next one in full
        answer(site, held)
    return orjson.dumps({"v": RELAY_VERSION, "head": ledger.head.version, "sites": answers})


# -- the follower's side --------------------------------------------------------------------


@dataclass
class _Pending:
    report: dict[str, Any]
    nonce: str
    signed_at: float
    waiters: list[asyncio.Future[SiteAnswer]] = field(default_factory=list)


def enrolled_site(store: Store, headers: Mapping[str, str]) -> tuple[str, str, dict[str, Any]]:
    """The site a link request claims to come from, its public key and its record, from
    the replicated view (O(1)); LinkAuthError if it is unknown or not enrolled."""
    site = claimed_site(headers)
    found = store.get_json("sites", site) if len(site) <= 200 else None
    record: dict[str, Any] = found if isinstance(found, dict) else {}
    key = record.get("public_key")
    if not isinstance(key, str):
        raise LinkAuthError(f"site {site[:64]!r} is unknown or not enrolled")
    return site, key, record


class ReportRelay:
    """A replica's reports (module docstring). ``authority``: this replica's own
    ``host:port`` as sites sign it; ``store``: the replicated view (the sites' keys);
    ``send``: posts a push to the leader; ``nonces``: the replica's replay cache;
    ``watch``: what else of a report, besides its ``progress``, the leader must see at
    once when it changes (which hosts are over the alert thresholds); ``full_every_s``:
    how often an unchanged report goes in full (the leader's ``Reports.renew_s``)."""

    def __init__(
        self,
        authority: str,
        store: Store,
        send: Sender,
        clock: Callable[[], float],
        nonces: NonceCache,
        max_body_bytes: int,
        push_every_s: float = PUSH_EVERY_S,
        watch: Callable[[dict[str, Any]], object] = lambda _report: None,
        full_every_s: float = RENEW_S,
    ) -> None:
        self.authority = authority.lower()
        self._store = store
        self._send = send
        self._clock = clock
        self.nonces = nonces
        self._max_body = max_body_bytes
        self._every_s = push_every_s
        self._watch = watch  # what else of a report the leader must see at once
        self._full_every_s = full_every_s
        self._contract = BodyContract("SiteReport", SCHEMAS)
        self._progress: dict[str, tuple[bytes, object]] = {}
        self._answers: dict[str, SiteAnswer] = {}
        # Polls waiting for a site's first answer here (``views_known``): one per site.
        self._first_answer: dict[str, asyncio.Future[None]] = {}
        self._head = 0
        self._pending: dict[str, _Pending] = {}  # reports to push in full
        self._seen: dict[str, Seen] = {}  # unchanged reports to push as marks
        self._full_at: dict[str, float] = {}  # when the leader took a site's report in full
        self._now = asyncio.Event()  # a report waits for its push
        self._task: asyncio.Task[None] | None = None
        self.streams = Streams()  # the sites' report streams open here

    async def start(self) -> None:
        self._task = asyncio.create_task(self._push_loop(), name="report-relay")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        await self.streams.close_all()
        for entry in self._pending.values():
            for waiter in entry.waiters:
                if not waiter.done():
                    waiter.set_exception(RelayError("the replica is stopping"))
        self._pending.clear()
        for answered in self._first_answer.values():
            if not answered.done():
                answered.set_result(None)  # their polls go on to the leader (or answer 503)
        self._first_answer.clear()

    def knows_views(self, site: str) -> bool | None:
        """Whether the leader's answer to ``site``'s latest report here said it knows
        per-site views (it carried ``site_head``: ``DeltaFormat.site_ready``); None when
        there is no such answer."""
        answer = self._answers.get(site)
        return None if answer is None else answer[0] is not None

    async def views_known(self, site: str, wait_s: float) -> bool | None:
        """``knows_views``, waiting up to ``wait_s`` for the leader's answer to a report
        of ``site`` here when there is none yet: a site that connects sends its first
        report and its first poll together, and a poll forwarded to the leader then holds
        a second connection there for its whole wait. Only an authenticated site's poll
        calls this: at most one waiting entry per enrolled site."""
        known = self.knows_views(site)
        if known is not None or wait_s <= 0:
            return known
        answered = self._first_answer.get(site)
        if answered is None:
            answered = self._first_answer[site] = asyncio.get_running_loop().create_future()
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await asyncio.shield(answered)
        finally:  # not answered in time, or the poll went: nothing is left behind
            if not answered.done() and self._first_answer.get(site) is answered:
                del self._first_answer[site]
        return self.knows_views(site)

    # -- a site's report ----------------------------------------------------------------

    async def handle(self, request: web.Request) -> web.StreamResponse | bytes:
        """Answer a site's report here, or its body to forward (signed for another host
        name than this replica's, e.g. a name every replica shares)."""
        body = await read_limited(request.content, self._max_body)
        if len(body) > self._max_body:
            return error_response(413, "body_too_large", f"the body exceeds {self._max_body} bytes")
        if request.host.lower() != self.authority:
            return body
        now = self._clock()
        admitted = self._admitted(request, body, now)
        if isinstance(admitted, web.Response):
            return admitted
        site, _key, nonce, signed_at = admitted
        status, answer = await self._report(site, body, nonce, signed_at, now)
        response = json_response(answer, status)
        if status == 503:
            response.headers["Retry-After"] = "1"
        return response

    async def handle_stream(self, request: web.Request) -> web.StreamResponse:
        """A site's report stream (``central_hub.report_stream``): its upgrade request
        checked as ``handle`` checks a report, before the upgrade; each message then
        answered as a report here."""
        if request.host.lower() != self.authority:
            # Signed for a name every replica shares: a stream is not forwarded; the
            # site sends its reports with POST instead.
            return error_response(
                421, "misdirected_request", f"a report stream is opened at {self.authority}"
            )
        body = await read_limited(request.content, self._max_body)
        admitted = self._admitted(request, body, self._clock())
        if isinstance(admitted, web.Response):
            return admitted
        site, key, _nonce, _signed_at = admitted

        async def one(report: bytes) -> Answer:
            # No signature per message: the stream's TLS connection is the site's alone.
            # A nonce of the replica's own, for the leader's replay cache.
            at = self._clock()
            return await self._report(site, report, secrets.token_hex(16), at, at)

        return await self.streams.serve(
            request, site, enrolled_with(self._store, site, key), one, self._max_body
        )

    def _admitted(
        self, request: web.Request, body: bytes, now: float
    ) -> tuple[str, str, str, float] | web.Response:
        """The site a link request to this replica comes from, its key, the request's
        nonce and signing time; or the refusal (401, replayed), before any work."""
        try:
            site, key, _record = enrolled_site(self._store, request.headers)
            if is_legacy(request.headers):
                return error_response(
                    401,
                    "signature_outdated",
                    f"site {site!r} signs without a nonce (an agent older than the hub): "
                    f"never accepted on {request.method} {request.path}; upgrade its agents",
                )
            signed_at, nonce = verify_request(
                key, request.headers, request.method, request.host, request.raw_path, body, now
            )
        except LinkAuthError as exc:
            return error_response(401, "bad_site_signature", str(exc))
        try:
            admit(self.nonces, site, nonce, signed_at, now, changes=True)
        except ApiError as exc:
            return error_response(exc.status, exc.code, exc.message)
        return site, key, nonce, signed_at

    async def _report(
        self, site: str, body: bytes, nonce: str, signed_at: float, now: float
    ) -> Answer:
        """A report's body, its signature (or its stream's) checked: its answer."""
        try:
            data: object = orjson.loads(body)
        except orjson.JSONDecodeError as exc:
            return 400, error_body("bad_json", f"the body is not JSON: {exc}")
        try:
            self._contract.check(data)
            report = parse_report(data, site)
        except InputProblems as exc:
            return 400, error_body(exc.code, str(exc), exc.problems)
        report.update(parse_report_secrets(data))
        return await self._keep(site, report, nonce, signed_at, now)

    async def _keep(
        self, site: str, report: dict[str, Any], nonce: str, signed_at: float, now: float
    ) -> Answer:
        moved = progress(report), self._watch(report)
        urgent = self._progress.get(site) != moved or site not in self._answers
        self._progress[site] = moved
        entry = self._pending.get(site)
        full_at = self._full_at.get(site, -1e18)
        if entry is None and not urgent and now - full_at < self._full_every_s:
            # Unchanged, and the leader has its report from less than full_every_s ago.
            mark = (site, nonce, signed_at, float(report["time"]), progress_digest(moved[0]))
            self._seen[site] = mark
            return 200, answer_of(self._head, self._answers[site], report)
        self._seen.pop(site, None)
        waiters = [] if entry is None else entry.waiters
        self._pending[site] = _Pending(report, nonce, signed_at, waiters)
        if urgent:
            waiter: asyncio.Future[SiteAnswer] = asyncio.get_running_loop().create_future()
            waiters.append(waiter)
            self._now.set()
            try:
                async with asyncio.timeout(WAIT_S):
                    answer = await waiter
            except UnknownSite as exc:
                return 401, error_body("bad_site_signature", str(exc))
            except (TimeoutError, RelayError) as exc:
                self._progress.pop(site, None)  # the next report is urgent again
                message = f"the hub's leader did not take the report: {exc}"
                return 503, error_body("leader_unreachable", message)
        else:
            answer = self._answers[site]
        return 200, answer_of(self._head, answer, report)

    # -- the pushes ---------------------------------------------------------------------

    async def _push_loop(self) -> None:
        while True:
            try:
                async with asyncio.timeout(self._every_s):
                    await self._now.wait()
            except TimeoutError:
                pass
            self._now.clear()
            if self._pending or self._seen:
                await self.push()

    async def push(self) -> None:
        """Send what was received since the last push (at most MAX_PUSH reports in full
        and MAX_SEEN marks)."""
        sites = list(self._pending)[:MAX_PUSH]
        taken = {site: self._pending.pop(site) for site in sites}
        marked = [self._seen.pop(site) for site in list(self._seen)[:MAX_SEEN]]
        pushed_at = self._clock()
        body = orjson.dumps(
            {
                "v": RELAY_VERSION,
                "reports": [
                    {"site": s, "report": e.report, "nonce": e.nonce, "signed_at": e.signed_at}
                    for s, e in taken.items()
                ],
                "seen": marked,
            }
        )
        try:
            answer = await self._send(body)
            head, answers = answer["head"], answer["sites"]
            if type(head) is not int or not isinstance(answers, dict):
                raise RelayError(f"the leader's answer is not a push answer: {answer!r:.200}")
        except RelayError as exc:
            logger.info("report push of %d sites not taken: %s", len(taken), exc)
            for site, entry in taken.items():
                for waiter in entry.waiters:
                    if not waiter.done():
                        waiter.set_exception(exc)
                # Kept for the next push unless a newer report took its place.
                if site not in self._pending:
                    self._pending[site] = _Pending(entry.report, entry.nonce, entry.signed_at)
            for mark in marked:
                if mark[0] not in self._pending:
                    self._seen.setdefault(mark[0], mark)
            return
        self._head = head
        for site, *_ in marked:
            self._take_answer(site, answers.get(site))
        for site, entry in taken.items():
            if self._take_answer(site, answers.get(site)):
                self._full_at[site] = pushed_at
            for waiter in entry.waiters:
                if waiter.done():
                    continue
                if site in self._answers:
                    waiter.set_result(self._answers[site])
                else:
                    waiter.set_exception(UnknownSite(f"site {site!r} is unknown or not enrolled"))
        if (self._pending and len(taken) >= MAX_PUSH) or (self._seen and len(marked) >= MAX_SEEN):
            self._now.set()

    def _take_answer(self, site: str, got: object) -> bool:
        """Keep the leader's answer for ``site``; False when there is none (the leader no
        longer knows the site, or keeps no report of it): its next report goes in full."""
        if isinstance(got, list) and len(got) == 2:
            self._answers[site] = (got[0] if type(got[0]) is int else None, got[1] is True)
            answered = self._first_answer.pop(site, None)
            if answered is not None and not answered.done():
                answered.set_result(None)
            return True
        self._answers.pop(site, None)
        self._full_at.pop(site, None)
        return False
