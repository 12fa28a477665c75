"""Ingress throughput: HTTP requests/s through a TcpIngress vs straight to one instance.

Two instances of a minimal HTTP/1.1 keep-alive responder run as separate
processes, a ``TcpIngress`` in front of them runs in a third, and a load
generator in this process keeps ``--connections`` keep-alive connections busy
(closed loop: one request in flight per connection) for ``--duration`` seconds.
Each round measures straight to one instance, through the ingress, and (for
reference) with the client itself spreading its connections over both instances,
the order alternating between rounds; the medians over ``--rounds`` are compared.

The load generator speaks HTTP over raw asyncio Protocols on uvloop rather than
aiohttp: on a 2-core machine aiohttp's client saturates first and would hide
what the ingress costs.

    python bench/ingress.py [--duration 5] [--connections 32] [--rounds 3]

Last line: ``RESULT ingress_rps=<int> ratio_vs_direct=<float>``. Target ratio >= 0.8.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import cast

import uvloop
from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from meshorch.net.ingress import TcpIngress

HOST = "127.0.0.1"
RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"
REQUEST = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- roles run in child processes ---------------------------------------------------------


class _Responder(asyncio.Protocol):
    """Answers every request (GET, no body: one per blank line) with RESPONSE."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.pending = b""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        buffer = self.pending + data
        count = buffer.count(b"\r\n\r\n")
        self.pending = buffer[buffer.rfind(b"\r\n\r\n") + 4 :] if count else buffer
        if count and self.transport is not None:
            self.transport.write(RESPONSE * count)


async def serve_http(port: int) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(_Responder, HOST, port, backlog=1024)
    print(server.sockets[0].getsockname()[1], flush=True)
    await _until_terminated()
    server.close()


async def serve_aiohttp(port: int) -> None:
    async def hello(request: web.Request) -> web.Response:
        return web.Response(text="ok")

    app = web.Application()
    app.router.add_get("/", hello)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port, backlog=1024)
    await site.start()
    assert runner.addresses
    print(runner.addresses[0][1], flush=True)
    await _until_terminated()
    await runner.cleanup()


async def serve_ingress(port: int, backends: list[tuple[str, int]]) -> None:
    async with TcpIngress(HOST, port, lambda: backends, name="bench") as ingress:
        print(ingress.port, flush=True)
        await _until_terminated()
        log(f"ingress stats: {ingress.stats}")


async def _until_terminated() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()


# -- load generator -----------------------------------------------------------------------


class _Client(asyncio.Protocol):
    """One keep-alive connection: send a request, wait for the whole answer, repeat."""

    def __init__(self, counter: list[int], stop: asyncio.Event) -> None:
        self.counter = counter
        self.stop = stop
        self.transport: asyncio.Transport | None = None
        self.buffer = b""
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)
        self.transport.write(REQUEST)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        end = self.buffer.find(b"\r\n\r\n")
        if end < 0 or self.transport is None:
            return
        head = self.buffer[:end].lower()
        if not head.startswith(b"http/1.1 200"):
            raise RuntimeError(f"unexpected answer {self.buffer[:60]!r}")
        length = _content_length(head)
        if len(self.buffer) < end + 4 + length:
            return  # the body is still coming
        self.buffer = self.buffer[end + 4 + length :]
        self.counter[0] += 1
        if self.stop.is_set():
            self.transport.close()
        else:
            self.transport.write(REQUEST)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.closed.done():
            self.closed.set_result(None)


def _content_length(head: bytes) -> int:
    """Content-Length from a lower-cased response head (0 without one)."""
    at = head.find(b"content-length:")
    if at < 0:
        return 0
    end = head.find(b"\r\n", at)
    return int(head[at + 15 : end if end >= 0 else len(head)])


async def measure(ports: list[int], connections: int, duration_s: float, warmup_s: float) -> float:
    """Requests/s answered by ``connections`` closed-loop connections spread over ``ports``."""
    loop = asyncio.get_running_loop()
    counter = [0]
    stop = asyncio.Event()
    clients: list[_Client] = []
    for i in range(connections):
        port = ports[i % len(ports)]
        _, client = await loop.create_connection(lambda: _Client(counter, stop), HOST, port)
        clients.append(client)
    await asyncio.sleep(warmup_s)
    start_count, start = counter[0], time.perf_counter()
    await asyncio.sleep(duration_s)
    done, elapsed = counter[0] - start_count, time.perf_counter() - start
    stop.set()
    await asyncio.wait_for(asyncio.gather(*(c.closed for c in clients)), 10)
    return done / elapsed


# -- orchestration ------------------------------------------------------------------------


def spawn(*args: str) -> tuple[subprocess.Popen[str], int]:
    proc = subprocess.Popen(
        [sys.executable, __file__, *args], stdout=subprocess.PIPE, text=True, close_fds=True
    )
    assert proc.stdout is not None
    line = proc.stdout.readline().strip()
    if not line.isdigit():
        proc.kill()
        raise RuntimeError(f"{args} did not start (said {line!r})")
    return proc, int(line)


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="Last line: RESULT ingress_rps=<int> ratio_vs_direct=<float>",
    )
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--connections", type=int, default=32, help="concurrent connections")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--warmup", type=float, default=0.5, help="seconds before measuring")
    parser.add_argument(
        "--server",
        choices=["aiohttp", "minimal"],
        default="aiohttp",
        help="the instances: an aiohttp.web app (default) or a bare Protocol responder",
    )
    parser.add_argument("--role", choices=["server", "ingress"], help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--backend", action="append", type=int, default=[], help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.role == "server":
        uvloop.run(serve_aiohttp(args.port) if args.server == "aiohttp" else serve_http(args.port))
        return 0
    if args.role == "ingress":
        uvloop.run(serve_ingress(args.port, [(HOST, p) for p in args.backend]))
        return 0
    if args.duration <= 0 or args.connections < 1 or args.rounds < 1:
        parser.error("--duration, --connections and --rounds must be positive")

    procs: list[subprocess.Popen[str]] = []
    try:
        first, port_a = spawn("--role", "server", "--server", args.server)
        procs.append(first)
        second, port_b = spawn("--role", "server", "--server", args.server)
        procs.append(second)
        ingress, port_i = spawn(
            "--role", "ingress", "--backend", str(port_a), "--backend", str(port_b)
        )
        procs.append(ingress)
        log(
            f"cores={os.cpu_count()} {args.server} instances on {port_a}, {port_b}; "
            f"ingress on {port_i}; "
            f"{args.connections} connections, {args.duration:g} s x {args.rounds} rounds"
        )
        results: dict[str, list[float]] = {"direct": [], "ingress": [], "direct-both": []}
        plan = {"direct": [port_a], "ingress": [port_i], "direct-both": [port_a, port_b]}
        for round_ in range(args.rounds):
            order = list(plan)
            if round_ % 2:
                order.reverse()
            for what in order:
                rps = uvloop.run(measure(plan[what], args.connections, args.duration, args.warmup))
                results[what].append(rps)
                log(f"round {round_ + 1}: {what:12s} {rps:9.0f} req/s")
    finally:
        for proc in procs:
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            if proc.stdout is not None:
                proc.stdout.close()
    medians = {what: statistics.median(values) for what, values in results.items()}
    direct_rps, ingress_rps = medians["direct"], medians["ingress"]
    if not direct_rps or not ingress_rps:
        log("no requests were answered: see the errors above")
        return 1
    ratio = ingress_rps / direct_rps
    log(
        f"medians: direct to one instance {direct_rps:.0f} req/s, through the ingress "
        f"{ingress_rps:.0f} req/s, client spreading over both itself {medians['direct-both']:.0f}"
        f" req/s (ingress / that = {ingress_rps / medians['direct-both']:.2f})"
    )
    print(f"RESULT ingress_rps={ingress_rps:.0f} ratio_vs_direct={ratio:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
