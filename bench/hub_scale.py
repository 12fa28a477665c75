"""Hub scale: N simulated sites against a 3-replica hub on this machine, at 1,000 and 10,000.

A replicated hub (``bench/hubcluster.py``: three ``meshorch hub --raft`` processes, TLS,
fsync'd Raft journal) and ``--sites`` light sites (``bench/fanout_site.py``: the real link
protocol: signed requests, long-polls, verified deltas, a report every 3 s) spread over
``--workers`` processes, each site given every replica's URL (as an agent is): a site
starts at the replica its id picks (``meshorch.fleet.client.first_replica``), so the load
lands on every replica's front. For each size:

1. register every site (with its key) through the API, start the sites, wait until each
   has reported once;
2. steady state for ``--measure`` seconds: the replicas' CPU time (``/proc``), their memory
   (RSS), the reports the hub took (against the N/3 per second the sites send; a
   routine report is sent quiet, as an agent sends it, and counts when no error came back),
   and operator API latency sampled meanwhile (``GET /v1/sites?limit=100``, ``GET
   /v1/sites/ID``);
3. ``--deployments`` deployments of one application to every site (one wave): the deploy
   call's latency, and each site's time from the call to its report of the new version
   acknowledged (deploy-to-all p99).

Goals (issue 20): 10,000 sites held by the 3 replicas together at under one core, API p99
<= 50 ms, deploy reaching all 10,000 sites p99 <= 10 s. The site simulators run on the same
machine and take CPU of their own: the hub's share is what ``hub_cpu_cores`` counts.

    python bench/hub_scale.py                         # 1,000 then 10,000 sites
    python bench/hub_scale.py --sizes 200 --measure 10   # smoke test

Last line: ``RESULT sites=... hub_cpu_cores=... api_p99_s=... deploy_all_p99_s=...
rss_mb_per_1k_sites=...`` for the largest size, with the same figures of the others.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import resource
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.deploy_fanout import (
    FLEET,
    Admin,
    Collector,
    Worker,
    deploy_once,
    kill_leftovers,
    link_sites,
    percentile,
    register_sites,
    start_workers,
    stop_workers,
)
from bench.hubcluster import Cluster, cluster
from bench.raft_write import rss_mb

GOAL_CORES = 1.0
GOAL_API_P99_S = 0.050
GOAL_DEPLOY_P99_S = 10.0
SITES_PER_WORKER = 2500
CLOCK_TICK = os.sysconf("SC_CLK_TCK")


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass
class Figures:
    sites: int
    hub_cpu_cores: float
    sites_cpu_cores: float  # the simulators', on the same machine
    rss_mb: float
    reports_per_s: float
    api_list_p99_s: float
    api_get_p99_s: float
    deploy_api_p99_s: float
    deploy_all_p99_s: float
    link_errors: int

    @property
    def api_p99_s(self) -> float:
        return max(self.api_list_p99_s, self.api_get_p99_s, self.deploy_api_p99_s)

    @property
    def rss_mb_per_1k(self) -> float:
        return self.rss_mb / (self.sites / 1000)


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICK  # utime, stime


def replica_pids(running: Cluster) -> list[int]:
    return [r.process.pid for r in running.replicas if r.process is not None]


async def sample_api(admin: Admin, sites: list[str], stop: asyncio.Event) -> dict[str, list[float]]:
    """Operator reads while the sites report, one at a time, a few per second."""
    latencies: dict[str, list[float]] = {"list": [], "get": []}
    while not stop.is_set():
        for kind, path in (
            ("list", "/v1/sites?limit=100"),
            ("get", f"/v1/sites/{random.choice(sites)}"),
        ):
            started = time.perf_counter()
            status, answer = await admin.call("GET", path)
            if status != 200:
                raise RuntimeError(f"GET {path}: {status} {answer}")
            latencies[kind].append(time.perf_counter() - started)
        await asyncio.sleep(0.2)
    return latencies


async def run_size(
    args: argparse.Namespace, sites_count: int, root: Path, pids: list[int]
) -> Figures:
    sites = [f"site-{i:05d}" for i in range(sites_count)]
    collector = Collector()
    workers: list[Worker] = []
    async with (
        aiohttp.ClientSession() as session,
        cluster(root, session, 3, "--fleet", FLEET, *log_flags(args)) as running,
    ):
        pids.extend(replica_pids(running))
        fleet = await running.ready(running.replicas[0].url)
        urls = [r.url for r in running.replicas]
        fingerprint = aiohttp.Fingerprint(bytes.fromhex(running.fingerprint))
        admin = Admin(session, urls[0], running.token, ssl=fingerprint)
        worker_args = argparse.Namespace(
            workers=max(args.workers, -(-sites_count // SITES_PER_WORKER))
        )
        log(f"{sites_count} sites: starting {worker_args.workers} site worker(s)")

        try:
            workers = await start_workers(
                worker_args, ",".join(urls), fleet["root_key"], sites, pids,
                "--hub-fingerprint", running.fingerprint,
                "--start-within", str(sites_count / args.start_rate),
            )  # fmt: skip
            started = time.monotonic()
            await register_sites(admin, workers)
            log(f"registered {sites_count} sites in {time.monotonic() - started:.1f} s")
            await link_sites(workers, collector, args.link_timeout)
            log(f"every site linked after {time.monotonic() - started:.1f} s; measuring")
            await asyncio.sleep(3.0)  # past the first burst of reports
            hub = replica_pids(running)
            simulators = [worker.process.pid for worker in workers]
            cpu0, reports0, t0 = sum(map(cpu_seconds, hub)), collector.reports, time.monotonic()
            sites_cpu0 = sum(map(cpu_seconds, simulators))
            stop = asyncio.Event()
            sampler = asyncio.create_task(sample_api(admin, sites, stop))
            await asyncio.sleep(args.measure)
            stop.set()
            latencies = await sampler
            wall = time.monotonic() - t0
            cores = (sum(map(cpu_seconds, hub)) - cpu0) / wall
            sites_cores = (sum(map(cpu_seconds, simulators)) - sites_cpu0) / wall
            reports_per_s = (collector.reports - reports0) / wall
            memory = sum(map(rss_mb, hub))
            log(
                f"steady state: hub {cores:.2f} cores (the site simulators {sites_cores:.2f} of "
                f"this machine's {os.cpu_count()}), {memory:.0f} MB RSS, "
                f"{reports_per_s:.0f} reports/s taken (sent: {sites_count / 3:.0f}/s)"
            )
            deployments = []
            for index in range(1, args.deployments + 1):
                deployment = await deploy_once(admin, collector, sites, index, args.timeout)
                deployments.append(deployment)
                p99 = percentile(deployment.acked, 0.99)
                log(
                    f"deployment {index}: API {deployment.api_s * 1000:.0f} ms, every site "
                    f"{deployment.all_sites_s:.2f} s (p50 {percentile(deployment.acked, 0.5):.2f}"
                    f" s, p99 {p99:.2f} s; fetched p50 {percentile(deployment.fetched, 0.5):.2f}"
                    f" s, p99 {percentile(deployment.fetched, 0.99):.2f} s)"
                )
            if collector.rejected:
                raise RuntimeError(f"sites rejected deltas: {collector.rejected[:5]}")
        except Exception:
            for number in range(1, len(running.replicas) + 1):
                lines = (root / f"r{number}.log").read_text(errors="replace").splitlines()
                log(f"--- replica r{number} log (tail) ---\n" + "\n".join(lines[-15:]))
            raise
        finally:
            await stop_workers(workers)
    return Figures(
        sites=sites_count,
        hub_cpu_cores=cores,
        sites_cpu_cores=sites_cores,
        rss_mb=memory,
        reports_per_s=reports_per_s,
        api_list_p99_s=percentile(latencies["list"], 0.99),
        api_get_p99_s=percentile(latencies["get"], 0.99),
        deploy_api_p99_s=percentile([d.api_s for d in deployments], 0.99),
        deploy_all_p99_s=percentile([t for d in deployments for t in d.acked], 0.99),
        link_errors=len(collector.errors),
    )


def log_flags(args: argparse.Namespace) -> list[str]:
    """The replicas log warnings only, unless the run is kept to be read afterwards."""
    return ["--log-level", "info"] if args.keep else []


@contextlib.contextmanager
def run_dir(keep: Path | None) -> Iterator[Path]:
    """Where the replicas' data directories and logs go: ``keep`` (left in place), else
    a temporary directory removed at the end."""
    if keep is None:
        with tempfile.TemporaryDirectory(prefix="meshorch-hubscale-") as tmp:
            yield Path(tmp)
        return
    keep.mkdir(parents=True, exist_ok=True)
    if any(keep.iterdir()):
        raise SystemExit(f"hub_scale: --keep {keep}: not empty (each run needs its own)")
    yield keep
    log(f"kept: the replicas' data directories and info-level logs in {keep}/<sites>/")


def verdict(value: float, goal: float) -> str:
    return "met" if value <= goal else "MISSED"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Last line: RESULT sites=... hub_cpu_cores=... api_p99_s=... "
        "deploy_all_p99_s=... rss_mb_per_1k_sites=...",
    )
    parser.add_argument(
        "--sizes", default="1000,10000", help="site counts, comma-separated (default %(default)s)"
    )
    parser.add_argument("--measure", type=float, default=30.0, help="steady-state seconds")
    parser.add_argument(
        "--start-rate",
        type=float,
        default=100.0,
        help="sites coming up per second, spread at random (default %(default)g: each "
        "opens two TLS connections, and the simulators share this machine's cores)",
    )
    parser.add_argument("--deployments", type=int, default=3, help="deployments per size")
    parser.add_argument("--workers", type=int, default=2, help="site worker processes (at least)")
    parser.add_argument("--timeout", type=float, default=120.0, help="per deployment (s)")
    parser.add_argument(
        "--link-timeout", type=float, default=300.0, help="for every site to report once (s)"
    )
    parser.add_argument(
        "--keep",
        type=Path,
        metavar="DIR",
        help="run in DIR (new or empty) and keep it: each size's replica data directories "
        "and logs (rN.log, at info level: leader changes, slow commits, relay pushes not "
        "taken), to find out afterwards why a run failed",
    )
    args = parser.parse_args()
    try:
        sizes = [int(size) for size in args.sizes.split(",")]
    except ValueError:
        parser.error("--sizes: site counts, e.g. 1000,10000")
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < 4 * max(sizes) + 1024:
        log(
            f"note: the open-files limit is {hard}; {max(sizes)} sites need about "
            f"{4 * max(sizes)} sockets in the leader replica (raise it: ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # children inherit it
    figures: list[Figures] = []
    pids: list[int] = []
    with run_dir(args.keep) as tmp:
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                for size in sizes:
                    figures.append(runner.run(run_size(args, size, tmp / str(size), pids)))
        except (KeyboardInterrupt, asyncio.CancelledError):
            log("interrupted: the hub and the sites are stopped")
            return 130
        except (RuntimeError, TimeoutError, AssertionError, aiohttp.ClientError) as exc:
            log(f"hub_scale: {exc}")
            return 1
        finally:
            kill_leftovers(pids)
    print(f"{'sites':>7} {'hub cores':>9} {'RSS MB':>7} {'MB/1k':>6} {'reports/s':>9} "
          f"{'list p99':>9} {'get p99':>8} {'deploy p99':>10} {'to all p99':>10}")  # fmt: skip
    for f in figures:
        print(
            f"{f.sites:>7} {f.hub_cpu_cores:>9.2f} {f.rss_mb:>7.0f} {f.rss_mb_per_1k:>6.1f} "
            f"{f.reports_per_s:>9.0f} {f.api_list_p99_s * 1000:>7.0f}ms "
            f"{f.api_get_p99_s * 1000:>6.0f}ms {f.deploy_api_p99_s * 1000:>8.0f}ms "
            f"{f.deploy_all_p99_s:>9.2f}s"
        )
    last = figures[-1]
    if len(figures) > 1:
        first = figures[0]
        growth = last.sites / first.sites
        cpu_growth = last.hub_cpu_cores / first.hub_cpu_cores
        print(
            f"growth {first.sites} -> {last.sites} sites (x{growth:g}): hub CPU "
            f"x{cpu_growth:.1f}, memory x{last.rss_mb / first.rss_mb:.1f}"
        )
    print(
        f"goals at {last.sites} sites: hub CPU {last.hub_cpu_cores:.2f} cores (<= {GOAL_CORES:g}: "
        f"{verdict(last.hub_cpu_cores, GOAL_CORES)}), API p99 {last.api_p99_s * 1000:.0f} ms "
        f"(<= 50 ms: {verdict(last.api_p99_s, GOAL_API_P99_S)}), deploy to all p99 "
        f"{last.deploy_all_p99_s:.2f} s "
        f"(<= 10 s: {verdict(last.deploy_all_p99_s, GOAL_DEPLOY_P99_S)})"
    )
    others = " ".join(
        f"cores_{f.sites}={f.hub_cpu_cores:.2f} api_p99_{f.sites}={f.api_p99_s:.3f} "
        f"deploy_all_p99_{f.sites}={f.deploy_all_p99_s:.2f} "
        f"reports_per_s_{f.sites}={f.reports_per_s:.0f}"
        for f in figures[:-1]
    )
    print(
        f"RESULT sites={last.sites} hub_cpu_cores={last.hub_cpu_cores:.2f} "
        f"api_p99_s={last.api_p99_s:.3f} deploy_all_p99_s={last.deploy_all_p99_s:.2f} "
        f"rss_mb_per_1k_sites={last.rss_mb_per_1k:.1f} reports_per_s={last.reports_per_s:.0f} "
        f"sites_cpu_cores={last.sites_cpu_cores:.2f} "
        f"link_errors={last.link_errors} {others}".rstrip()
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
