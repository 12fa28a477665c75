"""Site ingress: a TCP forwarder from one listening address to a service's ready instances.

``TcpIngress`` listens on ``(host, port)`` (normally a VIP held by one host of the
site: ``meshorch.net.vip``) and relays each accepted connection to one backend. The
backends are asked for per connection (``Backends``), so instances that come,
go or stop being ready take effect for the next connection; connections already
relayed stay where they are.

Choosing: connections take the backends round-robin (``backend_order``, pure):
the start index rotates across connections, and when a backend refuses or does
not answer within ``connect_timeout_s`` the next one is tried, each at most once
per connection. With no backend left the client connection is closed at once.

Relaying uses asyncio Protocols (no per-connection tasks once connected):
bytes read on one side are written to the other; when a side's write buffer
passes its high-water mark, reading from the opposite side pauses until it
drains, so a slow reader never makes the ingress buffer without bound. EOF one
way becomes a write shutdown the other way (half-close); the connection pair
ends when both ways are done or either side is lost (a reset is passed on as one).
It is a userspace relay: every chunk costs a read and a write here, so in front
of a trivial server the ingress spends about as much CPU as the server itself
(``bench/ingress.py`` measures it).

``stats``: every accepted connection ends in exactly one of ``relayed``,
``no_backend`` or ``abandoned`` (the client left first); ``active`` is a gauge.

``Ingresses`` keeps a set of ``TcpIngress`` in step with a desired mapping
``{(listen_host, port): Backends}``, since services come and go.

Exceptions::

    MeshorchError
    ├── ConfigurationError
    │   └── (bad listen address or port)
    └── ServiceError
        └── IngressError       a listener could not start
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from types import TracebackType
from typing import Self, cast

from meshorch.errors import ConfigurationError, ServiceError

logger = logging.getLogger(__name__)

Backend = tuple[str, int]
Backends = Callable[[], Sequence[Backend]]
"""The current ready backends ``(host, port)``; called once per accepted connection."""

STAT_KEYS = (
    "accepted",  # client connections accepted
    "relayed",  # client connections joined to a backend
    "no_backend",  # client connections closed because no backend could be reached
    "connect_failed",  # backend connection attempts that failed or timed out
    "abandoned",  # client connections that ended before a backend was joined
    "bytes_in",  # client -> backend
    "bytes_out",  # backend -> client
    "active",  # client connections open now (connecting or relaying)
)

# Per-direction write buffer: above HIGH the opposite side stops reading until
# the buffer drains below LOW. Large enough that a fast pair never stalls on it.
WRITE_HIGH_WATER = 512 * 1024
WRITE_LOW_WATER = 128 * 1024


class IngressError(ServiceError):
    """An ingress listener could not start (address in use, not assigned, ...)."""


# -- choosing (pure) ----------------------------------------------------------------------


def backend_order(backends: Sequence[Backend], start: int) -> list[Backend]:
    """The backends to try for one connection, starting at ``start`` (mod the count).

    Duplicates are dropped (each backend is tried at most once per connection);
    the rest keep their order, wrapping round.
    """
    unique = list(dict.fromkeys(backends))
    if not unique:
        return []
    first = start % len(unique)
    return unique[first:] + unique[:first]


def _check_listen(host: str, port: int) -> None:
    if not isinstance(host, str) or not host:
        raise ConfigurationError(f"ingress listen host must be a non-empty string, got {host!r}")
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
        raise ConfigurationError(f"ingress listen port must be 0-65535, got {port!r}")


# -- relaying -----------------------------------------------------------------------------


class _Side(asyncio.Protocol):
    """One TCP connection of a relayed pair (the client's or the backend's)."""

    def __init__(self, pair: _Pair, is_client: bool) -> None:
        self.pair = pair
        self.is_client = is_client
        self.transport: asyncio.Transport | None = None
        self.peer: _Side | None = None
        self.eof = False  # this side sent EOF (we shut down writing to the peer)
        self.early: list[bytes] = []  # read before the peer existed
        self.out: asyncio.Transport | None = None  # the peer's transport, once joined
        self.stats = pair.ingress.stats
        self.counter = "bytes_in" if is_client else "bytes_out"
        self.lost = False

    # Both sides start paused: nothing is read until the other side exists to take it.
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement asyncio.Transport without subclassing it.
        transport = cast(asyncio.Transport, transport)
        self.transport = transport
        transport.pause_reading()
        transport.set_write_buffer_limits(high=WRITE_HIGH_WATER, low=WRITE_LOW_WATER)
        if self.is_client:
            self.pair.client_connected(self)

    def data_received(self, data: bytes) -> None:
        # The hot path: one call per read, so no lookups beyond what is needed.
        out = self.out
        if out is not None:
            if not out.is_closing():
                out.write(data)
                self.stats[self.counter] += len(data)
            return
        if self.peer is None:
            # Before the join. uvloop ignores pause_reading() inside connection_made
            # (it starts reading right after), so keep what arrives and pause now.
            self.early.append(data)
            if self.transport is not None:
                self.transport.pause_reading()

    def eof_received(self) -> bool:
        self.eof = True
        peer = self.peer
        if peer is None:
            return True  # before the join: passed on by _Pair._join
        return self.pass_eof()

    def pass_eof(self) -> bool:
        """Shut down writing to the peer; close both once both ways are done."""
        peer = self.peer
        if peer is None or peer.transport is None or peer.transport.is_closing():
            return False
        if peer.transport.can_write_eof():
            peer.transport.write_eof()
        if peer.eof:
            # Both ways finished: close both (close() still flushes what is buffered).
            self.pair.close()
            return False
        return True  # keep our transport open: the other way may still carry data

    def pause_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.pause_reading()

    def resume_writing(self) -> None:
        peer = self.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            peer.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.lost = True
        self.pair.side_lost(self, exc)


def _same(side: _Side) -> _Side:
    return side


class _Pair:
    """A client connection and (once connected) its backend connection."""

    def __init__(self, ingress: TcpIngress) -> None:
        self.ingress = ingress
        self.client = _Side(self, is_client=True)
        self.backend: _Side | None = None
        self.connector: asyncio.Task[None] | None = None
        self.done = False

    def client_connected(self, side: _Side) -> None:
        self.ingress._pair_started(self)
        self.connector = asyncio.get_running_loop().create_task(
            self._connect(), name=f"ingress {self.ingress.name} connect"
        )
        self.connector.add_done_callback(self._connector_done)

    def _connector_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            # A bug, not a network failure (those are handled in _connect): never leak it.
            logger.error(
                "ingress %s: connect task failed", self.ingress.name, exc_info=task.exception()
            )
            self.abort()

    async def _connect(self) -> None:
        ingress = self.ingress
        stats = ingress.stats
        order = ingress._next_order()
        loop = asyncio.get_running_loop()
        joined = False
        try:
            for host, port in order:
                if self.done:
                    return
                side = _Side(self, is_client=False)
                try:
                    async with asyncio.timeout(ingress.connect_timeout_s):
                        await loop.create_connection(functools.partial(_same, side), host, port)
                except (OSError, TimeoutError) as exc:
                    stats["connect_failed"] += 1
                    logger.debug("ingress %s: %s:%d failed: %r", ingress.name, host, port, exc)
                    continue
                if self.done:  # the client went away while we were connecting
                    if side.transport is not None:
                        side.transport.abort()
                    return
                joined = True
                self._join(side)
                return
            if self.done:
                return
            joined = True  # counted as no_backend, not abandoned
            stats["no_backend"] += 1
            logger.debug("ingress %s: no backend reachable (%d tried)", ingress.name, len(order))
            self.close()
        finally:
            # Every accepted connection ends up in exactly one of relayed,
            # no_backend or abandoned.
            if not joined:
                stats["abandoned"] += 1

    def _join(self, backend: _Side) -> None:
        client = self.client
        self.backend = backend
        client.peer, backend.peer = backend, client
        client.out, backend.out = backend.transport, client.transport
        self.ingress.stats["relayed"] += 1
        for side in (client, backend):
            early, side.early = side.early, []
            for data in early:
                side.data_received(data)
        if backend.lost:  # lost between connect and join: pass it on
            self.side_lost(backend, None)
            return
        for side in (client, backend):
            if side.eof and not side.pass_eof() and side.transport is not None:
                side.transport.close()
        for side in (client, backend):
            if side.transport is not None and not side.transport.is_closing():
                side.transport.resume_reading()

    def side_lost(self, side: _Side, exc: Exception | None) -> None:
        peer = side.peer
        if peer is not None and peer.transport is not None and not peer.transport.is_closing():
            # An orderly close lets the peer's buffered bytes through; a reset is passed on.
            if exc is None:
                peer.transport.close()
            else:
                peer.transport.abort()
        if side.is_client:
            self.done = True  # a connect still in progress gives up
        if self.client.lost and (self.backend is None or self.backend.lost):
            self.ingress._pair_finished(self)

    def close(self) -> None:
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None:
                side.transport.close()

    def abort(self) -> None:
        self.done = True
        if self.connector is not None and not self.connector.done():
            self.connector.cancel()
        for side in (self.client, self.backend):
            if side is not None and side.transport is not None:
                side.transport.abort()


class TcpIngress:
    """Listens on ``(host, port)``; relays each connection to one of ``backends()``.

    ``port=0`` picks a free port; ``self.port`` is the real one once started.
    ``stats`` counts connections and bytes (keys in ``STAT_KEYS``).
    """

    def __init__(
        self,
        host: str,
        port: int,
        backends: Backends,
        *,
        connect_timeout_s: float = 1.0,
        name: str = "",
    ) -> None:
        _check_listen(host, port)
        if not connect_timeout_s > 0:
            raise ConfigurationError(f"connect_timeout_s must be > 0, got {connect_timeout_s!r}")
        self.host = host
        self.port = port
        self.backends = backends
        self.connect_timeout_s = connect_timeout_s
        self.name = name or f"{host}:{port}"
        self.stats: dict[str, int] = dict.fromkeys(STAT_KEYS, 0)
        self._server: asyncio.Server | None = None
        self._pairs: set[_Pair] = set()
        self._next = 0

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    @property
    def running(self) -> bool:
        return self._server is not None

    async def start(self) -> None:
        if self._server is not None:
            return
        loop = asyncio.get_running_loop()
        try:
            self._server = await loop.create_server(
                lambda: _Pair(self).client,
                self.host,
                self.port,
                reuse_address=True,
                backlog=1024,
            )
        except OSError as exc:
            raise IngressError(
                f"ingress {self.name}: cannot listen on {self.host}:{self.port}: "
                f"{exc.strerror or exc}"
            ) from exc
        sockets = self._server.sockets
        if sockets and self.port == 0:
            self.port = int(sockets[0].getsockname()[1])
        if self.name == f"{self.host}:0":
            self.name = f"{self.host}:{self.port}"
        logger.info("ingress %s listening on %s:%d", self.name, self.host, self.port)

    async def stop(self) -> None:
        """Stop listening and end every connection (relayed or still connecting)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        pairs = list(self._pairs)
        connectors = [p.connector for p in pairs if p.connector is not None]
        for pair in pairs:
            pair.abort()
        # Let the cancelled connect tasks and the aborted transports' callbacks run.
        if connectors:
            await asyncio.gather(*connectors, return_exceptions=True)
        await server.wait_closed()
        await asyncio.sleep(0)
        logger.info("ingress %s stopped (%s)", self.name, self.stats)

    # -- bookkeeping used by the pairs

    def _next_order(self) -> list[Backend]:
        try:
            current = self.backends()
        except Exception:
            # A broken backend source must not take the listener down; no backend it is.
            logger.exception("ingress %s: backends() raised", self.name)
            return []
        start = self._next
        self._next += 1
        return backend_order(current, start)

    def _pair_started(self, pair: _Pair) -> None:
        self._pairs.add(pair)
        self.stats["accepted"] += 1
        self.stats["active"] += 1
        if self._server is None:  # accepted as we were stopping
            pair.abort()

    def _pair_finished(self, pair: _Pair) -> None:
        if pair in self._pairs:
            self._pairs.discard(pair)
            self.stats["active"] -= 1


ListenKey = tuple[str, int]


class Ingresses:
    """Keeps one ``TcpIngress`` per ``(listen_host, port)`` of a desired mapping."""

    def __init__(self, *, connect_timeout_s: float = 1.0) -> None:
        self.connect_timeout_s = connect_timeout_s
        self._running: dict[ListenKey, TcpIngress] = {}
        self._lock = asyncio.Lock()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    async def start(self) -> None:
        """Nothing listens until ``apply``; present for the service shape."""

    async def stop(self) -> None:
        await self.apply({})

    @property
    def running(self) -> dict[ListenKey, TcpIngress]:
        return dict(self._running)

    async def apply(self, desired: Mapping[ListenKey, Backends]) -> None:
        """Stop listeners no longer wanted, start new ones, repoint the rest.

        Every listener that can start is started; failures are raised together
        afterwards (``IngressError``), and ``apply`` can simply be called again.
        """
        for host, port in desired:
            _check_listen(host, port)
        async with self._lock:
            for key in [k for k in self._running if k not in desired]:
                await self._running.pop(key).stop()
            failures: list[str] = []
            for key, backends in desired.items():
                existing = self._running.get(key)
                if existing is not None:
                    existing.backends = backends
                    continue
                ingress = TcpIngress(
                    key[0], key[1], backends, connect_timeout_s=self.connect_timeout_s
                )
                try:
                    await ingress.start()
                except IngressError as exc:
                    failures.append(str(exc))
                    continue
                self._running[key] = ingress
        if failures:
            raise IngressError("; ".join(failures))


__all__ = [
    "STAT_KEYS",
    "Backend",
    "Backends",
    "IngressError",
    "Ingresses",
    "TcpIngress",
    "backend_order",
]
