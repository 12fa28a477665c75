"""Light sites for bench/deploy_fanout.py: many fleet-link sites in one asyncio process.

Each site is what a site's Raft leader does on the fleet link, minus Raft and runtimes:
its own Ed25519 identity, a real ``LinkClient`` (signed requests, long-poll), real
verification of every delta (``meshorch.fleet.delta.verify_batch`` against the fleet root key
given out of band), ``app.put`` specs rebuilt with ``meshorch.apps.spec.from_json``, and
the site report of docs/fleet-link.md sent right after applying and every few seconds.
"Applying" only records the version in memory; the report then says it runs healthy.

Protocol with the driver (one line each, on stdout; the driver writes to stdin)::

    KEY <site> <public key hex>         once per site, at start
    <- GO                               the driver registered the keys at the hub
    READY                               every site reported once (its link works)
    APPLIED <site> <app> <app version> <delta version> <t_fetched> <t_verified> <t_acked>
    REJECTED <site> <reason> <version>  a delta failed verification (never expected)
    ERROR <site> <message>              a link error (the site retries)
    REPORTS <n>                         reports taken since the last such line (asked ones
                                        answered 200, quiet ones sent with no error back)
    LINKED <n>                          sites of this worker that reported once, so far

``t_*`` are ``time.time()``: the fetch answer arrived, the batch was verified and
applied, the hub acknowledged the report carrying it. The worker exits when its stdin
closes (or on SIGTERM).

    python bench/fanout_site.py --hub URL --fleet NAME --root-key HEX --sites a,b,c
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import uvloop
from nacl.signing import SigningKey

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch import __version__
from meshorch.apps.spec import SpecError, from_json
from meshorch.fleet.client import HubTrust, LinkClient, LinkError
from meshorch.fleet.delta import TrustState, verify_batch
from meshorch.fleet.site_link import (
    REPORT_RETRY_MAX_S,
    REPORT_RETRY_S,
    REPORT_TIMEOUT_S,
    Backoff,
)
from meshorch.state.protocol import PROTOCOL

REPORT_EVERY_S = 3.0
COUNT_EVERY_S = 2.0
acknowledged_reports = 0  # since the last REPORTS line
FETCH_WAIT_S = 20.0


def emit(*fields: object) -> None:
    sys.stdout.write(" ".join(str(f) for f in fields) + "\n")
    sys.stdout.flush()


@dataclass
class LightSite:
    """One site's link state: trust, the applications it 'runs', what it rejected."""

    site_id: str
    key: SigningKey
    trust: TrustState
    apps: dict[str, str] = field(default_factory=dict)  # name -> version
    rejections: list[dict[str, Any]] = field(default_factory=list)

    def report(self) -> dict[str, Any]:
        instances = [
            {"app": name, "instance_id": f"{name}-0", "service": "main", "version": version,
             "state": "running", "ready": True, "restarts": 0}
            for name, version in sorted(self.apps.items())
        ]  # fmt: skip
        # What an agent of this release says of its host: the hub serves the site its own
        # view of the log (per-site deltas, Merkle targets) as it serves a real site.
        host = {
            "host_id": "h1",
            "alive": True,
            "agent_version": __version__,
            "protocol": PROTOCOL,
            "instances": instances,
        }
        return {
            "v": 1,
            "site": self.site_id,
            "time": time.time(),
            "applied_version": self.trust.version,
            "applied_head": self.trust.head,
            "rejections": self.rejections[-20:],
            "hosts": [host],
            "apps": {
                name: {
                    "version": version,
                    "desired": 1,
                    "ready": 1,
                    "state": "healthy",
                    "message": "",
                }
                for name, version in self.apps.items()
            },
        }

    def apply(self, raws: list[bytes], now: float) -> list[tuple[str, str, int]]:
        """Verify and apply a batch; returns (app, version, delta version) put here."""
        result = verify_batch(raws, self.trust, now, self.site_id)
        if result.rejected is not None:
            exc = result.rejected
            self.rejections.append({**exc.to_json(), "at": now})
            emit("REJECTED", self.site_id, exc.reason, exc.version)
        if result.state is not None:
            self.trust = result.state
        applied = []
        for delta in result.accepted:
            if not delta.target.includes(self.site_id):
                continue
            for op in delta.ops:
                if op.get("op") == "app.put":
                    try:
                        spec = from_json(op["spec"])
                    except (SpecError, KeyError, TypeError) as exc:
                        self.rejections.append(
                            {"reason": "bad_op", "message": str(exc)[:200],
                             "version": delta.version, "at": now}
                        )  # fmt: skip
                        continue
                    self.apps[spec.name] = spec.version
                    applied.append((spec.name, spec.version, delta.version))
                elif op.get("op") == "app.delete":
                    self.apps.pop(str(op.get("name")), None)
        return applied


async def run_site(
    site: LightSite,
    hub: str,
    connected: asyncio.Queue[str],
    stop: asyncio.Event,
    trust: HubTrust | None = None,
) -> None:
    """The fetch loop here, the report loop in a task: as a site leader runs them, one
    report in flight at a time (right after applying, else every REPORT_EVERY_S)."""
    # (app, version, delta version, t_fetched, t_verified): applied, not yet in a report
    # the hub acknowledged
    pending: list[tuple[str, str, int, float, float]] = []
    report_now = asyncio.Event()
    report_now.set()  # the first report says the link works

    async with LinkClient(hub, site.site_id, site.key, trust=trust) as client:

        async def reporter() -> None:
            linked = False
            retry = Backoff(REPORT_RETRY_S, REPORT_RETRY_MAX_S)
            while not stop.is_set():
                # As an agent reports: one asked for (applied deltas, the first, a retry)
                # waits for the hub's answer; the routine ones are sent quiet.
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(report_now.wait(), REPORT_EVERY_S)
                routine = not report_now.is_set()
                report_now.clear()
                carried = pending[:]
                del pending[:]
                try:
                    await client.report(site.report(), REPORT_TIMEOUT_S, quiet=routine)
                except LinkError as exc:  # retried as an agent retries (site_link)
                    emit("ERROR", site.site_id, f"report: {exc}".replace("\n", " "))
                    pending[:0] = carried
                    report_now.set()
                    await asyncio.sleep(retry.next_s())
                    continue
                retry.reset()
                acked = time.time()
                global acknowledged_reports
                acknowledged_reports += 1
                for app, version, delta_version, fetched, verified in carried:
                    emit("APPLIED", site.site_id, app, version, delta_version,
                         f"{fetched:.6f}", f"{verified:.6f}", f"{acked:.6f}")  # fmt: skip
                if not linked:
                    linked = True
                    connected.put_nowait(site.site_id)

        reporting = asyncio.create_task(reporter())
        backoff = Backoff()  # an agent's, capped and jittered
        try:
            while not stop.is_set():
                try:
                    _, raws = await client.fetch(site.trust.version, FETCH_WAIT_S)
                except LinkError as exc:
                    emit("ERROR", site.site_id, f"fetch: {exc}".replace("\n", " "))
                    await asyncio.sleep(backoff.next_s())
                    continue
                backoff.reset()
                if raws:
                    fetched = time.time()
                    applied = site.apply(raws, fetched)
                    verified = time.time()
                    pending.extend((a, v, d, fetched, verified) for a, v, d in applied)
                    report_now.set()
        finally:
            reporting.cancel()
            await asyncio.gather(reporting, return_exceptions=True)


async def read_line(reader: asyncio.StreamReader) -> str:
    return (await reader.readline()).decode().strip()


async def main_async(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    trust = TrustState(fleet=args.fleet, trusted_keys=frozenset({args.root_key}))
    sites = [LightSite(s, SigningKey.generate(), trust) for s in args.sites.split(",") if s]
    for site in sites:
        emit("KEY", site.site_id, site.key.verify_key.encode().hex())
    if await read_line(reader) != "GO":
        return 1
    connected: asyncio.Queue[str] = asyncio.Queue()
    linked = [0]  # sites that reported once
    tls = HubTrust(fingerprint=args.hub_fingerprint)

    async def start(site: LightSite) -> None:
        await asyncio.sleep(random.uniform(0.0, args.start_within))
        await run_site(site, args.hub, connected, stop, tls)

    tasks = [asyncio.create_task(start(s)) for s in sites]

    async def announce_ready() -> None:
        for _ in sites:
            await connected.get()
            linked[0] += 1
        emit("READY")

    async def until_stdin_closes() -> None:
        while await reader.readline():
            pass
        stop.set()

    async def count_reports() -> None:
        global acknowledged_reports
        while True:
            await asyncio.sleep(COUNT_EVERY_S)
            count, acknowledged_reports = acknowledged_reports, 0
            emit("REPORTS", count)
            if linked[0] < len(sites):
                emit("LINKED", linked[0])

    helpers = [
        asyncio.create_task(announce_ready()),
        asyncio.create_task(until_stdin_closes()),
        asyncio.create_task(count_reports()),
    ]
    await stop.wait()
    for task in tasks + helpers:
        task.cancel()
    await asyncio.gather(*tasks, *helpers, return_exceptions=True)
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--hub", required=True, help="the hub's URL (a replicated hub: URLs, comma-separated)"
    )
    parser.add_argument(
        "--hub-fingerprint", default=None, help="the hub's pinned TLS certificate (SHA-256 hex)"
    )
    parser.add_argument("--fleet", required=True, help="the fleet name")
    parser.add_argument("--root-key", required=True, help="the fleet root public key (hex)")
    parser.add_argument("--sites", required=True, help="comma-separated site ids")
    parser.add_argument(
        "--start-within",
        type=float,
        default=0.0,
        help="each site starts at a random moment within this many seconds after GO "
        "(sites of a fleet come up spread out, not in one instant; default all at once)",
    )
    args = parser.parse_args()
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(main_async(args))


if __name__ == "__main__":
    raise SystemExit(main())
