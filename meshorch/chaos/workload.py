"""The chaos workload: clients of the site API, run *inside* the lab (the site's router
namespace, i.e. a machine on the shop floor's LAN), recording every operation.

``python -m meshorch.chaos.workload run ...`` runs concurrent KV clients (put/get/delete
through different hosts' agents) and one event producer, for a duration, and writes one
JSON line per operation as it completes (a killed worker keeps what it wrote). Times are
``time.monotonic()``: CLOCK_MONOTONIC is the same in every network namespace, so the
runner's fault timeline and these times share one axis.

``verify`` reads every key once more (linearizable, retrying across hosts) and the whole
event stream; ``probe`` answers the site's health in one JSON object. Both print JSON.

How an answer is classified (``docs``: README "The site API"):
- 2xx (and 404 for a get: absent) -> ``ok``;
- 409 for a compare-and-set (``put_if_absent``, ``expect_index=0``) -> ``ok``, not applied;
- 503 ``not_committed``, other 4xx, or no connection at all (no attempt ever sent, see
  ``Attempt``) -> ``fail`` (not applied);
- 504 ``outcome_unknown``, 409 ``session_expired``, another 5xx, a timeout, a connection
  lost mid-request -> ``unknown``.

Retries: once an answer has shown it an applied index, each KV client writes under a
client session (``X-Meshorch-Client``/``X-Meshorch-Seq``, README "The site API"), and
resends a write whose answer was unknown to another host with the same headers, up to
``--retries`` times: the site applies it at most once, so the resend may only turn an
unknown outcome into a definite one. The record is the request's, from its first call
to its last answer.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from types import SimpleNamespace
from typing import Any, TextIO

import aiohttp

API_PORT = 7700
THINK_S = (0.01, 0.05)  # pause between a client's operations: a busy, not a saturated, site
DEFAULT_RESENDS = 3  # resends of a write whose outcome is unknown (--retries)


def classify_answer(kind: str, status: int, body: bytes) -> tuple[str, str]:
    if 200 <= status < 300 or (kind == "get" and status == 404):
        return "ok", ""
    code = ""
    try:
        code = str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        code = body[:80].decode(errors="replace")
    if code == "session_expired":  # a resend could not tell whether the first applied
        return "unknown", f"{status} {code}"
    if 400 <= status < 500 or status == 503:
        return "fail", f"{status} {code}"
    # 504 outcome_unknown, or a 500 that may have come after the proposal: either way.
    return "unknown", f"{status} {code}"


def _base(host: str) -> str:
    """``http://HOST:7700``, or ``http://HOST:PORT`` when the host names its port."""
    return f"http://{host}" if ":" in host else f"http://{host}:{API_PORT}"


class Attempt:
    """Whether any attempt of a request reached the server. aiohttp resends an idempotent
    request (PUT, DELETE, GET) once when the connection drops; if the resend then cannot
    connect, the error says "connection refused" although the first attempt may have been
    applied -- so a connect error means "not applied" only if nothing was ever sent."""

    def __init__(self) -> None:
        self.sent = False


async def _on_headers_sent(_: aiohttp.ClientSession, ctx: SimpleNamespace, __: object) -> None:
    attempt = ctx.trace_request_ctx
    if isinstance(attempt, Attempt):
        attempt.sent = True


def _tracing() -> aiohttp.TraceConfig:
    trace = aiohttp.TraceConfig()
    trace.on_request_headers_sent.append(_on_headers_sent)
    return trace


def _connect_error(attempt: Attempt, exc: aiohttp.ClientConnectorError) -> tuple[str, str]:
    if attempt.sent:
        return "unknown", f"resent, then connect: {exc.os_error}"
    return "fail", f"connect: {exc.os_error}"


class Recorder:
    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.next_id = 0

    def new_id(self) -> int:
        self.next_id += 1
        return self.next_id

    def write(self, record: dict[str, Any]) -> None:
        self.out.write(json.dumps(record) + "\n")
        self.out.flush()


async def _kv_client(
    name: str,
    session: aiohttp.ClientSession,
    hosts: Sequence[str],
    keys: Sequence[str],
    rng: random.Random,
    deadline: float,
    recorder: Recorder,
    timeout_s: float,
    read_consistency: str,
    retries: int = 0,
) -> None:
    seq = 0
    client_id: str | None = None  # the session, once an answer showed an applied index
    session_seq = 0
    while time.monotonic() < deadline:
        host = rng.choice(hosts)
        key = rng.choice(keys)
        kind = rng.choices(("put", "get", "delete", "put_if_absent"), (40, 45, 8, 7))[0]
        seq += 1
        value = f"{name}-{seq}" if kind in ("put", "put_if_absent") else None
        query = ""
        if kind == "put_if_absent":
            query = "?expect_index=0"  # compare-and-set: only if absent
        elif kind == "get" and read_consistency != "linearizable":
            query = f"?consistency={read_consistency}"
        headers: dict[str, str] = {}
        if kind != "get" and client_id is not None:
            session_seq += 1
            headers = {"X-Meshorch-Client": client_id, "X-Meshorch-Seq": str(session_seq)}
        op_id = recorder.new_id()
        call = time.monotonic()
        target, resent, details = host, 0, []
        while True:
            url = f"{_base(target)}/v1/kv/{key}{query}"
            answer = await _kv_attempt(session, kind, url, value, headers, timeout_s)
            status, detail, read, applied, index = answer
            details.append(detail)
            if index and client_id is None:
                client_id = f"{index}.{name}-{os.urandom(8).hex()}"  # the seed's ops unchanged
            if status != "unknown" or not headers or resent >= retries:
                break
            resent += 1
            target = rng.choice([h for h in hosts if h != target] or hosts)
        if status == "fail" and resent:
            # A resend refused (every host down in a power cut) says nothing of the earlier
            # attempt, which may have been applied.
            status, details = "unknown", [*details, "an earlier attempt's outcome is unknown"]
        end = time.monotonic()
        recorder.write(
            {
                "id": op_id,
                "client": name,
                "host": host,
                "key": key,
                "kind": kind,
                "call_s": call,
                "end_s": end,
                "return_s": end if status == "ok" else None,
                "value": value if kind != "get" else read,
                "applied": applied,
                "status": status,
                "detail": "; ".join(d for d in details if d),
                "resent": resent,
            }
        )
        await asyncio.sleep(rng.uniform(*THINK_S))


async def _kv_attempt(
    session: aiohttp.ClientSession,
    kind: str,
    url: str,
    value: str | None,
    headers: dict[str, str],
    timeout_s: float,
) -> tuple[str, str, str | None, bool | None, int]:
    """One request: (status, detail, the value read, whether a CAS applied, an applied index
    the answer shows or 0)."""
    status, detail, read = "unknown", "", None
    applied: bool | None = None
    index = 0
    attempt = Attempt()
    try:
        method = {"put": "PUT", "get": "GET", "delete": "DELETE", "put_if_absent": "PUT"}[kind]
        data = value.encode() if value is not None else None
        async with session.request(
            method,
            url,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
            trace_request_ctx=attempt,
        ) as resp:
            body = await resp.read()
            status, detail = classify_answer(kind, resp.status, body)
            if kind == "get" and resp.status == 200:
                read = body.decode()
                index = int(resp.headers.get("X-Meshorch-Index", "0") or 0)
            elif resp.status == 200:
                with contextlib.suppress(ValueError, KeyError, TypeError):
                    index = int(json.loads(body)["index"])
            if kind == "put_if_absent" and resp.status in (200, 409) and status != "unknown":
                # A conflict is an answer too: the key was present, nothing written.
                status, applied = "ok", resp.status == 200
    except aiohttp.ClientConnectorError as exc:
        status, detail = _connect_error(attempt, exc)
    except (TimeoutError, aiohttp.ClientError, OSError) as exc:
        status, detail = "unknown", type(exc).__name__
    return status, detail, read, applied, index


async def _event_client(
    session: aiohttp.ClientSession,
    hosts: Sequence[str],
    stream: str,
    tag: str,
    rng: random.Random,
    deadline: float,
    recorder: Recorder,
    timeout_s: float,
) -> None:
    seq = 0
    while time.monotonic() < deadline:
        host = rng.choice(hosts)
        seq += 1
        payload = f"{tag}-{seq}"
        op_id = recorder.new_id()
        call = time.monotonic()
        status, detail = "unknown", ""
        attempt = Attempt()
        try:
            async with session.post(
                f"{_base(host)}/v1/streams/{stream}/events",
                json={"events": [{"payload": payload}]},
                timeout=aiohttp.ClientTimeout(total=timeout_s),
                trace_request_ctx=attempt,
            ) as resp:
                status, detail = classify_answer("event", resp.status, await resp.read())
        except aiohttp.ClientConnectorError as exc:
            status, detail = _connect_error(attempt, exc)
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            status, detail = "unknown", type(exc).__name__
        end = time.monotonic()
        recorder.write(
            {
                "id": op_id,
                "client": "events",
                "host": host,
                "key": stream,
                "kind": "event",
                "call_s": call,
                "end_s": end,
                "return_s": end if status == "ok" else None,
                "value": payload,
                "status": status,
                "detail": detail,
            }
        )
        await asyncio.sleep(rng.uniform(0.05, 0.15))


async def run_workload(args: argparse.Namespace, out: TextIO) -> None:
    hosts = args.hosts.split(",")
    keys = [f"{args.key_prefix}/k{i}" for i in range(args.keys)]
    rng = random.Random(args.seed)
    recorder = Recorder(out)
    deadline = time.monotonic() + args.duration
    connector = aiohttp.TCPConnector(limit=0, force_close=True)  # no stale pooled sockets
    async with aiohttp.ClientSession(
        connector=connector, trace_configs=[_tracing()], headers=_auth(args)
    ) as session:
        tasks = [
            _kv_client(
                f"c{i}", session, hosts, keys, random.Random(rng.random()), deadline, recorder,
                args.timeout, args.read_consistency, args.retries,
            )
            for i in range(args.clients)
        ]  # fmt: skip
        if args.stream:
            tasks.append(
                _event_client(
                    session, hosts, args.stream, args.key_prefix.replace("/", "-"),
                    random.Random(rng.random()), deadline, recorder, args.timeout,
                )
            )  # fmt: skip
        await asyncio.gather(*tasks)


# --- verify and probe: plain urllib, one short process each ------------------------------


_HEADERS: dict[str, str] = {}  # the access token of verify and probe, set by main


def _auth(args: argparse.Namespace) -> dict[str, str]:
    """The agents' admin token (``--token-file``), for every request."""
    if not args.token_file:
        return {}
    with open(args.token_file) as handle:
        return {"Authorization": f"Bearer {handle.read().strip()}"}


def _http(method: str, url: str, timeout_s: float) -> tuple[int, bytes]:
    """(status, body); status 0 when there was no answer."""
    req = urllib.request.Request(url, method=method, headers=_HEADERS)
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return int(resp.status), bytes(resp.read())
    except urllib.error.HTTPError as exc:
        return int(exc.code), bytes(exc.read())
    except (OSError, ValueError):
        return 0, b""


def verify(args: argparse.Namespace) -> dict[str, Any]:
    """Final linearizable reads of every key (recorded as operations) and the full stream."""
    hosts = args.hosts.split(",")
    reads: list[dict[str, Any]] = []
    problems: list[str] = []
    for i in range(args.keys):
        key = f"{args.key_prefix}/k{i}"
        deadline = time.monotonic() + args.timeout
        attempt = 0
        while True:
            host = hosts[attempt % len(hosts)]
            attempt += 1
            call = time.monotonic()
            status, body = _http("GET", f"{_base(host)}/v1/kv/{key}", 6.0)
            end = time.monotonic()
            if status in (200, 404):
                value = body.decode() if status == 200 else None
                reads.append(
                    {"id": -len(reads) - 1, "client": "verify", "host": host, "key": key,
                     "kind": "get", "call_s": call, "end_s": end, "return_s": end,
                     "value": value, "status": "ok", "detail": ""}
                )  # fmt: skip
                break
            if time.monotonic() > deadline:
                problems.append(f"key {key}: no host answered a read (last status {status})")
                break
            time.sleep(0.3)
    events: list[str] | None = None
    if args.stream:
        events = []
        start = 1
        deadline = time.monotonic() + args.timeout
        while time.monotonic() < deadline:
            host = hosts[0] if not events else hosts[len(events) % len(hosts)]
            url = f"{_base(host)}/v1/streams/{args.stream}/events?from={start}&limit=1000"
            status, body = _http("GET", url, 6.0)
            if status == 404:
                break  # the stream was never created: nothing was acknowledged either
            if status != 200:
                time.sleep(0.3)
                continue
            page = json.loads(body)
            batch = page["events"]
            events += [str(e.get("payload")) for e in batch]
            if not batch or page["next"] > page["last_seq"]:
                break
            start = int(page["next"])
        else:
            problems.append("the event stream could not be read in time")
    return {"reads": reads, "events": events, "problems": problems}


def probe(args: argparse.Namespace) -> dict[str, Any]:
    """Each host's status, the app's view and the fleet link, from one process."""
    hosts = args.hosts.split(",")

    def status(host: str) -> Any:
        code, body = _http("GET", f"{_base(host)}/v1/status", args.timeout)
        return json.loads(body) if code == 200 else None

    with ThreadPoolExecutor(len(hosts)) as pool:
        statuses = dict(zip(hosts, pool.map(status, hosts), strict=True))
    out: dict[str, Any] = {"status": statuses, "app": None, "fleet": None}
    ready = [h for h, s in statuses.items() if s and s.get("ready")]
    if ready and args.app:
        code, body = _http("GET", f"http://{ready[0]}:{API_PORT}/v1/apps/{args.app}", args.timeout)
        out["app"] = json.loads(body) if code == 200 else None
    if ready and args.fleet:
        # Only the leader holds the link to the hub: ask every host, keep the leader's view.
        for host in ready:
            code, body = _http("GET", f"{_base(host)}/v1/fleet", args.timeout)
            fleet = json.loads(body) if code == 200 else None
            if fleet and fleet.get("is_leader"):
                out["fleet"] = fleet
    return out


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m meshorch.chaos.workload",
        description="Chaos workload clients; run inside the lab (the site router's namespace).",
    )
    sub = parser.add_subparsers(dest="mode", required=True)
    for mode in ("run", "verify", "probe"):
        p = sub.add_parser(mode)
        p.add_argument("--hosts", required=True, help="agent LAN addresses, comma-separated")
        p.add_argument("--timeout", type=float, default=8.0, help="seconds per request/phase")
        p.add_argument("--token-file", default="", help="the agents' access token")
        if mode in ("run", "verify"):
            p.add_argument("--key-prefix", required=True, help="keys are PREFIX/k0..")
            p.add_argument("--keys", type=int, default=6)
            p.add_argument("--stream", default="", help="tenant/app/name of the event stream")
        if mode == "run":
            p.add_argument("--clients", type=int, default=4)
            p.add_argument("--duration", type=float, required=True)
            p.add_argument("--seed", type=int, default=0)
            p.add_argument(
                "--retries", type=int, default=DEFAULT_RESENDS,
                help="resends of a write whose outcome is unknown, under its client session",
            )  # fmt: skip
            p.add_argument("--out", required=True, help="JSON lines, one per operation")
            p.add_argument(
                "--read-consistency", choices=("linearizable", "local"), default="linearizable",
                help="local reads are NOT linearizable: a control that the checker catches",
            )  # fmt: skip
        if mode == "probe":
            p.add_argument("--app", default="")
            p.add_argument("--fleet", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _HEADERS.update(_auth(args))
    if args.mode == "run":
        with open(args.out, "a") as out:
            asyncio.run(run_workload(args, out))
        return 0
    result = verify(args) if args.mode == "verify" else probe(args)
    sys.stdout.write(json.dumps(result) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
