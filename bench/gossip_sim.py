"""Gossip in the simulator: convergence, failure detection, bandwidth, false positives.

For N = 100, 1,000 and 5,000 members with the LAN preset (gossip every 200 ms,
fan-out 3), over several seeds:

* convergence: a member publishes a new summary; seconds until 99.99% of the
  running members have it (99.99% of 1,000 is all 1,000);
* detection: a member crashes; seconds until every running member has declared
  it dead;
* bandwidth: bytes sent per member per second over 10 s in which one random
  member publishes a 100-byte summary every second (and idle, for reference).

Then the false-positive check: 1,000 members at 10% packet loss for 10
simulated minutes; no running member may be declared dead by anyone.

Anchor: HashiCorp's Serf convergence model gives about 2.2 s for 1,000 members
at the same interval and fan-out. Target: <= 2.2 s at N = 1,000 and no false
positives at 10% loss. The loss run takes about ten minutes of CPU.

    python bench/gossip_sim.py [--sizes 100,1000,5000] [--seeds 3] [--loss-minutes 10]

Last line: ``RESULT conv_1000_s=... detect_1000_s=... bytes_per_member_s=...``.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from gossip import GossipConfig
from gossip.sim import Simulator

SERF_ANCHOR_S = 2.2


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def one_run(n: int, seed: int, config: GossipConfig) -> dict[str, float]:
    started = time.perf_counter()
    sim = Simulator(config, seed=seed)
    ids = sim.bootstrap(n)
    rng = random.Random(seed)
    sim.run_until(2.0)

    idle_before = sum(sim.bytes_snapshot())
    sim.run_until(7.0)
    idle = (sum(sim.bytes_snapshot()) - idle_before) / n / 5.0

    origin = rng.choice(ids)
    version = sim.publish(origin, b"summary" * 8)
    conv = sim.run_until_covered(origin, version, 0.9999, timeout_s=30.0)

    sim.run_until(sim.now + 2.0)
    loaded_before = sum(sim.bytes_snapshot())
    start = sim.now
    for _ in range(10):
        sim.publish(rng.choice(ids), rng.randbytes(100))
        sim.run_for(1.0)
    loaded = (sum(sim.bytes_snapshot()) - loaded_before) / n / (sim.now - start)

    victim = rng.choice([m for m in ids if m != origin])
    sim.crash(victim)
    detect = sim.run_until_detected(victim, 1.0, timeout_s=60.0)
    first = sim.time_to_detect(victim, 1.0 / (n - 1))
    wall = time.perf_counter() - started
    log(
        f"  N={n} seed={seed}: convergence {fmt(conv)} s, detection first {fmt(first)} s "
        f"all {fmt(detect)} s, {loaded:.0f} B/member/s loaded ({idle:.0f} idle), "
        f"false deaths {len(sim.false_deaths)}, {wall:.1f} s wall"
    )
    return {
        "conv": conv if conv is not None else float("inf"),
        "detect": detect if detect is not None else float("inf"),
        "first": first if first is not None else float("inf"),
        "loaded": loaded,
        "idle": idle,
        "false": float(len(sim.false_deaths)),
    }


def loss_run(
    n: int, minutes: float, drop: float, seed: int, config: GossipConfig
) -> dict[str, float]:
    started = time.perf_counter()
    sim = Simulator(config, seed=seed, drop=drop)
    sim.bootstrap(n)
    end = minutes * 60.0
    while sim.now < end:
        sim.run_until(min(end, sim.now + 60.0))
        wall = time.perf_counter() - started
        log(
            f"  loss run: {sim.now:.0f}/{end:.0f} simulated s, {sim.false_suspicions} suspicion "
            f"events, {len(sim.false_deaths)} false deaths, {wall:.0f} s wall"
        )
    total = sum(sim.bytes_snapshot())
    return {
        "false": float(len(sim.false_deaths)),
        "suspicions": float(sim.false_suspicions),
        "bytes": total / n / end,
        "wall": time.perf_counter() - started,
    }


def fmt(x: float | None) -> str:
    return "never" if x is None or x == float("inf") else f"{x:.2f}"


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Last line: RESULT conv_1000_s=... detect_1000_s=... bytes_per_member_s=...",
    )
    parser.add_argument("--sizes", default="100,1000,5000", help="cluster sizes, comma-separated")
    parser.add_argument("--seeds", type=int, default=3, help="runs per size (medians reported)")
    parser.add_argument(
        "--loss-minutes", type=float, default=10.0, help="simulated minutes at loss (0: skip)"
    )
    parser.add_argument("--loss-members", type=int, default=1000, help="members in the loss run")
    parser.add_argument("--drop", type=float, default=0.10, help="packet loss of the loss run")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s]
    config = GossipConfig.lan()
    log(
        f"LAN preset: gossip {config.gossip_interval_s} s x {config.gossip_nodes}, "
        f"probe {config.probe_interval_s} s (timeout {config.probe_timeout_s} s), "
        f"suspicion mult {config.suspicion_mult}, {config.suspicion_confirmations} confirmations"
    )
    t0 = time.perf_counter()
    medians: dict[int, dict[str, float]] = {}
    for n in sizes:
        log(f"N = {n}:")
        runs = [one_run(n, seed, config) for seed in range(1, args.seeds + 1)]
        medians[n] = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
        medians[n]["false_total"] = sum(r["false"] for r in runs)

    print("members  convergence_s  detect_first_s  detect_all_s  B/member/s  idle_B/member/s")
    for n, m in medians.items():
        print(
            f"{n:7d}  {fmt(m['conv']):>13}  {fmt(m['first']):>14}  {fmt(m['detect']):>12}  "
            f"{m['loaded']:10.0f}  {m['idle']:15.0f}"
        )
    ref = medians.get(1000) or medians[sizes[-1]]
    ref_n = 1000 if 1000 in medians else sizes[-1]
    ratio = ref["conv"] / SERF_ANCHOR_S
    print(
        f"convergence at N={ref_n}: {fmt(ref['conv'])} s = {ratio:.2f} x Serf's {SERF_ANCHOR_S} s "
        f"anchor ({'meets' if ratio <= 1 else 'misses'} the <= 2.2 s target)"
    )

    false_loss = -1.0
    if args.loss_minutes > 0:
        log(f"false-positive check: {args.loss_members} members, {args.drop:.0%} loss:")
        loss = loss_run(args.loss_members, args.loss_minutes, args.drop, 1, config)
        false_loss = loss["false"]
        print(
            f"loss run: {args.loss_members} members, {args.loss_minutes:g} min at {args.drop:.0%} "
            f"loss: {loss['suspicions']:.0f} suspicion events, {loss['false']:.0f} healthy "
            f"members declared dead, {loss['bytes']:.0f} B/member/s, {loss['wall']:.0f} s wall"
        )
    log(f"total {time.perf_counter() - t0:.0f} s wall")
    print(
        f"RESULT conv_{ref_n}_s={ref['conv']:.2f} detect_{ref_n}_s={ref['detect']:.2f} "
        f"bytes_per_member_s={ref['loaded']:.0f} anchor_ratio={ratio:.2f} "
        f"false_deaths_loss={false_loss:.0f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
