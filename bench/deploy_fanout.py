"""Deployment fan-out: from the deploy API call to every site reporting the delta applied.

A real hub (``meshorch hub`` subprocess: LMDB, HTTP, signing) on loopback and ``--sites``
light sites (bench/fanout_site.py, spread over ``--workers`` processes): each site has its
own identity key, long-polls the hub with the real ``LinkClient``, verifies every delta
against the fleet root key with ``meshorch.fleet.delta.verify_batch`` and, when a delta puts the
application on it, reports it applied and healthy (docs/fleet-link.md). The driver deploys
``--deployments`` versions of one application to every site in one wave
(``max_parallel`` = sites, so the figure is fan-out, not wave gating), waits for every site
and for the hub to mark the deployment succeeded, then deploys the next version.

A site's latency is from just before ``POST /v1/apps`` to the hub acknowledging the
site's report that carries the new version (one machine, one clock). Reported: per
deployment the time until every site is done, and p50/p99 over all per-site latencies
(``fanout_p99_s``) and over the per-deployment all-sites times. Target: p99 <= 5 s for 100
sites.

Also, on one core: deltas verified per second by ``meshorch.fleet.delta.verify_chain`` over a
chain of real signed deltas (an ``app.put`` with a spec and a ``--sites`` target each),
and the ratio to PyNaCl's raw Ed25519 ``VerifyKey.verify`` over the same bodies.

    python bench/deploy_fanout.py                          # 100 sites, 5 deployments
    python bench/deploy_fanout.py --sites 10 --deployments 2   # smoke test

Last line: ``RESULT fanout_p99_s=... verify_per_s=... verify_ratio=...``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import os
import re
import signal
import statistics
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import uvloop
from nacl.signing import SigningKey, VerifyKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from central_hub.placement import MAX_PARALLEL
from meshorch.apps.spec import from_json, to_json
from meshorch.demo.localsite import LocalHub
from meshorch.fleet.delta import (
    GENESIS_HASH,
    Target,
    TrustState,
    key_id,
    next_delta,
    parse,
    sign,
    verify_chain,
)

APP = "fanout"
FLEET = "fanout"
SITE_SCRIPT = Path(__file__).resolve().parent / "fanout_site.py"
TARGET_P99_S = 5.0


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def site_ids(count: int) -> list[str]:
    return [f"site-{i:03d}" for i in range(1, count + 1)]


def app_spec(version: str) -> dict[str, Any]:
    """A small application spec, in the canonical form a site receives."""
    spec = {
        "api_version": "meshorch/v1",
        "name": APP,
        "version": version,
        "services": [
            {
                "name": "main",
                "replicas": 1,
                "containers": [
                    {
                        "name": "main",
                        "image": "process",
                        "command": ["sh", "-c", "while true; do date > now; sleep 1; done"],
                        "env": {"MODE": "bench", "VERSION": version},
                        "resources": {"memory_limit": "32Mi", "cpu_request": "50m"},
                        "probes": {
                            "readiness": {
                                "exec": {"command": ["test", "-s", "now"]},
                                "period_s": 0.5,
                                "timeout_s": 0.4,
                            }
                        },
                    }
                ],
            }
        ],
    }
    return to_json(from_json(spec))


def percentile(values: list[float], fraction: float) -> float:
    """Linear interpolation between the closest ranks (numpy's default)."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * fraction
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


# -- verification rate on one core -------------------------------------------------------


@dataclass
class VerifyRates:
    deltas: int
    body_bytes: int
    envelope_bytes: int
    verify_per_s: float
    raw_per_s: float

    @property
    def ratio(self) -> float:
        return self.verify_per_s / self.raw_per_s if self.raw_per_s else math.nan


def build_chain(count: int, sites: int) -> tuple[list[bytes], str]:
    """``count`` consecutive signed deltas, each an app.put for ``sites`` sites."""
    key = SigningKey.generate()
    target = Target(sites=frozenset(site_ids(sites)))
    envelopes = []
    version, head, now = 0, GENESIS_HASH, time.time()
    for i in range(count):
        ops = [{"op": "app.put", "spec": app_spec(f"{i + 1}")}]
        delta = next_delta(FLEET, version, head, ops, target, now, 7 * 86400.0)
        envelope, delta = sign(delta, [key])
        envelopes.append(envelope)
        version, head = delta.version, delta.digest
    return envelopes, key_id(key)


def timed_rate(count: int, run: Callable[[], None], passes: int) -> float:
    rates = []
    for _ in range(passes):
        start = time.perf_counter()
        run()
        rates.append(count / (time.perf_counter() - start))
    return statistics.median(rates)


def measure_verify(count: int, sites: int, passes: int) -> VerifyRates:
    envelopes, root = build_chain(count, sites)
    signed = [(body, sigs[0][1]) for _, body, sigs in (parse(e) for e in envelopes)]
    verify_key = VerifyKey(bytes.fromhex(root))
    start = TrustState(fleet=FLEET, trusted_keys=frozenset({root}))

    def chain() -> None:
        state = start
        for raw in envelopes:
            _, state = verify_chain(raw, state)
        assert state.version == count

    def raw() -> None:
        for body, signature in signed:
            verify_key.verify(body, signature)

    affinity = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    if affinity:
        os.sched_setaffinity(0, {min(affinity)})  # one core, whatever else runs
    try:
        chain()  # warm-up: caches, allocator
        raw()
        # Alternate, so both see the same machine state.
        verify_rates, raw_rates = [], []
        for _ in range(passes):
            verify_rates.append(timed_rate(count, chain, 1))
            raw_rates.append(timed_rate(count, raw, 1))
    finally:
        if affinity:
            os.sched_setaffinity(0, affinity)
    return VerifyRates(
        deltas=count,
        body_bytes=round(statistics.mean(len(b) for b, _ in signed)),
        envelope_bytes=round(statistics.mean(len(e) for e in envelopes)),
        verify_per_s=statistics.median(verify_rates),
        raw_per_s=statistics.median(raw_rates),
    )


# -- the fan-out ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Applied:
    """One site's APPLIED line: delta version and its wall-clock times."""

    delta: int
    fetched: float
    verified: float
    acked: float


@dataclass
class Collector:
    """What the workers say, by application version and site."""

    applied: dict[str, dict[str, Applied]] = field(default_factory=dict)
    rejected: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    ready_workers: int = 0
    linked: dict[str, int] = field(default_factory=dict)  # by worker, until it is READY
    reports: int = 0  # site reports the hub took (the workers' REPORTS lines)
    dead_workers: list[str] = field(default_factory=list)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def take(self, worker: str, line: str) -> None:
        parts = line.split()
        if not parts:
            return
        if parts[0] == "APPLIED" and len(parts) == 8:
            site, app, version = parts[1:4]
            if app == APP:
                self.applied.setdefault(version, {}).setdefault(
                    site, Applied(int(parts[4]), *(float(p) for p in parts[5:8]))
                )
        elif parts[0] == "READY":
            self.ready_workers += 1
        elif parts[0] == "REPORTS" and len(parts) == 2:
            self.reports += int(parts[1])
        elif parts[0] == "LINKED" and len(parts) == 2:
            self.linked[worker] = int(parts[1])
        elif parts[0] == "REJECTED":
            self.rejected.append(line)
            log(f"{worker}: {line}")
        elif parts[0] == "ERROR":
            self.errors.append(line)
            if len(self.errors) <= 10:
                log(f"{worker}: {line}")
        self.changed.set()

    async def wait(self, done: Callable[[], bool], timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            self.changed.clear()
            if done():
                return
            if self.dead_workers:
                raise RuntimeError(f"site worker(s) exited: {', '.join(self.dead_workers)}")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"{what}: not within {timeout_s:g} s")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.changed.wait(), remaining)


@dataclass
class Worker:
    name: str
    sites: list[str]
    process: asyncio.subprocess.Process
    keys: dict[str, str] = field(default_factory=dict)
    reader: asyncio.Task[None] | None = None


@dataclass
class Deployment:
    index: int
    version: str
    deployment_id: str
    delta: int
    api_s: float  # POST /v1/apps answered
    fetched: list[float]  # per site: the fetch answer carrying the delta arrived
    acked: list[float]  # per site: the hub acknowledged the report carrying it
    hub_done_s: float  # the hub marked the deployment succeeded (seen by polling)

    @property
    def all_sites_s(self) -> float:
        return max(self.acked)


class Admin:
    """Operator calls to the hub with the bootstrap admin token (``ssl``: how the hub's
    certificate is checked, e.g. its pinned ``aiohttp.Fingerprint``)."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        url: str,
        token: str,
        ssl: aiohttp.Fingerprint | bool = True,
    ) -> None:
        self.session = session
        self.url = url
        self.ssl = ssl
        self.headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}

    async def call(self, method: str, path: str, body: object = None) -> tuple[int, Any]:
        data = None if body is None else orjson.dumps(body)
        async with self.session.request(
            method, self.url + path, data=data, headers=self.headers, ssl=self.ssl
        ) as response:
            return response.status, orjson.loads(await response.read())


async def start_workers(
    args: argparse.Namespace,
    hub_url: str | Callable[[int], str],
    root_key: str,
    sites: list[str],
    pids: list[int],
    *flags: str,
) -> list[Worker]:
    """``hub_url``: the hub's URL(s), or which to give worker N; ``flags`` go to every
    worker (e.g. ``--hub-fingerprint``)."""
    count = max(1, min(args.workers, len(sites)))
    workers = []
    for index in range(count):
        share = sites[index::count]
        url = hub_url if isinstance(hub_url, str) else hub_url(index)
        process = await asyncio.create_subprocess_exec(
            sys.executable, str(SITE_SCRIPT), "--hub", url, "--fleet", FLEET,
            "--root-key", root_key, "--sites", ",".join(share), *flags,
            stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            start_new_session=True,  # Ctrl-C reaches the driver only; it stops them
        )  # fmt: skip
        pids.append(process.pid)
        workers.append(Worker(f"worker-{index + 1}", share, process))
    for worker in workers:
        assert worker.process.stdout is not None
        while len(worker.keys) < len(worker.sites):
            line = (await asyncio.wait_for(worker.process.stdout.readline(), 30)).decode()
            if not line:
                raise RuntimeError(f"{worker.name} exited before giving its keys")
            kind, site, key = line.split()
            if kind == "KEY":
                worker.keys[site] = key
    return workers


async def read_worker(worker: Worker, collector: Collector) -> None:
    assert worker.process.stdout is not None
    while line := await worker.process.stdout.readline():
        collector.take(worker.name, line.decode().strip())
    collector.dead_workers.append(f"{worker.name} (exit {await worker.process.wait()})")
    collector.changed.set()


async def stop_workers(workers: list[Worker]) -> None:
    for worker in workers:
        if worker.process.stdin is not None and not worker.process.stdin.is_closing():
            worker.process.stdin.close()  # the worker exits when its stdin closes
    for worker in workers:
        try:
            await asyncio.wait_for(worker.process.wait(), 5)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                worker.process.kill()
            await worker.process.wait()
        if worker.reader is not None:
            worker.reader.cancel()
            await asyncio.gather(worker.reader, return_exceptions=True)


async def link_sites(workers: list[Worker], collector: Collector, timeout_s: float) -> None:
    """Tell the workers their sites are registered (GO), then wait until every site has
    reported once (READY from every worker)."""
    for worker in workers:
        assert worker.process.stdin is not None
        worker.process.stdin.write(b"GO\n")
        await worker.process.stdin.drain()
        worker.reader = asyncio.create_task(read_worker(worker, collector))

    async def show_progress() -> None:
        started = time.monotonic()
        while True:
            await asyncio.sleep(10.0)
            linked = sum(collector.linked.values())
            kinds = Counter(
                re.sub(r"site-\d+|\d+", "N", " ".join(e.split()[2:])[:90])
                for e in collector.errors[-1000:]
            )
            log(
                f"  {time.monotonic() - started:.0f} s: {collector.ready_workers} of "
                f"{len(workers)} workers' sites all linked; others' linked so far: {linked}; "
                f"link errors {len(collector.errors)}, lately: {kinds.most_common(3)}"
            )

    progress = asyncio.create_task(show_progress())
    try:
        await collector.wait(
            lambda: collector.ready_workers == len(workers), timeout_s, "every site reporting once"
        )
    finally:
        progress.cancel()


async def register_sites(admin: Admin, workers: list[Worker]) -> None:
    limit = asyncio.Semaphore(8)

    async def register(number: int, site: str, key: str) -> None:
        body = {"id": site, "labels": {"bench": "fanout", "shard": str(number % 10)},
                "public_key": key}  # fmt: skip
        async with limit:
            status, answer = await admin.call("POST", "/v1/sites", body)
        if status != 201:
            raise RuntimeError(f"registering {site}: {status} {answer}")

    keys = sorted((s, k) for w in workers for s, k in w.keys.items())
    await asyncio.gather(*(register(i, s, k) for i, (s, k) in enumerate(keys)))


async def deploy_once(
    admin: Admin, collector: Collector, sites: list[str], index: int, timeout_s: float
) -> Deployment:
    version = str(index)
    # One wave up to the API's largest (placement.MAX_PARALLEL), then waves of that many.
    wave = min(len(sites), MAX_PARALLEL)
    body = {"spec": app_spec(version), "placement": {"max_parallel": wave}}
    t0 = time.time()
    status, answer = await admin.call("POST", "/v1/apps", body)
    api_s = time.time() - t0
    if status != 202:
        raise RuntimeError(f"deploying version {version}: {status} {answer}")
    dep_id = str(answer["id"])
    delta = int(answer["deltas"][0])
    done = collector.applied.setdefault(version, {})
    try:
        await collector.wait(
            lambda: len(done) >= len(sites), timeout_s, f"deployment {index} ({dep_id})"
        )
    except TimeoutError as exc:
        missing = [s for s in sites if s not in done]
        raise TimeoutError(
            f"{exc}: {len(missing)} of {len(sites)} sites never reported version {version} "
            f"applied: {', '.join(missing[:20])}{' ...' if len(missing) > 20 else ''}"
        ) from None
    # The hub's own view: its rollout driver sees every site healthy (tick 0.2 s).
    deadline = time.monotonic() + timeout_s
    while True:
        status, state = await admin.call("GET", f"/v1/deployments/{dep_id}")
        if status == 200 and state["state"] == "succeeded":
            hub_done_s = time.time() - t0
            break
        if status != 200 or state["state"] not in ("running", "succeeded"):
            raise RuntimeError(f"deployment {dep_id}: {status} {state}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"deployment {dep_id} not succeeded at the hub: {state}")
        await asyncio.sleep(0.02)
    return Deployment(
        index=index,
        version=version,
        deployment_id=dep_id,
        delta=delta,
        api_s=api_s,
        fetched=[a.fetched - t0 for a in done.values()],
        acked=[a.acked - t0 for a in done.values()],
        hub_done_s=hub_done_s,
    )


async def run_fanout(
    args: argparse.Namespace, root: Path, pids: list[int]
) -> tuple[list[Deployment], int]:
    sites = site_ids(args.sites)
    hub = LocalHub(root / "hub", fleet=FLEET, log_level="warning")
    workers: list[Worker] = []
    collector = Collector()
    main_task = asyncio.current_task()
    if main_task is not None:  # SIGTERM cleans up as Ctrl-C does
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, main_task.cancel)
    log(f"starting the hub on {hub.url}")
    hub.start()
    if hub.process is not None:
        pids.append(hub.process.pid)
    try:
        async with aiohttp.ClientSession() as session:
            root_key = await hub.wait_ready(session)
            admin = Admin(session, hub.url, hub.admin_token)
            log(f"starting {args.sites} light sites in {args.workers} worker process(es)")
            workers = await start_workers(args, hub.url, root_key, sites, pids)
            await register_sites(admin, workers)
            log(f"registered {len(sites)} sites with their public keys")
            await link_sites(workers, collector, 60)
            await asyncio.sleep(1.0)  # every site's long-poll is waiting at the hub
            log("every site linked (report accepted, long-poll waiting)")
            deployments = []
            for index in range(1, args.deployments + 1):
                dep = await deploy_once(admin, collector, sites, index, args.timeout)
                deployments.append(dep)
                log(
                    f"deployment {index}/{args.deployments} ({dep.deployment_id}, delta "
                    f"{dep.delta}): every site applied in {dep.all_sites_s:.3f} s "
                    f"(p50 {percentile(dep.acked, 0.5):.3f} s), hub done {dep.hub_done_s:.3f} s"
                )
                await asyncio.sleep(args.pause)
            if collector.rejected:
                raise RuntimeError(f"sites rejected deltas: {collector.rejected[:5]}")
            return deployments, len(collector.errors)
    except Exception:
        log(f"--- hub log (tail) ---\n{hub.logs()}")
        raise
    finally:
        await stop_workers(workers)
        hub.stop()


def kill_leftovers(pids: list[int]) -> None:
    """Last resort (the async clean-up did not run to the end): our children only."""
    for pid in pids:
        try:
            if os.waitpid(pid, os.WNOHANG) != (0, 0):
                continue  # exited and reaped just now
        except ChildProcessError:
            continue  # already reaped: the pid may belong to someone else by now
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


# -- output --------------------------------------------------------------------------------


def print_table(deployments: list[Deployment]) -> None:
    print(
        f"{'deploy':>6} {'delta':>5} {'api_s':>7} {'fetch_max':>9} {'site_p50':>8} "
        f"{'site_p99':>8} {'all_sites':>9} {'hub_done':>8}"
    )
    for d in deployments:
        print(
            f"{d.index:>6} {d.delta:>5} {d.api_s:7.3f} {max(d.fetched):9.3f} "
            f"{percentile(d.acked, 0.5):8.3f} {percentile(d.acked, 0.99):8.3f} "
            f"{d.all_sites_s:9.3f} {d.hub_done_s:8.3f}"
        )
    print(
        "  seconds from just before POST /v1/apps. api_s: its answer; fetch_max: the last\n"
        "  site's long-poll answer carrying the delta; site_p50/p99: the hub acknowledging\n"
        "  the sites' reports of the version applied; all_sites: the last of them;\n"
        "  hub_done: the hub marks the deployment succeeded"
    )


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Last line: RESULT fanout_p99_s=... verify_per_s=... verify_ratio=...",
    )
    parser.add_argument("--sites", type=int, default=100, help="light sites (default 100)")
    parser.add_argument(
        "--deployments", type=int, default=5, help="versions deployed in turn (default 5)"
    )
    parser.add_argument(
        "--workers", type=int, default=4, help="processes the sites are spread over (default 4)"
    )
    parser.add_argument(
        "--timeout", type=float, default=60.0, help="give up on a deployment after (s)"
    )
    parser.add_argument(
        "--pause", type=float, default=0.5, help="pause between deployments (s, default 0.5)"
    )
    parser.add_argument(
        "--chain", type=int, default=2000, help="deltas in the verification chain (default 2000)"
    )
    parser.add_argument(
        "--passes", type=int, default=5, help="verification passes, median (default 5)"
    )
    args = parser.parse_args()
    if args.sites < 1 or args.deployments < 1 or args.workers < 1 or args.chain < 1:
        parser.error("--sites, --deployments, --workers and --chain must be >= 1")

    log(f"verification on one core: a chain of {args.chain} deltas, {args.passes} passes")
    rates = measure_verify(args.chain, args.sites, args.passes)
    log(
        f"verify_chain {rates.verify_per_s:.0f}/s, raw Ed25519 {rates.raw_per_s:.0f}/s "
        f"(bodies {rates.body_bytes} B)"
    )

    pids: list[int] = []
    with tempfile.TemporaryDirectory(prefix="meshorch-fanout-") as tmp:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                deployments, link_errors = runner.run(run_fanout(args, Path(tmp), pids))
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: the hub and the sites are stopped")
            return 130
        except (RuntimeError, TimeoutError) as exc:
            log(f"deploy_fanout: {exc}")
            return 1
        finally:
            kill_leftovers(pids)

    per_site = [t for d in deployments for t in d.acked]
    all_sites = [d.all_sites_s for d in deployments]
    fanout_p50, fanout_p99 = percentile(per_site, 0.5), percentile(per_site, 0.99)
    all_p50, all_p99 = percentile(all_sites, 0.5), percentile(all_sites, 0.99)
    print(f"deployment fan-out: {args.sites} sites, {args.deployments} deployments, one wave")
    print_table(deployments)
    print(
        f"per-site latency ({len(per_site)} samples): p50 {fanout_p50:.3f} s, "
        f"p99 {fanout_p99:.3f} s, max {max(per_site):.3f} s  (fanout_p99_s; target "
        f"<= {TARGET_P99_S:g} s: {'met' if fanout_p99 <= TARGET_P99_S else 'MISSED'})"
    )
    print(
        f"every site applied, per deployment ({len(all_sites)} samples): "
        f"p50 {all_p50:.3f} s, p99 {all_p99:.3f} s"
    )
    if link_errors:
        print(f"link errors during the run (sites retried): {link_errors}")
    print(
        f"verification, one core, {rates.deltas} deltas of {rates.envelope_bytes} B "
        f"(body {rates.body_bytes} B): verify_chain {rates.verify_per_s:.0f}/s, "
        f"PyNaCl verify {rates.raw_per_s:.0f}/s, ratio {rates.ratio:.3f}"
    )
    print(
        f"RESULT fanout_p99_s={fanout_p99:.3f} verify_per_s={rates.verify_per_s:.0f} "
        f"verify_ratio={rates.ratio:.3f} fanout_p50_s={fanout_p50:.3f} "
        f"all_sites_p50_s={all_p50:.3f} all_sites_p99_s={all_p99:.3f} "
        f"raw_verify_per_s={rates.raw_per_s:.0f} sites={args.sites} "
        f"deployments={args.deployments}"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
