"""The chaos workload resends a write whose outcome is unknown, under its client session.

Two stand-in agents (HTTP servers on loopback) lose the first answer of every write
(504 outcome_unknown) and answer the same request sent again; the workload must resend it
to the other host with the same session headers and record one definite operation. And
the runner waits for a workload whose last write times out on every attempt.
"""

import asyncio
import time
from collections import defaultdict
from pathlib import Path

import orjson
from aiohttp import web

from meshorch.chaos.runner import WORKER_START_S, ChaosSettings
from meshorch.chaos.workload import build_parser, classify_answer, run_workload


async def test_an_unknown_write_is_resent_to_another_host_with_the_same_session(
    tmp_path: Path,
) -> None:
    seen: dict[tuple[str, str], list[int]] = defaultdict(list)

    async def kv(request: web.Request) -> web.Response:
        if request.method == "GET":
            return web.Response(body=b"v", headers={"X-Meshorch-Index": "3"})
        client = request.headers.get("X-Meshorch-Client")
        seq = request.headers.get("X-Meshorch-Seq")
        if client is None or seq is None:
            return web.json_response({"index": 4})
        attempts = seen[(client, seq)]
        attempts.append(request.url.port or 0)
        if len(attempts) == 1:
            error = {"code": "outcome_unknown", "message": "lost"}
            return web.json_response({"error": error}, status=504)
        return web.json_response({"index": 9})

    app = web.Application()
    app.router.add_route("*", "/v1/kv/{key:.+}", kv)
    runner = web.AppRunner(app)
    await runner.setup()
    ports = []
    for _ in range(2):
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        ports.append(site._server.sockets[0].getsockname()[1])  # type: ignore[union-attr]
    try:
        out = tmp_path / "ops.jsonl"
        hosts = ",".join(f"127.0.0.1:{port}" for port in ports)
        args = build_parser().parse_args(
            ["run", "--hosts", hosts, "--key-prefix", "t", "--keys", "2", "--clients", "2",
             "--duration", "1.5", "--out", str(out)]
        )  # fmt: skip
        with open(out, "w") as fh:
            await run_workload(args, fh)
    finally:
        await runner.cleanup()
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    resent = [r for r in records if r["resent"]]
    assert resent, "no write went under a session"
    assert all(r["status"] == "ok" and r["resent"] == 1 for r in resent), resent[:3]
    assert not [r for r in records if r["status"] != "ok"]
    # Each request twice, the second time to the other host, with the same headers.
    assert len(seen) == len(resent)
    assert all(len(set(ports_)) == 2 for ports_ in seen.values())


def test_an_expired_session_leaves_the_outcome_unknown() -> None:
    body = b'{"error": {"code": "session_expired", "message": "x"}}'
    assert classify_answer("put", 409, body) == ("unknown", "409 session_expired")


async def test_the_runner_waits_for_a_last_write_whose_every_attempt_times_out(
    tmp_path: Path,
) -> None:
    """An agent that accepts requests but never answers them (back up after a power cut,
    no leader yet) holds the write in flight at the end for the first attempt and every
    resend: the runner's wait for the workload must cover all of them, or it kills the
    workload and fails a run that was fine (seen: a power-cut run in CI)."""
    # Seed 3: the client's first two operations are writes. The first shows an index, so
    # the second goes under a session, hangs, and is still in flight at the end.
    timeout_s, resends, duration_s, seed = 0.4, 2, 0.5, 3
    settings = ChaosSettings(request_timeout_s=timeout_s, resends=resends)

    async def kv(request: web.Request) -> web.Response:
        if request.headers.get("X-Meshorch-Client") is None:
            return web.json_response({"index": 4})  # shows an index: writes go under a session
        await asyncio.sleep(timeout_s * 3)
        return web.json_response({"index": 5})

    app = web.Application()
    app.router.add_route("*", "/v1/kv/{key:.+}", kv)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    out = tmp_path / "ops.jsonl"
    args = build_parser().parse_args(
        ["run", "--hosts", f"127.0.0.1:{port}", "--key-prefix", "t", "--keys", "1",
         "--clients", "1", "--duration", str(duration_s), "--timeout", str(timeout_s),
         "--retries", str(resends), "--seed", str(seed), "--out", str(out)]
    )  # fmt: skip
    try:
        started = time.monotonic()
        with open(out, "w") as fh:
            await run_workload(args, fh)
        took = time.monotonic() - started
    finally:
        await runner.cleanup()
    records = [orjson.loads(line) for line in out.read_bytes().splitlines()]
    stuck = [r for r in records if r["kind"] != "get" and r["resent"] == resends]
    assert stuck and all(r["status"] == "unknown" for r in stuck), records
    # Every attempt ran its whole timeout: longer than one request past the duration...
    assert max(r["end_s"] - r["call_s"] for r in stuck) >= (1 + resends) * timeout_s * 0.95
    assert took > duration_s + timeout_s
    # ...and the runner's wait past the duration covers that overrun without its allowance
    # for the worker's start (one request timeout, the old wait, does not).
    assert settings.last_operation_bound_s() - WORKER_START_S >= took - duration_s
