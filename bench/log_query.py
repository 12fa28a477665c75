"""Fleet log queries at the hub against ``grep`` over the same lines in one flat file.

Generates ``--lines`` realistic log lines (access logs with paths, statuses, durations and
request ids ``req=7f3a9c12``, warnings, errors, debug lines) from ``--sites`` sites, each
with a tenant, 3-5 streams and 2-6 hosts, spread over 24 h. Sites forward them in time
order, in batches of ``--batch`` records per stream, through ``LogStore.ingest`` (durable
on return); the same lines (``site host payload``) go to one flat text file.

Then, warm, ``--runs`` times each (medians):

- ``selective``: one request id (``req=<id>``, a few lines at most), ``count=True``;
  compared with ``grep -c -F`` of the same string over the flat file;
- ``rare_text``: an error message in about one line in 100,000, ``count=True``, and grep;
- ``infix``: the bare hex id (the index must scan its vocabulary), ``count=True``;
- ``time_range``: 10 minutes of one site, ``count=True``;
- ``page``: the newest 100 errors of the fleet (``max_level=3``), no count.

Every count is checked against grep's or the generator's (the bench fails otherwise).

    python bench/log_query.py                     # 10,000,000 lines (several minutes)
    python bench/log_query.py --lines 1000000     # quick

The last line is ``RESULT query_s=<selective median> ratio_vs_grep=<grep / selective>
ingest_lines_per_s=<int>``. Target: ratio >= 1 and query_s < 1.
"""

from __future__ import annotations

import argparse
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from central_hub.logstore import LogQuery, LogRecord, LogStore

T0 = 1_764_288_000.0  # 2025-11-28 00:00 UTC
SPAN_S = 24 * 3600.0
TENANTS = ["acme", "globex", "initech", "umbrella", "hooli"]
APPS = [("api", "access"), ("web", "access"), ("worker", "jobs"), ("db", "slow"), ("auth", "audit")]
RESOURCES = ["orders", "users", "carts", "items", "payments", "sessions", "stock"]
METHODS = ["GET", "GET", "GET", "POST", "PUT", "DELETE"]
STATUSES = [200] * 20 + [201, 204, 301, 304, 400, 401, 403, 404, 404, 500, 502, 503]
TABLES = ["orders", "order_items", "users", "inventory", "audit_log"]
UPSTREAMS = ["payments-gw", "stock-svc", "auth-svc", "mailer", "redis", "postgres"]
JOBS = ["sync-stock", "send-receipts", "rotate-keys", "compact-cache", "export-sales"]
RARE = "checksum mismatch in replica segment"
RARE_EVERY = 100_000


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Stream:
    site: str
    name: str
    app: str
    hosts: list[str]
    seq: int = 0


def make_streams(sites: int, rnd: random.Random) -> list[Stream]:
    streams = []
    for s in range(sites):
        site = f"site-{s:03d}"
        tenant = TENANTS[s % len(TENANTS)]
        hosts = [f"{site}-h{h}" for h in range(1, rnd.randint(2, 6) + 1)]
        for app, kind in rnd.sample(APPS, rnd.randint(3, 5)):
            streams.append(Stream(site, f"{tenant}/{app}/{kind}", app, hosts))
    return streams


class Lines:
    """Log lines of one stream and time window (payload, level, host, time)."""

    def __init__(self, rnd: random.Random) -> None:
        self.rnd = rnd
        self.second = -1
        self.stamp = ""
        self.made = 0

    def _stamp(self, t: float) -> str:
        second = int(t)
        if second != self.second:
            self.second = second
            self.stamp = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%dT%H:%M:%S")
        return f"{self.stamp}.{int((t - second) * 1000):03d}Z"

    def batch(self, stream: Stream, start: float, end: float, n: int) -> list[LogRecord]:
        rnd = self.rnd
        times = sorted(rnd.uniform(start, end) for _ in range(n))
        kinds = rnd.choices("iiiiiiiiiiiiiiiiwwwed", k=n)
        out = []
        for t, kind in zip(times, kinds, strict=True):
            self.made += 1
            rid = rnd.getrandbits(32)
            host = rnd.choice(stream.hosts)
            if self.made % RARE_EVERY == 0:
                level, body = 3, f"ERROR {stream.app} {RARE} {rnd.randrange(4096)} req={rid:08x}"
            elif kind == "i":
                level = 6
                if stream.app == "worker":
                    body = (
                        f"INFO  worker job={rnd.choice(JOBS)} done items={rnd.randrange(5000)} "
                        f"dur={rnd.randrange(20000)}ms req={rid:08x}"
                    )
                else:
                    body = (
                        f"INFO  {stream.app} {rnd.choice(METHODS)} /v1/{rnd.choice(RESOURCES)}/"
                        f"{rnd.randrange(1_000_000)} status={rnd.choice(STATUSES)} "
                        f"dur={rnd.randrange(900)}.{rnd.randrange(10)}ms "
                        f"bytes={rnd.randrange(99999)} req={rid:08x} user=u{rnd.randrange(200_000)}"
                    )
            elif kind == "w":
                level = 4
                body = (
                    f"WARN  {stream.app} slow query on {rnd.choice(TABLES)} took "
                    f"{rnd.randrange(500, 9000)}ms rows={rnd.randrange(100000)} req={rid:08x}"
                )
            elif kind == "e":
                level = 3
                body = (
                    f"ERROR {stream.app} upstream {rnd.choice(UPSTREAMS)} connection refused "
                    f"after {rnd.randrange(1, 6)} retries req={rid:08x}"
                )
            else:
                level = 7
                body = (
                    f"DEBUG {stream.app} cache hit ratio={rnd.random():.3f} "
                    f"keys={rnd.randrange(10**6)} req={rid:08x}"
                )
            stream.seq += 1
            payload = f"{self._stamp(t)} {host} {body}".encode()
            out.append(LogRecord(stream.seq, t, level, host, payload))
        return out


def timed(fn: Callable[[], int], runs: int) -> tuple[float, int]:
    """Median seconds of ``runs`` calls after a warm-up one, and the (same) result."""
    result = fn()
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        again = fn()
        times.append(time.perf_counter() - started)
        if again != result:
            raise SystemExit(f"FAIL: the result changed between runs: {result} then {again}")
    return statistics.median(times), result


def grep_count(path: Path, needle: str) -> int:
    done = subprocess.run(["grep", "-c", "-F", "--", needle, str(path)], capture_output=True)
    if done.returncode not in (0, 1):
        raise SystemExit(f"FAIL: grep: {done.stderr.decode()}")
    return int(done.stdout)


def check(label: str, got: int, expected: int) -> None:
    if got != expected:
        raise SystemExit(f"FAIL: {label}: the store counts {got}, expected {expected}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000_000, help="log lines in all")
    parser.add_argument("--sites", type=int, default=100, help="sites sending them")
    parser.add_argument("--batch", type=int, default=2500, help="records per ingest call")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each query")
    parser.add_argument("--keep", action="store_true", help="keep the store and the flat file")
    args = parser.parse_args()
    if shutil.which("grep") is None:
        raise SystemExit("grep is needed")

    rnd = random.Random(1)
    streams = make_streams(args.sites, rnd)
    per_stream = args.lines // len(streams)
    rounds = max(1, -(-per_stream // args.batch))
    window = SPAN_S / rounds
    log(f"{args.lines:,} lines: {len(streams)} streams of {args.sites} sites, "
        f"{rounds} rounds of ~{per_stream // rounds} lines a stream")  # fmt: skip

    tmp = Path(tempfile.mkdtemp(prefix="log-query-"))
    flat_path = tmp / "fleet.log"
    store = LogStore(tmp / "logs")
    lines = Lines(rnd)
    # What the queries look for: a request id from the middle, 10 min of one site.
    target_at = args.lines * 2 // 5
    target_rid = ""
    range_site = streams[len(streams) // 2].site
    range_since = T0 + SPAN_S / 2 + 123.0
    range_until = range_since + 600.0
    range_expected = 0
    ingest_s = 0.0
    total = 0
    try:
        with flat_path.open("w", encoding="utf-8") as flat:
            for r in range(rounds):
                start = T0 + r * window
                for stream in streams:
                    # The last round takes the remainder.
                    n = per_stream // rounds if r < rounds - 1 else per_stream - stream.seq
                    if n <= 0:
                        continue
                    batch = lines.batch(stream, start, start + window, n)
                    if not target_rid and total + n > target_at:
                        target_rid = (
                            batch[target_at - total].payload.decode().rsplit("req=", 1)[1][:8]
                        )
                    if stream.site == range_site:
                        times = [rec.time_s for rec in batch]
                        range_expected += bisect_left(times, range_until) - bisect_left(
                            times, range_since
                        )
                    flat.write(
                        "".join(
                            f"{stream.site} {rec.host} {rec.payload.decode()}\n" for rec in batch
                        )
                    )
                    started = time.perf_counter()
                    store.ingest(stream.site, stream.name, batch)
                    ingest_s += time.perf_counter() - started
                    total += n
                log(f"  round {r + 1}/{rounds}: {total:,} lines, ingest {total / ingest_s:,.0f}/s")
        store.flush()
        ingest_rate = int(total / ingest_s)
        flat_mb = flat_path.stat().st_size / 1e6
        log(f"ingested {total:,} lines in {ingest_s:.1f} s; flat file {flat_mb:,.0f} MB")

        def count(query: LogQuery) -> Callable[[], int]:
            def run() -> int:
                result = store.query(query).total
                assert result is not None
                return result

            return run

        def grep(needle: str) -> Callable[[], int]:
            return lambda: grep_count(flat_path, needle)

        selective = f"req={target_rid}"
        results: dict[str, tuple[float, int]] = {}
        for label, fn in [
            ("selective", count(LogQuery(substring=selective, count=True))),
            ("grep selective", grep(selective)),
            ("rare_text", count(LogQuery(substring=RARE, count=True))),
            ("grep rare_text", grep(RARE)),
            ("infix", count(LogQuery(substring=target_rid, count=True))),
            ("grep infix", grep(target_rid)),
            (
                "time_range",
                count(LogQuery(site=range_site, since=range_since, until=range_until, count=True)),
            ),
            ("page", lambda: len(store.query(LogQuery(max_level=3, limit=100)).hits)),
        ]:
            results[label] = timed(fn, args.runs)
            log(f"  {label}: {results[label][0] * 1000:.1f} ms, {results[label][1]:,}")
        for label in ("selective", "rare_text", "infix"):
            check(label, results[label][1], results[f"grep {label}"][1])
        check("time_range", results["time_range"][1], range_expected)
        check("page", results["page"][1], 100)
        if results["selective"][1] < 1:
            raise SystemExit("FAIL: the selective query found nothing")

        print(f"lines={total} sites={args.sites} streams={len(streams)} flat_mb={flat_mb:.0f}")
        print(f"ingest: {ingest_s:.1f} s, {ingest_rate} lines/s (durable per call)")
        for label in ("selective", "rare_text", "infix"):
            q_s, found = results[label]
            g_s = results[f"grep {label}"][0]
            print(
                f"{label:<11} {q_s * 1000:9.2f} ms  grep {g_s * 1000:8.1f} ms  "
                f"ratio {g_s / q_s:7.1f}  matches {found}"
            )
        range_s, range_found = results["time_range"]
        print(f"time_range  {range_s * 1000:9.2f} ms  matches {range_found}")
        print(f"page        {results['page'][0] * 1000:9.2f} ms  (newest 100 errors)")
        q_s, g_s = results["selective"][0], results["grep selective"][0]
        ratio = g_s / q_s
        print(
            f"RESULT query_s={q_s:.4f} ratio_vs_grep={ratio:.1f} ingest_lines_per_s={ingest_rate}"
        )
    finally:
        store.close()
        if args.keep:
            log(f"kept {tmp}")
        else:
            shutil.rmtree(tmp)


if __name__ == "__main__":
    main()
