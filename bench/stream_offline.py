"""Events accepted by a site cut off from the hub, and the backlog forwarded after it heals.

A real three-host site (agents in subprocesses, Raft over loopback) linked to a real hub
(in this process) through a relay that the benchmark cuts like a dead uplink. Events are
produced over HTTP in batches (``--batch`` events of ``--payload`` bytes) and each
produce call returns once a majority of the hosts stored the batch.

- ``offline_eps``: events/s one host accepts from a producer while the uplink is down
  (acknowledged, replicated to a majority), the median of ``--runs`` runs of
  ``--events`` events each. Target: >= 50,000/s.
- site-wide: the same with one producer per host at once (printed, not in RESULT).
- ``forward_eps``: events/s of the backlog reaching the hub after the uplink heals
  (from the heal to the hub's position reaching the last event), exactly once.

    python bench/stream_offline.py                  # 3 runs of 200,000 events
    python bench/stream_offline.py --events 50000   # quick

The last line is ``RESULT offline_eps=<int> forward_eps=<int>``.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from central_hub import Hub, HubConfig
from meshorch.demo.localsite import LocalHost, wait_ready
from tests.agent_token import HEADERS
from tests.agents_util import linked_site
from tests.streams.uplink import Uplink

SITE = "bench-site"
STREAM = "acme/sensors/readings"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def produce(session: aiohttp.ClientSession, host: LocalHost, bodies: list[bytes]) -> int:
    count = 0
    for body in bodies:
        async with session.post(
            f"{host.url}/v1/streams/{STREAM}/events",
            data=body,
            headers={"Content-Type": "application/json"},
        ) as response:
            answer = await response.json()
            if response.status != 200:
                raise SystemExit(f"produce refused: {answer}")
            count += answer["count"]
    return count


def make_bodies(events: int, batch: int, payload: int, tag: str) -> list[bytes]:
    filler = "x" * max(0, payload - 24)
    bodies = []
    for start in range(0, events, batch):
        n = min(batch, events - start)
        lines = [{"payload": f"{tag} {start + i:010d} {filler}"} for i in range(n)]
        bodies.append(orjson.dumps({"events": lines}))
    return bodies


async def hub_position(hub: Hub) -> int:
    return (await asyncio.to_thread(hub.logs.store.positions, SITE)).get(STREAM, 0)


async def run(args: argparse.Namespace, root: Path) -> tuple[float, float]:
    config = HubConfig(data_dir=root / "hub", port=0, insecure_http=True, gossip=False)
    async with (
        Hub(config) as hub,
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120), headers=HEADERS) as session,
    ):
        # The session carries the agents' token (LocalSite's, from tests.agent_token); the
        # hub's calls carry the hub's own.
        headers = {"Authorization": "Bearer " + hub.admin_token_path.read_text().strip()}
        for path, body in (("/v1/tenants", {"id": "acme"}), ("/v1/sites", {"id": SITE})):
            async with session.post(hub.url + path, json=body, headers=headers) as response:
                created = await response.json()
                assert response.status == 201, created
        host, port = hub.url.removeprefix("http://").rsplit(":", 1)
        uplink = Uplink(host, int(port))
        await uplink.start()
        site = linked_site(root / "site", hub, SITE, created["enroll_token"], via=uplink.url)
        site.start()
        try:
            await wait_ready(session, site.members, timeout_s=60)
            hosts = site.members
            await produce(session, hosts[0], make_bodies(1, 1, args.payload, "warmup"))
            deadline = time.monotonic() + 60
            while await hub_position(hub) < 1:
                if time.monotonic() > deadline:
                    raise SystemExit("the site did not link to the hub within 60 s")
                await asyncio.sleep(0.2)
            uplink.sever()
            log("uplink cut; producing")
            rates = []
            for n in range(args.runs):
                bodies = make_bodies(args.events, args.batch, args.payload, f"run{n}")
                started = time.perf_counter()
                count = await produce(session, hosts[n % len(hosts)], bodies)
                rate = count / (time.perf_counter() - started)
                rates.append(rate)
                log(f"run {n + 1}/{args.runs}: one host accepted {rate:,.0f} events/s")
            per_host = args.events // len(hosts)
            started = time.perf_counter()
            counts = await asyncio.gather(
                *(
                    produce(session, h, make_bodies(per_host, args.batch, args.payload, h.host_id))
                    for h in hosts
                )
            )
            site_rate = sum(counts) / (time.perf_counter() - started)
            log(f"all {len(hosts)} hosts at once: the site accepted {site_rate:,.0f} events/s")
            async with session.get(f"{hosts[0].url}/v1/streams/{STREAM}") as response:
                last = (await response.json())["last_seq"]
            backlog = last - await hub_position(hub)
            log(f"healing the uplink; backlog {backlog:,} events")
            uplink.heal()
            healed = time.perf_counter()
            while await hub_position(hub) < last:
                if time.perf_counter() - healed > 900:
                    raise SystemExit("the backlog did not reach the hub within 900 s")
                await asyncio.sleep(0.1)
            forward_eps = backlog / (time.perf_counter() - healed)
            log(f"backlog forwarded at {forward_eps:,.0f} events/s")
            return statistics.median(rates), forward_eps
        finally:
            site.stop()
            await uplink.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=200_000, help="events per run")
    parser.add_argument("--batch", type=int, default=1000, help="events per produce call")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes per event")
    parser.add_argument("--runs", type=int, default=3, help="intake runs (median reported)")
    args = parser.parse_args(argv)
    if min(args.events, args.batch, args.runs) < 1 or args.payload < 30:
        parser.error("--events, --batch and --runs must be >= 1, --payload >= 30")
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="stream-offline-") as tmp:
        offline_eps, forward_eps = asyncio.run(run(args, Path(tmp)))
    log(f"offline intake median {offline_eps:,.0f} events/s per host (target >= 50,000/s)")
    print(f"RESULT offline_eps={int(offline_eps)} forward_eps={int(forward_eps)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
