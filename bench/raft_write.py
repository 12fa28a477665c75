"""Replicated writes per second: a 3-host meshorch site against a 3-member etcd cluster.

Both run on loopback and are driven through their HTTP APIs by the same
aiohttp load generator (bench/loadgen.py, on uvloop): 100-byte values over a
keyspace of 1,000 keys, requests spread round-robin over the three members.
etcd is driven through its JSON gateway (``POST /v3/kv/put``). Reported:
writes/s at concurrency 64 and 256, p50/p99 latency at concurrency 1 and 64, the ratios
meshorch/etcd, each agent's resident memory after the run, and the servers'
CPU time per write at concurrency 64, summed over the members (less sensitive
than writes/s to whatever else the machine runs meanwhile).

Both acknowledge a write once it is on disk: the agents run with ``--durability
power`` (each member fdatasyncs its Raft journal before it answers an append or
acknowledges a write; a leader's appends leave before its own sync, which runs
meanwhile, as etcd's leader writes its WAL while it replicates), etcd fsyncs its WAL.
The writes name no client session: the agent puts each in one of its own pooled
sessions, so that it can resend it safely across a leader change (that work is in
meshorch's figures). On a shared machine compare the ratios of one run, not figures
across runs.

    python bench/raft_write.py            # full run (about 2 minutes)
    python bench/raft_write.py --quick    # under 45 s
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import uvloop
from yarl import URL

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.loadgen import LoadResult, RequestFn, median, run_load
from meshorch.demo.localsite import LocalSite, free_port, wait_ready

VALUE = b"v" * 100
KEYSPACE = 1000


@dataclass
class Phase:
    name: str
    concurrency: int
    duration_s: float


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ensure_etcd() -> str:
    found = shutil.which("etcd")
    if found:
        return found
    if os.geteuid() != 0:
        raise SystemExit("etcd not found: install the Debian package etcd-server (needs root)")
    log("installing etcd-server (the benchmark's anchor)")
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "install", "-y", "-q", "etcd-server"], check=True, env=env,
                   stdout=subprocess.DEVNULL)  # fmt: skip
    found = shutil.which("etcd")
    if not found:
        raise SystemExit("etcd-server installed but no etcd binary on PATH")
    return found


# -- meshorch ---------------------------------------------------------------------


def meshorch_request(urls: list[str], headers: dict[str, str]) -> RequestFn:
    # Request URLs are built once, so the load generator spends its time on requests;
    # ``headers`` carry the agents' access token.
    targets = [
        [URL(f"{url}/v1/kv/bench/{k}", encoded=True) for k in range(KEYSPACE)] for url in urls
    ]

    async def put(session: aiohttp.ClientSession, worker: int, seq: int) -> bool:
        target = targets[(worker + seq) % len(targets)][(worker * 7919 + seq) % KEYSPACE]
        async with session.put(target, data=VALUE, headers=headers) as response:
            await response.read()
            return response.status == 200

    return put


# -- etcd ---------------------------------------------------------------------------


@contextmanager
def etcd_cluster(binary: str, root: Path) -> Iterator[tuple[list[str], list[int]]]:
    names = ["e1", "e2", "e3"]
    client = {n: free_port() for n in names}
    peer = {n: free_port() for n in names}
    initial = ",".join(f"{n}=http://127.0.0.1:{peer[n]}" for n in names)
    processes = []
    try:
        for name in names:
            command = [
                binary, "--name", name, "--data-dir", str(root / name),
                "--listen-client-urls", f"http://127.0.0.1:{client[name]}",
                "--advertise-client-urls", f"http://127.0.0.1:{client[name]}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer[name]}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer[name]}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", "meshorch-bench", "--logger", "zap",
                "--log-level", "error",
            ]  # fmt: skip
            log_file = open(root / f"{name}.log", "wb")  # noqa: SIM115 - the child owns it
            processes.append(subprocess.Popen(command, stdout=log_file, stderr=log_file))
            log_file.close()
        yield [f"http://127.0.0.1:{client[n]}" for n in names], [p.pid for p in processes]
    finally:
        for process in processes:
            process.send_signal(signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                process.kill()


async def wait_etcd(urls: list[str], timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    body = {"key": base64.b64encode(b"bench/ready").decode(), "value": "eA=="}
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                ok = 0
                for url in urls:
                    async with session.post(f"{url}/v3/kv/put", json=body) as response:
                        ok += response.status == 200
                if ok == len(urls):
                    return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError("etcd cluster not ready")


def etcd_request(urls: list[str]) -> RequestFn:
    # As for meshorch: URLs and JSON bodies are built once.
    targets = [URL(f"{url}/v3/kv/put", encoded=True) for url in urls]
    value_b64 = base64.b64encode(VALUE).decode()
    bodies = [
        json.dumps({"key": base64.b64encode(b"bench/%d" % k).decode(), "value": value_b64}).encode()
        for k in range(KEYSPACE)
    ]
    headers = {"Content-Type": "application/json"}

    async def put(session: aiohttp.ClientSession, worker: int, seq: int) -> bool:
        target = targets[(worker + seq) % len(targets)]
        body = bodies[(worker * 7919 + seq) % KEYSPACE]
        async with session.post(target, data=body, headers=headers) as response:
            await response.read()
            return response.status == 200

    return put


# -- driver -------------------------------------------------------------------------


@dataclass
class Measured:
    results: dict[str, list[LoadResult]] = field(default_factory=dict)
    cpu_s: float = 0.0  # the servers' CPU time during the c64 phases
    requests: int = 0  # requests answered during the c64 phases, warm-up included

    @property
    def cpu_us_per_write(self) -> float:
        return self.cpu_s / self.requests * 1e6 if self.requests else float("nan")


def cpu_seconds(pids: list[int]) -> float:
    ticks = 0
    for pid in pids:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        ticks += int(fields[11]) + int(fields[12])  # utime + stime
    return ticks / os.sysconf("SC_CLK_TCK")


async def measure(
    request: RequestFn, pids: list[int], phases: list[Phase], rounds: int
) -> Measured:
    measured = Measured({p.name: [] for p in phases})
    for round_number in range(rounds):
        for phase in phases:
            cpu_before = cpu_seconds(pids)
            result = await run_load(request, phase.concurrency, phase.duration_s, warmup_s=0.5)
            if phase.name == "c64":
                measured.cpu_s += cpu_seconds(pids) - cpu_before
                measured.requests += result.completed
            measured.results[phase.name].append(result)
            log(
                f"  round {round_number + 1} {phase.name:>5}: {result.per_second:8.0f} writes/s "
                f"p50 {result.p50_ms:6.2f} ms p99 {result.p99_ms:6.2f} ms "
                f"({result.failed} failed)"
            )
    return measured


def summarise(measured: Measured) -> dict[str, float]:
    results = measured.results
    return {
        "wps": median([r.per_second for r in results["c64"]]),
        "c1_wps": median([r.per_second for r in results["c1"]]),
        "c1_p50": median([r.p50_ms for r in results["c1"]]),
        "c1_p99": median([r.p99_ms for r in results["c1"]]),
        "c64_p50": median([r.p50_ms for r in results["c64"]]),
        "c64_p99": median([r.p99_ms for r in results["c64"]]),
        "c256_wps": median([r.per_second for r in results["c256"]]),
        "failed": float(sum(r.failed for rs in results.values() for r in rs)),
        "cpu_us": measured.cpu_us_per_write,
    }


async def bench_meshorch(
    phases: list[Phase], rounds: int, root: Path, durability: str
) -> tuple[dict[str, float], list[float]]:
    site = LocalSite(
        hosts=3,
        site="bench",
        root=root,
        log_level="warning",
        extra_args=["--durability", durability],
    )
    site.start()
    try:
        async with site.session() as session:
            await wait_ready(session, site.members, timeout_s=60)
        log("meshorch: 3 agents ready")
        pids = [h.pid for h in site.members if h.pid is not None]
        measured = await measure(
            meshorch_request([h.url for h in site.members], site.headers), pids, phases, rounds
        )
        rss = [rss_mb(pid) for pid in pids]
        return summarise(measured), rss
    finally:
        site.stop()


async def bench_etcd(phases: list[Phase], rounds: int, root: Path) -> dict[str, float]:
    binary = ensure_etcd()
    with etcd_cluster(binary, root) as (urls, pids):
        await wait_etcd(urls)
        log("etcd: 3 members ready")
        return summarise(await measure(etcd_request(urls), pids, phases, rounds))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short run, under 45 s")
    parser.add_argument("--rounds", type=int, help="alternating rounds per system (median)")
    parser.add_argument("--duration", type=float, help="seconds per measured phase")
    parser.add_argument(
        "--durability",
        choices=["power", "process"],
        default="power",
        help="the agents' --durability (default power: fdatasync'd before acknowledged, "
        "as etcd's WAL is)",
    )
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 3)
    duration_s = args.duration or (3.0 if args.quick else 8.0)
    phases = [
        Phase("c1", 1, duration_s / 2),
        Phase("c64", 64, duration_s),
        Phase("c256", 256, duration_s),
    ]
    with tempfile.TemporaryDirectory(prefix="meshorch-bench-") as tmp:
        root = Path(tmp)
        (root / "meshorch").mkdir()
        (root / "etcd").mkdir()
        log(
            f"meshorch (--durability {args.durability}) vs etcd (WAL fsync'd), "
            f"{rounds} round(s) of {duration_s:g}s at concurrency 64"
        )
        # The load generator runs on uvloop, as the agents do: less of the machine's
        # CPU goes to the client, for both systems alike.
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            ours, rss = runner.run(
                bench_meshorch(phases, rounds, root / "meshorch", args.durability)
            )
        with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
            theirs = runner.run(bench_etcd(phases, rounds, root / "etcd"))
    ratio = ours["wps"] / theirs["wps"] if theirs["wps"] else float("nan")
    ratio256 = ours["c256_wps"] / theirs["c256_wps"] if theirs["c256_wps"] else float("nan")
    print(
        f"{'':10} {'writes/s c64':>13} {'c256':>6} {'c1 p50':>8} {'c1 p99':>8} "
        f"{'c64 p50':>8} {'c64 p99':>8}"
    )
    for name, row in (("meshorch", ours), ("etcd", theirs)):
        print(
            f"{name:10} {row['wps']:13.0f} {row['c256_wps']:6.0f} {row['c1_p50']:7.2f}ms "
            f"{row['c1_p99']:7.2f}ms "
            f"{row['c64_p50']:7.2f}ms {row['c64_p99']:7.2f}ms"
        )
    print(f"agent RSS after the run (MB): {', '.join(f'{r:.1f}' for r in rss)}")
    print(
        "server CPU per write at c64, all members (us): "
        f"meshorch {ours['cpu_us']:.0f}, etcd {theirs['cpu_us']:.0f}"
    )
    print(
        f"RESULT meshorch_wps={ours['wps']:.0f} etcd_wps={theirs['wps']:.0f} "
        f"ratio={ratio:.2f} ratio_c256={ratio256:.2f} c1_p50_ms={ours['c1_p50']:.2f} "
        f"etcd_c1_p50_ms={theirs['c1_p50']:.2f} agent_rss_mb={max(rss):.1f} "
        f"durability={args.durability} "
        "etcd_durability=power"  # etcd fsyncs its WAL before it acknowledges, always
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
