"""Lab helper: one SiteDiscovery in a namespace, driven line by line on stdin.

Run as ``python -m tests.netmesh.discovery_agent --site S --host H --ip IP``.
Prints ``{"ready": true}`` once advertising, then answers each command with
one JSON line:

    until peers|foreign|malformed N TIMEOUT_S   wait for count >= N, then report
    atmost peers|foreign|malformed N TIMEOUT_S  wait for count <= N, then report
    quit                                         withdraw and exit
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys

from zeroconf import IPVersion
from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf

from netmesh import SERVICE_TYPE, DiscoveryTimeout, SiteDiscovery, generate_keypair


def snapshot(disc: SiteDiscovery, ok: bool) -> str:
    peers = {
        host: {"join": p.join_endpoint, "pk": p.public_key_b64, "addresses": list(p.addresses)}
        for host, p in disc.peers().items()
    }
    return json.dumps(
        {"ok": ok, "peers": peers, "foreign": disc.foreign_count, "malformed": disc.malformed_count}
    )


async def wait_count(disc: SiteDiscovery, op: str, what: str, n: int, timeout_s: float) -> bool:
    if op == "until" and what == "peers":
        try:
            await disc.wait_for_peers(n, timeout_s)
        except DiscoveryTimeout:
            return False
        return True
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        count = {
            "peers": len(disc.peers()),
            "foreign": disc.foreign_count,
            "malformed": disc.malformed_count,
        }[what]
        if (count >= n) if op == "until" else (count <= n):
            return True
        if loop.time() >= deadline:
            return False
        await asyncio.sleep(0.1)


async def advertise_bogus(ip: str, site: str) -> AsyncZeroconf:
    """A record of our site without a public key: peers must count and skip it."""
    aiozc = AsyncZeroconf(interfaces=[ip], ip_version=IPVersion.V4Only)
    info = AsyncServiceInfo(
        SERVICE_TYPE,
        f"bogus@{site}.{SERVICE_TYPE}",
        port=9,
        properties={"site": site, "host": "bogus", "join": f"{ip}:9", "v": "1"},
        server="meshorch-bogus.local.",
        addresses=[socket.inet_aton(ip)],
    )
    await (await aiozc.async_register_service(info))
    return aiozc


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--site", required=True)
    parser.add_argument("--host", required=True)
    parser.add_argument("--ip", required=True)
    parser.add_argument("--port", type=int, default=7100)
    parser.add_argument("--bogus-site", default=None)
    args = parser.parse_args()

    pk = generate_keypair().public_key_b64
    bogus = await advertise_bogus(args.ip, args.bogus_site) if args.bogus_site else None
    try:
        async with SiteDiscovery(args.site, args.ip) as disc:
            await disc.advertise(
                host=args.host, join_endpoint=f"{args.ip}:{args.port}", public_key_b64=pk
            )
            print(json.dumps({"ready": True, "pk": pk}), flush=True)
            while line := await asyncio.to_thread(sys.stdin.readline):
                words = line.split()
                if words == ["quit"]:
                    break
                if len(words) == 4 and words[0] in ("until", "atmost"):
                    ok = await wait_count(disc, words[0], words[1], int(words[2]), float(words[3]))
                    print(snapshot(disc, ok), flush=True)
                else:
                    print(json.dumps({"error": f"bad command {line!r}"}), flush=True)
    finally:
        if bogus is not None:
            await bogus.async_close()


if __name__ == "__main__":
    asyncio.run(main())
