"""The TCP ingress on loopback: spreading, failover, half-close, flow control, shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import socket
import struct
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any

import pytest
import uvloop

from meshorch.errors import ConfigurationError
from meshorch.net.ingress import (
    STAT_KEYS,
    Backend,
    IngressError,
    Ingresses,
    TcpIngress,
    backend_order,
)
from tests.waiting import until

LOCAL = "127.0.0.1"


# -- helpers ------------------------------------------------------------------------------


class Backends:
    """A mutable backend list the ingress reads per connection."""

    def __init__(self, *backends: Backend) -> None:
        self.current: list[Backend] = list(backends)

    def __call__(self) -> Sequence[Backend]:
        return list(self.current)


class NamedServer:
    """Answers each connection with its name, then echoes until EOF, then closes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.server: asyncio.Server | None = None
        self.port = 0
        self.connections = 0

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            writer.write(self.name.encode() + b"\n")
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
            writer.close()
            await writer.wait_closed()
        except (ConnectionError, OSError):
            pass

    async def __aenter__(self) -> NamedServer:
        self.server = await asyncio.start_server(self._handle, LOCAL, 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()

    @property
    def backend(self) -> Backend:
        return (LOCAL, self.port)


def closed_port() -> int:
    """A port with nothing listening (bound then released)."""
    with socket.socket() as s:
        s.bind((LOCAL, 0))
        port: int = s.getsockname()[1]
    return port


async def who(port: int) -> str:
    reader, writer = await asyncio.open_connection(LOCAL, port)
    try:
        line = await asyncio.wait_for(reader.readline(), 5)
        return line.decode().strip()
    finally:
        writer.close()
        await writer.wait_closed()


async def settle(ingress: TcpIngress, timeout_s: float = 5.0) -> None:
    """Wait until no connection is open through ``ingress``."""
    await until("no open connection", lambda: ingress.stats["active"] == 0, timeout_s)


def with_servers(
    scenario: Callable[[list[NamedServer]], Awaitable[None]],
) -> Callable[[], Coroutine[Any, Any, None]]:
    """Run ``scenario`` with three named servers a, b, c (no fixture: the same test runs
    on uvloop too, see the end of the module)."""

    async def run() -> None:
        async with NamedServer("a") as a, NamedServer("b") as b, NamedServer("c") as c:
            await scenario([a, b, c])

    run.__name__ = scenario.__name__
    run.__doc__ = scenario.__doc__
    return run


def ingress_for(
    backends: Callable[[], Sequence[Backend]], connect_timeout_s: float = 1.0
) -> TcpIngress:
    return TcpIngress(LOCAL, 0, backends, name="test", connect_timeout_s=connect_timeout_s)


# -- pure ---------------------------------------------------------------------------------


def test_backend_order_rotates_and_dedups() -> None:
    a, b, c = ("h", 1), ("h", 2), ("h", 3)
    assert backend_order([], 5) == []
    assert backend_order([a, b, c], 0) == [a, b, c]
    assert backend_order([a, b, c], 1) == [b, c, a]
    assert backend_order([a, b, c], 5) == [c, a, b]
    assert backend_order([a, b, a, c], 1) == [b, c, a]


def test_bad_listen_arguments() -> None:
    with pytest.raises(ConfigurationError):
        TcpIngress(LOCAL, 70000, Backends())
    with pytest.raises(ConfigurationError):
        TcpIngress("", 80, Backends())
    with pytest.raises(ConfigurationError):
        TcpIngress(LOCAL, 80, Backends(), connect_timeout_s=0)


# -- spreading and failover ---------------------------------------------------------------


@with_servers
async def test_round_robin_across_backends(servers: list[NamedServer]) -> None:
    backends = Backends(*(s.backend for s in servers))
    async with ingress_for(backends) as ingress:
        seen = [await who(ingress.port) for _ in range(9)]
        await settle(ingress)
    assert seen == ["a", "b", "c"] * 3
    assert [s.connections for s in servers] == [3, 3, 3]
    assert ingress.stats["accepted"] == ingress.stats["relayed"] == 9
    assert ingress.stats["active"] == 0


@with_servers
async def test_dead_backend_is_skipped(servers: list[NamedServer]) -> None:
    backends = Backends((LOCAL, closed_port()), servers[0].backend, servers[1].backend)
    async with ingress_for(backends) as ingress:
        seen = [await who(ingress.port) for _ in range(6)]
        await settle(ingress)
    assert set(seen) == {"a", "b"}
    assert ingress.stats["relayed"] == 6
    assert ingress.stats["connect_failed"] == 2  # one in three starts at the dead one
    assert ingress.stats["no_backend"] == 0


@with_servers
async def test_unanswering_backend_times_out(servers: list[NamedServer]) -> None:
    # A listener whose backlog is full never completes the handshake: a connect timeout.
    with socket.socket() as stuck:
        stuck.bind((LOCAL, 0))
        stuck.listen(0)
        fillers = []
        for _ in range(4):
            filler = socket.socket()
            filler.setblocking(False)
            with contextlib.suppress(BlockingIOError):
                filler.connect(stuck.getsockname())
            fillers.append(filler)
        try:
            backends = Backends(stuck.getsockname(), servers[0].backend)
            async with ingress_for(backends, connect_timeout_s=0.2) as ingress:
                assert await who(ingress.port) == "a"
                await settle(ingress)
            assert ingress.stats["connect_failed"] == 1
        finally:
            for filler in fillers:
                filler.close()


@with_servers
async def test_backend_changes_apply_to_new_connections(servers: list[NamedServer]) -> None:
    a, b, c = servers
    backends = Backends(a.backend)
    async with ingress_for(backends) as ingress:
        kept_reader, kept_writer = await asyncio.open_connection(LOCAL, ingress.port)
        assert (await kept_reader.readline()) == b"a\n"
        backends.current = [b.backend, c.backend]
        seen = {await who(ingress.port) for _ in range(4)}
        assert seen == {"b", "c"}
        # The connection made before the change still talks to a.
        kept_writer.write(b"still here\n")
        assert (await kept_reader.readline()) == b"still here\n"
        kept_writer.close()
        await kept_writer.wait_closed()
        await settle(ingress)


async def test_no_backend_closes_client_at_once() -> None:
    backends = Backends()
    async with ingress_for(backends) as ingress:
        reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
        async with asyncio.timeout(1):
            assert await reader.read() == b""
        writer.close()
        backends.current = [(LOCAL, closed_port()), (LOCAL, closed_port())]
        reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
        async with asyncio.timeout(1):
            assert await reader.read() == b""
        writer.close()
        await settle(ingress)
    assert ingress.stats["no_backend"] == 2
    assert ingress.stats["connect_failed"] == 2
    assert ingress.stats["relayed"] == 0


async def test_backends_callable_raising_means_no_backend() -> None:
    def broken() -> Sequence[Backend]:
        raise RuntimeError("registry down")

    async with TcpIngress(LOCAL, 0, broken) as ingress:
        reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
        async with asyncio.timeout(1):
            assert await reader.read() == b""
        writer.close()
        await settle(ingress)
    assert ingress.stats["no_backend"] == 1


# -- relaying -----------------------------------------------------------------------------


async def test_large_transfer_both_ways_with_half_close() -> None:
    """20 MB each way at once, byte-exact; the client's EOF reaches the backend, and the
    backend keeps sending after it (half-close), then closes."""
    size = 20 * 1024 * 1024
    upload = os.urandom(size)
    download = os.urandom(size)
    got_upload = asyncio.get_running_loop().create_future()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        async def send() -> None:
            view = memoryview(download)
            for i in range(0, size, 1 << 20):
                writer.write(view[i : i + (1 << 20)])
                await writer.drain()

        sender = asyncio.create_task(send())
        received = await reader.read(-1)  # until the client's EOF
        got_upload.set_result(received)
        await sender
        # After the client's EOF we may still write: a tail, then close.
        writer.write(b"TAIL")
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ingress_for(Backends((LOCAL, port))) as ingress:
            reader, writer = await asyncio.open_connection(LOCAL, ingress.port)

            async def upload_all() -> None:
                view = memoryview(upload)
                for i in range(0, size, 1 << 20):
                    writer.write(view[i : i + (1 << 20)])
                    await writer.drain()
                writer.write_eof()

            async with asyncio.timeout(60):
                _, received = await asyncio.gather(upload_all(), reader.read(-1))
                assert hashlib.sha256(await got_upload).digest() == hashlib.sha256(upload).digest()
            assert received[-4:] == b"TAIL"
            assert hashlib.sha256(received[:-4]).digest() == hashlib.sha256(download).digest()
            writer.close()
            await settle(ingress)
            assert ingress.stats["bytes_in"] == size
            assert ingress.stats["bytes_out"] == size + 4
    finally:
        server.close()


async def test_data_and_eof_before_the_backend_is_joined() -> None:
    """A client that sends its whole request and EOF at once (before the ingress has a
    backend: the first one tried is dead) still gets it delivered, EOF included; a
    backend that answers and closes at once still gets its answer through."""

    async def echo_all(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"echo:" + await reader.read(-1))
        await writer.drain()
        writer.close()

    async def bye(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"bye")
        writer.close()

    echo = await asyncio.start_server(echo_all, LOCAL, 0)
    quick = await asyncio.start_server(bye, LOCAL, 0)
    try:
        dead = (LOCAL, closed_port())
        backends = Backends(dead, echo.sockets[0].getsockname())
        async with ingress_for(backends) as ingress:
            reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            writer.write_eof()
            async with asyncio.timeout(5):
                assert await reader.read(-1) == b"echo:GET / HTTP/1.0\r\n\r\n"
            writer.close()
            backends.current = [quick.sockets[0].getsockname()]
            for _ in range(5):
                reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
                async with asyncio.timeout(5):
                    assert await reader.read(-1) == b"bye"
                writer.close()
            await settle(ingress)
    finally:
        echo.close()
        quick.close()


async def test_slow_reader_does_not_make_the_ingress_buffer() -> None:
    """A backend streams; the client does not read. The ingress must stop reading from
    the backend (its write buffer stays bounded) rather than swallow everything."""
    sent = 0
    stop = asyncio.Event()

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal sent
        chunk = b"x" * 65536
        try:
            while not stop.is_set():
                writer.write(chunk)
                await writer.drain()
                sent += len(chunk)
        except (ConnectionError, OSError):
            pass

    server = await asyncio.start_server(handle, LOCAL, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with ingress_for(Backends((LOCAL, port))) as ingress:
            _reader, writer = await asyncio.open_connection(LOCAL, ingress.port, limit=65536)
            # StreamReader pauses its transport past 2*limit: the client really stops reading.

            async def stalled() -> bool:
                before = sent
                await asyncio.sleep(0.3)
                return sent == before

            # Fails if the backend never stops: nobody would be applying back-pressure.
            await until("the backend blocked by back-pressure", stalled, 15)
            # Kernel buffers on three sockets plus the ingress's bounded write buffer.
            assert ingress.stats["bytes_out"] < 64 * 1024 * 1024
            stop.set()
            writer.close()
            await settle(ingress)
    finally:
        server.close()


@with_servers
async def test_stop_closes_relayed_and_connecting_connections(servers: list[NamedServer]) -> None:
    ingress = ingress_for(Backends(servers[0].backend))
    await ingress.start()
    reader, writer = await asyncio.open_connection(LOCAL, ingress.port)
    assert await reader.readline() == b"a\n"
    await ingress.stop()
    async with asyncio.timeout(2):
        with pytest.raises((ConnectionError, OSError)):
            while True:
                if not await reader.read(1024):
                    raise ConnectionResetError("EOF")
    writer.close()
    assert ingress.stats["active"] == 0
    # Nobody listens any more.
    with pytest.raises(OSError):
        await asyncio.open_connection(LOCAL, ingress.port)
    await ingress.stop()  # twice is fine


@with_servers
async def test_abrupt_and_garbage_clients_leave_nothing_behind(servers: list[NamedServer]) -> None:
    tasks_before = len(asyncio.all_tasks())
    backends = Backends(servers[0].backend, (LOCAL, closed_port()), servers[1].backend)
    async with ingress_for(backends) as ingress:
        for i in range(60):
            sock = socket.socket()
            sock.setblocking(False)
            await asyncio.get_running_loop().sock_connect(sock, (LOCAL, ingress.port))
            if i % 3 == 0:
                # Reset at once (SO_LINGER 0), possibly before the backend is connected.
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif i % 3 == 1:
                await asyncio.get_running_loop().sock_sendall(sock, os.urandom(4096))
            sock.close()
        await settle(ingress)
        assert len(asyncio.all_tasks()) == tasks_before + 0
        assert await who(ingress.port) in {"a", "b"}
        await settle(ingress)
    stats = ingress.stats
    print(stats)
    assert set(stats) == set(STAT_KEYS)
    assert stats["accepted"] == 61
    assert stats["accepted"] == stats["relayed"] + stats["no_backend"] + stats["abandoned"]
    assert stats["active"] == 0


# -- Ingresses ----------------------------------------------------------------------------


@with_servers
async def test_ingresses_apply_starts_and_stops(servers: list[NamedServer]) -> None:
    a, b, _ = servers
    p1, p2 = closed_port(), closed_port()
    async with Ingresses() as ingresses:
        await ingresses.apply({(LOCAL, p1): Backends(a.backend), (LOCAL, p2): Backends(b.backend)})
        assert set(ingresses.running) == {(LOCAL, p1), (LOCAL, p2)}
        assert await who(p1) == "a"
        assert await who(p2) == "b"
        first = ingresses.running[(LOCAL, p1)]
        # p2 goes away; p1 is repointed at b without a restart.
        await ingresses.apply({(LOCAL, p1): Backends(b.backend)})
        assert ingresses.running == {(LOCAL, p1): first}
        assert await who(p1) == "b"
        with pytest.raises(OSError):
            await asyncio.open_connection(LOCAL, p2)
        # A listener that cannot start is reported; the others still run.
        with socket.socket() as taken:
            taken.bind((LOCAL, 0))
            taken.listen()
            busy = taken.getsockname()[1]
            with pytest.raises(IngressError, match=str(busy)):
                await ingresses.apply(
                    {(LOCAL, p1): Backends(b.backend), (LOCAL, busy): Backends(a.backend)}
                )
        assert set(ingresses.running) == {(LOCAL, p1)}
    assert ingresses.running == {}
    with pytest.raises(OSError):
        await asyncio.open_connection(LOCAL, p1)


# -- the same on uvloop (the agent's loop: its transports are a different implementation) --

ALL_SCENARIOS = [
    test_round_robin_across_backends,
    test_dead_backend_is_skipped,
    test_unanswering_backend_times_out,
    test_backend_changes_apply_to_new_connections,
    test_no_backend_closes_client_at_once,
    test_backends_callable_raising_means_no_backend,
    test_large_transfer_both_ways_with_half_close,
    test_data_and_eof_before_the_backend_is_joined,
    test_slow_reader_does_not_make_the_ingress_buffer,
    test_stop_closes_relayed_and_connecting_connections,
    test_abrupt_and_garbage_clients_leave_nothing_behind,
    test_ingresses_apply_starts_and_stops,
]


@pytest.mark.parametrize("scenario", ALL_SCENARIOS, ids=lambda f: f.__name__.removeprefix("test_"))
def test_on_uvloop(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    uvloop.run(asyncio.wait_for(scenario(), 120))
