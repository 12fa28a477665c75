"""The hub's fleet logs: streams forwarded by the sites, stored and queried.

Sites push chunks of their streams (``meshorch.fleet.forward``) to
``POST /v1/link/streams``; ``parse_push`` checks the request (pure), the chunks are
decoded with the sites' own codec, and ``central_hub.logstore.LogStore`` keeps them
idempotently by site, stream and sequence. Operators query with ``GET /v1/logs``
(``parse_query``): a tenant token sees only its tenant's streams. The hub's retention
(``HubConfig.logs_max_age_s``, ``logs_max_bytes``) is started from the hub's tick every
``logs_retention_every_s`` (``HubLogs.start_retention``, in a worker thread) and drops
whole blocks, oldest first.

Queries run in a thread pool of their own (``QUERY_THREADS`` threads), never in the one
that commits the hub's LMDB store, so no query delays a write; each has a time budget
(``QUERY_BUDGET_S``: past it the answer is cut short and says what was scanned), regexes
run on RE2 (linear time, ``central_hub.logindex.compile_regex``), and at most
``MAX_QUERIES`` queries run or wait at once (more: 429 with Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import itertools
import logging
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from central_hub import authz
from central_hub.errors import ApiError
from central_hub.ledger import Ledger
from central_hub.logstore import (
    LogGap,
    LogPage,
    LogQuery,
    LogQueryError,
    LogRecord,
    LogStore,
    LogStoreStats,
    RetentionResult,
)
from central_hub.tokens import TokenRecord
from meshorch.streams.model import StreamError, StreamName, StreamStoreCorrupt, decode_chunk

logger = logging.getLogger(__name__)

MAX_PUSH_STREAMS = 1000
MAX_QUERY_LIMIT = 1000
QUERY_THREADS = 2
QUERY_BUDGET_S = 5.0
MAX_QUERIES = 16  # running or waiting for a thread of the pool
_DURATION = re.compile(r"(\d+(?:\.\d+)?)(s|m|h|d)")
_UNIT_S = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


@dataclass(frozen=True, slots=True)
class StreamPush:
    stream: str
    dropped_through: int
    records: list[LogRecord]


def _bad(message: str) -> ApiError:
    return ApiError(400, "bad_streams", message)


def parse_push(data: object) -> list[StreamPush]:
    """``{"streams": [{"stream", "dropped_through", "chunks": [{"first", "data"}]}]}``."""
    if (
        not isinstance(data, dict)
        or set(data) != {"streams"}
        or not isinstance(data["streams"], list)
    ):
        raise _bad('the body must be {"streams": [...]}')
    if len(data["streams"]) > MAX_PUSH_STREAMS:
        raise _bad(f"at most {MAX_PUSH_STREAMS} streams per request")
    pushes: list[StreamPush] = []
    seen: set[str] = set()
    for entry in data["streams"]:
        if not isinstance(entry, dict) or set(entry) != {"stream", "dropped_through", "chunks"}:
            raise _bad("each stream is {stream, dropped_through, chunks}")
        try:
            name = str(StreamName.parse(entry["stream"]))
        except StreamError as exc:
            raise _bad(str(exc)) from None
        if name in seen:
            raise _bad(f"stream {name} appears twice")
        seen.add(name)
        dropped = entry["dropped_through"]
        if type(dropped) is not int or dropped < 0:
            raise _bad(f"{name}: dropped_through must be an integer >= 0")
        if not isinstance(entry["chunks"], list):
            raise _bad(f"{name}: chunks must be a list")
        records: list[LogRecord] = []
        for chunk in entry["chunks"]:
            records.extend(_chunk_records(name, chunk))
        seqs = [r.seq for r in records]
        if any(b != a + 1 for a, b in itertools.pairwise(seqs)):
            raise _bad(f"{name}: chunks must follow each other without gaps or overlaps")
        pushes.append(StreamPush(name, dropped, records))
    return pushes


def _chunk_records(name: str, chunk: object) -> list[LogRecord]:
    if not isinstance(chunk, dict) or set(chunk) != {"first", "data"}:
        raise _bad(f"{name}: each chunk is {{first, data}}")
    first, data = chunk["first"], chunk["data"]
    if type(first) is not int or first < 1 or not isinstance(data, str):
        raise _bad(f"{name}: a chunk's first is an integer >= 1 and data base64")
    try:
        raw = base64.b64decode(data, validate=True)
        info, events = decode_chunk(first, raw)
    except (binascii.Error, ValueError) as exc:
        raise _bad(f"{name}: chunk at {first} is not base64: {exc}") from None
    except StreamStoreCorrupt as exc:
        raise _bad(f"{name}: chunk at {first} cannot be decoded: {exc}") from None
    return [LogRecord(e.seq, e.time_s, e.level, info.host, e.payload) for e in events]


def parse_duration(raw: str) -> float | None:
    """Seconds of ``90s``, ``15m``, ``1h``, ``2d``, ``1h30m``; None if ``raw`` is not one."""
    matches = list(_DURATION.finditer(raw))
    if not matches or "".join(m.group(0) for m in matches) != raw:
        return None
    return sum(float(m.group(1)) * _UNIT_S[m.group(2)] for m in matches)


def parse_time(raw: str, now: float, name: str) -> float:
    """Unix seconds, or a duration back from now: ``90s``, ``15m``, ``1h``, ``2d``, ``1h30m``."""
    try:
        value = float(raw)
    except ValueError:
        pass
    else:
        if value == value and value not in (float("inf"), float("-inf")):
            return value
    back = parse_duration(raw)
    if back is None:
        raise ApiError(
            400, f"bad_{name}", f"{name} is unix seconds or a duration like 90s, 15m, 1h, 2d"
        )
    return now - back


def parse_query(
    params: dict[str, str], token: TokenRecord, now: float, budget_s: float | None = None
) -> LogQuery:
    known = {"tenant", "site", "app", "stream", "host", "since", "until", "level", "grep",
             "regex", "limit", "cursor", "count"}  # fmt: skip
    unknown = sorted(set(params) - known)
    if unknown:
        raise ApiError(400, "bad_query", f"unknown parameters {unknown}; known: {sorted(known)}")
    tenant = params.get("tenant")
    if tenant is not None:
        authz.authorize(token, "logs.read", tenant, what="such tenant")
        tenants: frozenset[str] | None = frozenset({tenant})
    else:
        authz.authorize(token, "logs.read")
        tenants = None if authz.is_fleet(token) else frozenset({token.tenant})
    limit_raw = params.get("limit", "100")
    if not limit_raw.isdigit() or not 1 <= int(limit_raw) <= MAX_QUERY_LIMIT:
        raise ApiError(400, "bad_limit", f"limit must be an integer from 1 to {MAX_QUERY_LIMIT}")
    level_raw = params.get("level")
    if level_raw is not None and not (level_raw.isdigit() and int(level_raw) <= 7):
        raise ApiError(400, "bad_level", "level is a severity 0-7 (3 error, 4 warning, 6 info)")
    since = params.get("since")
    until = params.get("until")
    return LogQuery(
        tenants=tenants,
        site=params.get("site"),
        app=params.get("app"),
        stream=params.get("stream"),
        host=params.get("host"),
        since=None if since is None else parse_time(since, now, "since"),
        until=None if until is None else parse_time(until, now, "until"),
        max_level=None if level_raw is None else int(level_raw),
        substring=params.get("grep"),
        regex=params.get("regex"),
        limit=int(limit_raw),
        cursor=params.get("cursor"),
        count=params.get("count") in ("1", "true", "yes"),
        budget_s=budget_s,
    )


def page_json(page: LogPage) -> dict[str, Any]:
    return {
        "logs": [
            {
                "site": hit.site,
                "stream": hit.stream,
                "seq": hit.seq,
                "time": hit.time_s,
                "level": hit.level,
                "host": hit.host,
                "text": hit.text,
            }
            for hit in page.hits
        ],
        "next_cursor": page.next_cursor,
        "total": page.total,
        "truncated": None if page.truncated is None else page.truncated.to_json(),
    }


@dataclass(frozen=True, slots=True)
class LogLimits:
    """The hub's retention of fleet logs (``HubConfig``'s settings of the same names;
    None: no limit)."""

    logs_max_age_s: float | None
    logs_max_bytes: int | None
    logs_retention_every_s: float


class HubLogs:
    """The hub's log store and the operations on it (one writer at a time, in a thread).
    The ledger gives the data directory, the known tenants and sites, the clock, and
    tracks the retention's worker."""

    def __init__(self, ledger: Ledger, limits: LogLimits) -> None:
        self.ledger = ledger
        self.limits = limits
        self._store: LogStore | None = None
        self._write = asyncio.Lock()
        self._retained_at: float | None = None  # None: not yet since start
        self._retention: asyncio.Future[None] | None = None
        self.query_budget_s = QUERY_BUDGET_S
        self._queries: ThreadPoolExecutor | None = None
        self._queries_in_flight = 0

    def open(self) -> None:
        self._store = LogStore(self.ledger.data_dir / "logs")

    def close(self) -> None:
        pool, self._queries = self._queries, None
        if pool is not None:
            pool.shutdown(wait=True)  # a query stops within its budget
        if self._store is not None:
            self._store.close()
            self._store = None

    @property
    def store(self) -> LogStore:
        if self._store is None:
            raise RuntimeError("the hub's log store is not open")
        return self._store

    def apply_retention(self, now: float) -> RetentionResult:
        """Drop what is past the hub's limits (blocking: run it in a thread)."""
        limits = self.limits
        return self.store.apply_retention(
            now, max_age_s=limits.logs_max_age_s, max_bytes=limits.logs_max_bytes
        )

    def start_retention(self) -> None:
        """Every ``logs_retention_every_s``, drop old fleet logs in a worker thread; the
        rollout driver does not wait for it (dropping a large backlog takes a while)."""
        now = self.ledger.now()
        due = (
            self._retained_at is None
            or now - self._retained_at >= self.limits.logs_retention_every_s
        )
        if not due or (self._retention is not None and not self._retention.done()):
            return
        self._retained_at = now

        async def run() -> None:
            try:
                await asyncio.to_thread(self.apply_retention, now)
            except Exception:
                logger.exception("log retention failed; retrying at its next time")

        task = asyncio.ensure_future(run())
        self._retention = task
        self.ledger.track(task)  # awaited before the log store closes

    def stats(self) -> LogStoreStats | None:
        """The store's figures, None when it is not open."""
        store = self._store
        return None if store is None else store.stats()

    async def positions(self, site: str) -> dict[str, Any]:
        return {"positions": await asyncio.to_thread(self.store.positions, site)}

    async def ingest(self, site: str, data: object) -> dict[str, Any]:
        pushes = parse_push(data)
        known_tenants = set(self.ledger.store.keys("tenants"))
        async with self._write:
            return await asyncio.to_thread(self._ingest, site, pushes, known_tenants)

    def _ingest(self, site: str, pushes: list[StreamPush], tenants: set[str]) -> dict[str, Any]:
        store = self.store
        positions: dict[str, int] = {}
        refused: dict[str, str] = {}
        for push in pushes:
            tenant = push.stream.split("/", 1)[0]
            if tenant not in tenants:
                refused[push.stream] = f"tenant {tenant!r} does not exist at the hub"
                continue
            try:
                result = store.ingest(
                    site, push.stream, push.records, dropped_through=push.dropped_through
                )
                positions[push.stream] = result.high_water
            except LogGap as exc:
                positions[push.stream] = exc.high_water
        return {"positions": positions, "refused": refused}

    async def query(self, token: TokenRecord, params: dict[str, str]) -> dict[str, Any]:
        """``GET /v1/logs``: in the queries' own pool, within the budget (module doc)."""
        query = parse_query(params, token, time.time(), self.query_budget_s)
        if self._queries_in_flight >= MAX_QUERIES:
            raise ApiError(
                429,
                "too_many_queries",
                f"{MAX_QUERIES} log queries are running or waiting: retry in a moment",
                headers={"Retry-After": "1"},
            )
        if self._queries is None:
            self._queries = ThreadPoolExecutor(QUERY_THREADS, thread_name_prefix="hub-logq")
        self._queries_in_flight += 1
        try:
            loop = asyncio.get_running_loop()
            page = await loop.run_in_executor(self._queries, self.store.query, query)
        except LogQueryError as exc:
            raise ApiError(400, exc.code, str(exc)) from None
        finally:
            self._queries_in_flight -= 1
        return page_json(page)

    async def streams(self, token: TokenRecord) -> dict[str, Any]:
        authz.authorize(token, "logs.read")
        sites = list(self.ledger.store.keys("sites"))

        def collect() -> list[dict[str, Any]]:
            found = []
            for site in sites:
                dropped = self.store.dropped(site)
                hub_dropped = self.store.hub_dropped(site)
                for stream, position in sorted(self.store.positions(site).items()):
                    if authz.reaches(token, stream.split("/", 1)[0]):
                        entry = {"site": site, "stream": stream, "position": position}
                        found.append(
                            {
                                **entry,
                                "dropped": dropped.get(stream, 0),
                                "hub_dropped": hub_dropped.get(stream, 0),
                            }
                        )
            return found

        return {"streams": await asyncio.to_thread(collect)}
