"""Offline event intake and backlog forwarding of one host's stream store.

A site cut off from the hub keeps accepting events into its LMDB stream store.
This measures, on one store in a temporary directory (durable: ``sync=True``):

- ``offline_eps``: events/s accepted by ``append_batch`` (batches of ``--batch``
  events of ``--payload`` bytes, one write transaction per batch), the median of
  ``--runs`` runs, each into a fresh store. Target: >= 50,000/s.
- ``forward_eps``: events/s of the store side of forwarding the backlog after
  reconnect: ``pending_forward`` from the forward position in batches, then
  ``set_forward_position`` to the last event of each batch (as when the hub
  acknowledges it). The network part (sending to the hub and its ack) comes with
  the hub integration and is not measured here.

    python bench/stream_offline.py                 # 1,000,000 events
    python bench/stream_offline.py --events 100000 # quick

The last line is ``RESULT offline_eps=<int> forward_eps=<int>``.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.stream_store import StreamStore
from meshorch.streams import NewEvent, RetentionPolicy

STREAM = "bench/sensors/readings"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def make_batches(events: int, batch: int, payload: int) -> list[list[NewEvent]]:
    body = b"x" * payload
    t0 = time.time()
    batches = []
    for start in range(0, events, batch):
        n = min(batch, events - start)
        batches.append([NewEvent(body, t0 + (start + i) * 1e-4) for i in range(n)])
    return batches


def run_append(path: Path, batches: list[list[NewEvent]], policy: RetentionPolicy) -> float:
    with StreamStore(path, default_policy=policy) as store:
        store.create_stream(STREAM)
        started = time.perf_counter()
        for batch in batches:
            store.append_batch(STREAM, batch)
        elapsed = time.perf_counter() - started
        stats = store.stats(STREAM)
    total = sum(len(b) for b in batches)
    if stats.count != total:
        raise SystemExit(f"store holds {stats.count} events, expected {total}")
    return total / elapsed


def run_forward(path: Path, batch: int) -> tuple[float, int]:
    with StreamStore(path) as store:
        started = time.perf_counter()
        forwarded = 0
        while True:
            pending = store.pending_forward(STREAM, limit=batch, max_bytes=64 << 20)
            if not pending:
                break
            # (the hub link would send ``pending`` here and wait for its ack)
            store.set_forward_position(STREAM, pending[-1].seq)
            forwarded += len(pending)
        elapsed = time.perf_counter() - started
        if store.forward_position(STREAM) != store.stats(STREAM).last_seq:
            raise SystemExit("forward position did not reach the end of the backlog")
    return forwarded / elapsed, forwarded


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000, help="events per run")
    parser.add_argument("--batch", type=int, default=500, help="events per append batch")
    parser.add_argument("--payload", type=int, default=100, help="payload bytes per event")
    parser.add_argument("--runs", type=int, default=3, help="append runs (median reported)")
    parser.add_argument(
        "--forward-batch", type=int, default=1000, help="events per forwarding batch"
    )
    args = parser.parse_args(argv)
    if args.events < 1 or args.batch < 1 or args.runs < 1 or args.forward_batch < 1:
        parser.error("--events, --batch, --runs and --forward-batch must be >= 1")

    # Retention large enough that nothing is dropped during the run.
    policy = RetentionPolicy(max_bytes=None, max_age_s=None)
    log(f"building {args.events} events of {args.payload} B in batches of {args.batch}")
    batches = make_batches(args.events, args.batch, args.payload)
    rates = []
    with tempfile.TemporaryDirectory(prefix="stream-offline-") as tmp:
        for run in range(args.runs):
            path = Path(tmp) / f"run{run}"
            rate = run_append(path, batches, policy)
            rates.append(rate)
            log(f"run {run + 1}/{args.runs}: accepted {rate:,.0f} events/s")
        offline_eps = statistics.median(rates)
        log("forwarding the backlog of the last run (store side only: read + advance)")
        forward_eps, forwarded = run_forward(Path(tmp) / f"run{args.runs - 1}", args.forward_batch)
        log(f"forwarded {forwarded} events at {forward_eps:,.0f} events/s")
    log(f"offline intake median {offline_eps:,.0f} events/s (target >= 50,000/s)")
    print(f"RESULT offline_eps={int(offline_eps)} forward_eps={int(forward_eps)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
