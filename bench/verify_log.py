"""How long `meshorch deltas verify` takes on an exported log, against its anchor: the
site's own check of the same envelopes (``verify_batch``, what a site spends to apply them).

A log of ``--deltas`` format 2 deltas signed with real Ed25519 keys (a third for one site,
a third for another, a third for all sites, each with an ``app.put`` of a small spec, and
a root rotation in the middle) is written as an export; then the real command line runs on
it once (a subprocess: start-up, reading and printing included); then ``verify_log`` and
the site's ``verify_batch`` run on the same envelopes in this process (best of 3 each).
Prints them and a last line (ratio: verify_log over verify_batch; target ~1)::

    RESULT deltas=... cli_s=... verify_log_s=... per_delta_us=... site_check_s=... ratio=...

    python bench/verify_log.py                  # 10,000 deltas
    python bench/verify_log.py --deltas 2000    # quick
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nacl.signing import SigningKey

from meshorch.fleet import delta as d
from meshorch.fleet.verify_log import verify_log

NOW = time.time()
ROUNDS = 3
SPEC = {"api_version": "meshorch/v1", "name": "web", "services": [{"name": "main"}]}


def build(count: int) -> tuple[list[bytes], str]:
    first = key = SigningKey.generate()
    targets = [d.Target(sites=frozenset({"shop-1"})), d.Target(sites=frozenset({"shop-2"}))]
    envelopes, head = [], d.GENESIS_HASH
    for version in range(1, count + 1):
        keys = [key]
        if version == count // 2:
            new = SigningKey.generate()
            ops: list[dict[str, object]] = [{"op": d.ROTATE_OP, "new_key": d.key_id(new)}]
            target, keys = d.ALL_SITES, [key, new]
        else:
            spec = {**SPEC, "version": str(version)}
            ops = [{"op": "app.put", "tenant": "blue", "spec": spec}]
            target = [*targets, d.ALL_SITES][version % 3]
        body = d.next_delta("acme", version - 1, head, ops, target, NOW, 86400, d.DELTA_V2)
        envelope, signed = d.sign(body, keys)
        envelopes.append(envelope)
        head = signed.digest
        if len(keys) == 2:
            key = keys[1]
    return envelopes, d.key_id(first)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--deltas", type=int, default=10_000)
    args = parser.parse_args()
    envelopes, root = build(args.deltas)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "log.jsonl"
        path.write_bytes(b"".join(e + b"\n" for e in envelopes))
        size = path.stat().st_size
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "meshorch", "deltas", "verify", str(path), "--root-key", root],
            capture_output=True,
            check=False,
        )
        verify_s = time.perf_counter() - started
    if done.returncode != 0:
        print(done.stdout.decode()[-2000:], done.stderr.decode()[-2000:], file=sys.stderr)
        return 1
    state = d.TrustState("acme", frozenset({root}))
    pure_s = site_s = float("inf")
    for _ in range(ROUNDS):  # the best of a few: the machine is shared
        started = time.perf_counter()
        report = verify_log(envelopes, root, time.time())
        pure_s = min(pure_s, time.perf_counter() - started)
        started = time.perf_counter()
        result = d.verify_batch(envelopes, state, time.time(), "shop-1")
        site_s = min(site_s, time.perf_counter() - started)
        assert report.ok and result.rejected is None and len(result.accepted) == args.deltas
    print(f"log: {args.deltas} deltas, {size / 1e6:.1f} MB")
    print(f"meshorch deltas verify (subprocess: start-up, reading, printing): {verify_s:.2f} s")
    print(f"verify_log in this process (best of {ROUNDS}): {pure_s:.2f} s")
    print(f"the site's verify_batch on the same envelopes (best of {ROUNDS}): {site_s:.2f} s")
    print(
        f"RESULT deltas={args.deltas} cli_s={verify_s:.2f} verify_log_s={pure_s:.2f} "
        f"per_delta_us={pure_s / args.deltas * 1e6:.0f} site_check_s={site_s:.2f} "
        f"ratio={pure_s / site_s:.2f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
