"""What one site report, one alert pass and one page of the fleet view cost the hub, at
1,000 and at 10,000 sites: the growth should be ~1x (the cost of a report is O(1) in the
number of sites).

A real hub (``central_hub.Hub`` in this process: LMDB, aiohttp, its driver running as in
``meshorch hub``) with ``--sites`` enrolled sites. The sites' records and a first report
of each are written into the hub's store between a first start (which initialises the
data directory) and a second one (which restores them), as an enrolled fleet that has
been reporting leaves them; each site has a real Ed25519 identity key. Then, for each
size:

- ``report``: ``POST /v1/link/report`` signed with the site's key (``sign_request``, the
  site link's real signature), from sites picked at random, one after the other, each
  followed by a 2 ms settle so that the work the report wakes in the hub's driver lands
  in this report's time (the settle is subtracted);
- ``alert pass``: ``Alerting.refresh()`` right after a report;
- ``list``: ``GET /v1/sites?limit=100`` with the admin token (before pagination existed
  the hub answered every site).

Prints median and p99 of each (ms), the 10k/1k ratio of each, and a last line::

    RESULT sites_1k_report_ms=... sites_10k_report_ms=... growth=...

(growth: the ratio of the report medians). Target: growth ~1.

    python bench/hub_report_cost.py                     # 1,000 and 10,000 sites
    python bench/hub_report_cost.py --sizes 200,2000 --reports 100   # quick
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import os
import random
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

REQUIRED_MODULES = ("aiohttp", "lmdb", "nacl", "orjson")
MIN_FREE_BYTES = 1 << 30  # the store of 10,000 sites, and room to spare
SETTLE_S = 0.002


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def prerequisites(work_dir: Path) -> str | None:
    """Why the bench cannot run here (None: it can)."""
    missing = []
    for name in REQUIRED_MODULES:
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        return (
            f"missing Python modules {missing}: run it with the project's venv (.venv/bin/python)"
        )
    free = shutil.disk_usage(work_dir).free
    if free < MIN_FREE_BYTES:
        return f"{work_dir}: {free >> 20} MiB free, the bench needs {MIN_FREE_BYTES >> 20} MiB"
    return None


def site_report(site: str, now: float, version: int, head: str) -> dict[str, Any]:
    """A site of two hosts running three applications, all healthy."""
    apps = {
        name: {"version": "1.0", "desired": 2, "ready": 2, "state": "healthy", "message": ""}
        for name in ("pos", "inventory", "cameras")
    }
    hosts = [
        {
            "host_id": f"h{n}",
            "alive": True,
            "agent_version": "0.9.0",
            "protocol": 2,
            "resources": {"load1": 0.4, "memory_used_pct": 41.0, "disk_used_pct": 37.0, "at": now},
            "instances": [
                {
                    "app": name,
                    "instance_id": f"{name}-{n}",
                    "service": "main",
                    "version": "1.0",
                    "state": "running",
                    "ready": True,
                    "restarts": 0,
                }
                for name in apps
            ],
        }
        for n in (1, 2)
    ]
    return {
        "v": 1,
        "site": site,
        "time": now,
        "applied_version": version,
        "applied_head": head,
        "rejections": [],
        "hosts": hosts,
        "apps": apps,
    }


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * (len(ordered) - 1))))]


def stats(values: list[float]) -> tuple[float, float]:
    return statistics.median(values), percentile(values, 0.99)


async def timed(times: list[float], call: Callable[[], Awaitable[None]]) -> None:
    start = time.perf_counter()
    await call()
    times.append((time.perf_counter() - start) * 1000)


async def measure(size: int, reports: int, passes: int, lists: int) -> dict[str, list[float]]:
    import aiohttp
    import orjson
    from nacl.signing import SigningKey

    from central_hub import Hub, HubConfig
    from central_hub.store import Store, put_json
    from meshorch.fleet.link_auth import sign_request, url_host

    with tempfile.TemporaryDirectory(prefix="hub-report-cost-") as tmp:
        data_dir = Path(tmp) / "hub"
        config = HubConfig(
            data_dir=data_dir, host="127.0.0.1", port=0, insecure_http=True, gossip=False
        )
        async with Hub(config):
            pass  # initialises the data directory
        log(f"{size} sites: writing their records and reports")
        keys = {f"site-{i:05d}": SigningKey.generate() for i in range(size)}
        store = Store(data_dir / "hub.lmdb")
        now = time.time()
        writes = []
        for n, (site, key) in enumerate(keys.items()):
            labels = {"region": f"r{n % 10}", "tier": "gold" if n % 4 == 0 else "std"}
            record = {
                "id": site,
                "labels": labels,
                "public_key": bytes(key.verify_key).hex(),
                "enroll_hash": None,
                "enroll_expires_at": None,
                "created_at": now,
            }
            writes.append(put_json("sites", site, record))
            report = site_report(site, now, 0, "")
            writes.append(put_json("reports", site, {"report": report, "received_at": now}))
        store.commit(writes, sync=True)
        store.close()
        async with Hub(config) as hub:
            token = hub.admin_token_path.read_text().strip()
            timeout = aiohttp.ClientTimeout(total=120)
            async with aiohttp.ClientSession(timeout=timeout) as session:
                await asyncio.sleep(0.5)  # the hub's first passes after the start
                sample = random.Random(size).sample(sorted(keys), min(size, 500))
                report_ms: list[float] = []

                async def report(site: str) -> None:
                    body = orjson.dumps(site_report(site, time.time(), 0, ""))
                    path = "/v1/link/report"
                    headers = sign_request(
                        keys[site], site, "POST", path, body, time.time(), host=url_host(hub.url)
                    )
                    async with session.post(hub.url + path, data=body, headers=headers) as resp:
                        assert resp.status == 200, await resp.text()
                        await resp.read()
                    await asyncio.sleep(SETTLE_S)  # the driver's pass woken by the report

                for n in range(reports + 20):
                    site = sample[n % len(sample)]
                    start = time.perf_counter()
                    await report(site)
                    if n >= 20:  # warm-up
                        elapsed = (time.perf_counter() - start) * 1000
                        report_ms.append(elapsed - SETTLE_S * 1000)
                pass_ms: list[float] = []
                for n in range(passes):
                    await report(sample[n % len(sample)])
                    start = time.perf_counter()
                    hub.alerting.refresh()
                    pass_ms.append((time.perf_counter() - start) * 1000)
                list_ms: list[float] = []
                headers = {"Authorization": f"Bearer {token}"}
                listed = 0
                for _ in range(lists):

                    async def page() -> None:
                        nonlocal listed
                        async with session.get(
                            hub.url + "/v1/sites?limit=100", headers=headers
                        ) as resp:
                            assert resp.status == 200, await resp.text()
                            listed = len(orjson.loads(await resp.read())["sites"])

                    await timed(list_ms, page)
                log(f"{size} sites: GET /v1/sites?limit=100 answered {listed} sites")
    return {"report": report_ms, "alert pass": pass_ms, "list": list_ms}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--sizes", default="1000,10000", help="two fleet sizes (default 1000,10000)"
    )
    parser.add_argument("--reports", type=int, default=300, help="reports measured per size")
    parser.add_argument("--passes", type=int, default=50, help="alert passes measured per size")
    parser.add_argument("--lists", type=int, default=30, help="list requests measured per size")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    if len(sizes) != 2 or min(sizes) < 1:
        parser.error("--sizes: two fleet sizes, e.g. 1000,10000")
    problem = prerequisites(Path(tempfile.gettempdir()))
    if problem is not None:
        print(f"bench/hub_report_cost.py cannot run: {problem}", file=sys.stderr)
        return 2
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    os.environ.setdefault("PYTHONHASHSEED", "0")
    results = {
        size: asyncio.run(measure(size, args.reports, args.passes, args.lists)) for size in sizes
    }
    small, large = sizes
    print(f"{'':12} {'sites':>7} {'median ms':>10} {'p99 ms':>10}")
    for what in ("report", "alert pass", "list"):
        for size in sizes:
            median, p99 = stats(results[size][what])
            print(f"{what:12} {size:>7} {median:>10.2f} {p99:>10.2f}")
        ratio = stats(results[large][what])[0] / max(stats(results[small][what])[0], 1e-6)
        print(f"{what:12} {'ratio':>7} {ratio:>10.2f}x  ({large} vs {small} sites, medians)")
    small_ms = stats(results[small]["report"])[0]
    large_ms = stats(results[large]["report"])[0]
    print(
        f"RESULT sites_1k_report_ms={small_ms:.2f} sites_10k_report_ms={large_ms:.2f} "
        f"growth={large_ms / max(small_ms, 1e-6):.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
