"""The site DNS server: ``meshorch.net.dns_core`` on UDP and TCP sockets (asyncio).

Agents run one so the instances they start can find services by name::

    async with SiteDns(resolve, host=overlay_ip, port=53,
                       upstream=upstream_from_resolv_conf(listen=(overlay_ip, 53))) as dns:
        ...   # instances get ``nameserver <overlay_ip>`` in their resolv.conf

``resolve(service, app, tenant)`` is called in the event loop for every query in
the zone and must be a quick in-memory lookup; nothing is cached here beyond the
answers' TTL (1 s by default), so a change is visible on the next query.

UDP and TCP listen on the same (host, port); with port 0 the port is picked and
``port`` is the real one. TCP carries several length-prefixed messages per
connection, answered in order; a connection is closed when idle for
``tcp_idle_s``, when a message is longer than ``MAX_QUERY_BYTES`` or has no
readable header, and connections beyond ``max_tcp_connections`` are closed at
once.

Forwarding: a name outside the zone goes unchanged (same id) over UDP to each
``upstream`` in turn, from a fresh socket (a random source port), until one
answers with a response to that query; the answer is relayed as it is. All
upstreams together get ``upstream_timeout_s``; then the client gets SERVFAIL.
At most ``max_forwards`` forwards are in flight; beyond that, SERVFAIL at once.
Without upstreams, names outside the zone are REFUSED.

``stats`` counts (monotonic): ``queries`` (messages received), ``answered``,
``nxdomain``, ``refused``, ``servfail`` (resolver errors), ``malformed``
(dropped, FORMERR, NOTIMP, BADVERS), ``forwarded``, ``upstream_failed``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from meshorch.errors import ConfigurationError, ServiceError
from meshorch.net.dns_core import (
    DEFAULT_ZONE,
    MAX_QUERY_BYTES,
    OUTCOMES,
    Answer,
    Drop,
    Forward,
    Resolve,
    handle,
    upstream_reply_ok,
    zone_name,
)

logger = logging.getLogger(__name__)

Address = tuple[str, int]

STATS = ("queries", *OUTCOMES, "forwarded", "upstream_failed")

# With port 0 the UDP port is picked first; TCP may find it taken and we pick again.
_BIND_ATTEMPTS = 8
_WARN_INTERVAL_S = 10.0


def upstream_from_resolv_conf(
    path: str | Path = "/etc/resolv.conf", *, listen: Address | None = None
) -> list[Address]:
    """The ``nameserver`` entries of a resolv.conf as (ip, 53), in order, without duplicates.

    ``listen`` is our own listener: an entry that is it is skipped (we would forward
    to ourselves); listening on a wildcard address on port 53 skips every loopback
    entry for the same reason. A missing file gives ``[]``.
    """
    try:
        text = Path(path).read_text(encoding="utf-8", errors="replace")
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise ConfigurationError(f"cannot read {path}: {exc}") from None
    own: ipaddress.IPv4Address | ipaddress.IPv6Address | None = None
    if listen is not None and listen[1] == 53:
        own = ipaddress.ip_address(listen[0])
    out: list[Address] = []
    for line in text.splitlines():
        fields = line.split("#", 1)[0].split(";", 1)[0].split()
        if len(fields) < 2 or fields[0] != "nameserver":
            continue
        try:
            ip = ipaddress.ip_address(fields[1])
        except ValueError:
            logger.warning("%s: ignoring nameserver %r: not an IP address", path, fields[1])
            continue
        if own is not None and (ip == own or (own.is_unspecified and ip.is_loopback)):
            continue
        addr = (str(ip), 53)
        if addr not in out:
            out.append(addr)
    return out


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SiteDns) -> None:
        self._server = server

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        self._server._on_datagram(data, addr)

    def error_received(self, exc: Exception) -> None:
        logger.debug("site dns: UDP socket error: %s", exc)


class _Exchange(asyncio.DatagramProtocol):
    """One forwarded query: the first datagram that answers it completes ``done``."""

    def __init__(self, forward: Forward, done: asyncio.Future[bytes]) -> None:
        self._forward = forward
        self._done = done

    def datagram_received(self, data: bytes, addr: tuple[Any, ...]) -> None:
        if not self._done.done() and upstream_reply_ok(self._forward, data):
            self._done.set_result(data)

    def error_received(self, exc: Exception) -> None:
        # ICMP port unreachable and the like: this upstream is down, try the next now.
        if not self._done.done():
            self._done.set_exception(exc)


class SiteDns:
    """Answers ``SERVICE.APP.TENANT.<zone>`` from ``resolve``; an async context manager."""

    def __init__(
        self,
        resolve: Resolve,
        *,
        host: str,
        port: int = 53,
        zone: str = DEFAULT_ZONE,
        upstream: Sequence[Address] = (),
        ttl_s: int = 1,
        upstream_timeout_s: float = 2.0,
        tcp_idle_s: float = 10.0,
        max_tcp_connections: int = 256,
        max_forwards: int = 512,
    ) -> None:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            raise ConfigurationError(f"site dns host must be an IP address, got {host!r}") from None
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise ConfigurationError(f"site dns port must be 0-65535, got {port!r}")
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, int) or not 0 <= ttl_s < 2**31:
            raise ConfigurationError(f"site dns ttl_s must be a whole number >= 0, got {ttl_s!r}")
        for name, value in (
            ("upstream_timeout_s", upstream_timeout_s),
            ("tcp_idle_s", tcp_idle_s),
        ):
            if not (math.isfinite(value) and value > 0):
                raise ConfigurationError(f"site dns {name} must be > 0, got {value!r}")
        if max_tcp_connections < 1 or max_forwards < 1:
            raise ConfigurationError("site dns max_tcp_connections and max_forwards must be >= 1")
        try:
            self.zone = zone_name(zone)
        except ValueError as exc:
            raise ConfigurationError(f"site dns: {exc}") from None
        checked: list[Address] = []
        for up_host, up_port in upstream:
            try:
                ipaddress.ip_address(up_host)
            except ValueError:
                raise ConfigurationError(
                    f"site dns upstream {up_host!r} must be an IP address"
                ) from None
            if not 0 < up_port < 65536:
                raise ConfigurationError(f"site dns upstream port {up_port!r} is out of range")
            checked.append((up_host, up_port))
        self.host = host
        self.port = port
        self.upstream: tuple[Address, ...] = tuple(checked)
        self.ttl_s = ttl_s
        self.stats: dict[str, int] = dict.fromkeys(STATS, 0)
        self._resolve = resolve
        self._upstream_timeout_s = upstream_timeout_s
        self._tcp_idle_s = tcp_idle_s
        self._max_tcp = max_tcp_connections
        self._max_forwards = max_forwards
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._forwards: set[asyncio.Task[None]] = set()
        self._state = "new"  # new -> running -> stopped
        self._next_warn: dict[str, float] = {}

    # -- lifecycle ----------------------------------------------------------------

    async def __aenter__(self) -> SiteDns:
        await self.start()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def start(self) -> None:
        """Bind UDP and TCP on (host, port); ``ServiceError`` when that fails."""
        if self._state != "new":
            raise ServiceError(f"cannot start a site dns server that is {self._state}")
        loop = asyncio.get_running_loop()
        attempts = _BIND_ATTEMPTS if self.port == 0 else 1
        for attempt in range(attempts):
            try:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(self.host, self.port)
                )
            except OSError as exc:
                raise ServiceError(
                    f"site dns cannot listen on UDP {self.host}:{self.port}: {exc}"
                ) from exc
            port = int(udp.get_extra_info("sockname")[1])
            try:
                self._tcp = await asyncio.start_server(
                    self._serve_tcp, self.host, port, reuse_address=True
                )
            except OSError as exc:
                udp.close()
                if attempt + 1 < attempts:
                    continue
                raise ServiceError(
                    f"site dns cannot listen on TCP {self.host}:{port}: {exc}"
                ) from exc
            self._udp = udp
            self.port = port
            break
        self._state = "running"
        logger.info(
            "site dns: zone %s on %s:%d (udp+tcp), upstream %s",
            self.zone.to_text(),
            self.host,
            self.port,
            ", ".join(f"{h}:{p}" for h, p in self.upstream) or "none (other names refused)",
        )

    async def stop(self) -> None:
        """Close the sockets and end open connections and forwards."""
        if self._state != "running":
            return
        self._state = "stopped"
        if self._udp is not None:
            self._udp.close()
            self._udp = None
        server, self._tcp = self._tcp, None
        if server is not None:
            server.close()
        tasks = [*self._connections, *self._forwards]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        if server is not None:
            await server.wait_closed()
        logger.info("site dns: stopped (%s)", self.stats)

    @property
    def running(self) -> bool:
        return self._state == "running"

    @property
    def address(self) -> Address:
        """(host, port) as bound; the port is the picked one when 0 was asked for."""
        return (self.host, self.port)

    # -- queries ------------------------------------------------------------------

    def _decide(self, data: bytes, *, tcp: bool) -> Answer | Forward | Drop:
        self.stats["queries"] += 1
        reply = handle(
            data, self._resolve, self.zone, self.ttl_s, forwarding=bool(self.upstream), tcp=tcp
        )
        if isinstance(reply, Answer):
            self.stats[reply.outcome] += 1
            if reply.error is not None:
                self._resolver_failed(reply.error)
        elif isinstance(reply, Drop):
            self.stats["malformed"] += 1
            logger.debug("site dns: dropped a message: %s", reply.reason)
        else:
            self.stats["forwarded"] += 1
        return reply

    def _on_datagram(self, data: bytes, addr: tuple[Any, ...]) -> None:
        transport = self._udp
        if transport is None:
            return
        reply = self._decide(data, tcp=False)
        if isinstance(reply, Answer):
            transport.sendto(reply.wire, addr)
        elif isinstance(reply, Forward):
            if len(self._forwards) >= self._max_forwards:
                self.stats["upstream_failed"] += 1
                transport.sendto(reply.servfail, addr)
                return
            task = asyncio.get_running_loop().create_task(self._forward_udp(reply, addr))
            self._forwards.add(task)
            task.add_done_callback(self._forwards.discard)

    async def _forward_udp(self, forward: Forward, addr: tuple[Any, ...]) -> None:
        wire = await self._forward(forward)
        transport = self._udp
        if transport is not None:
            transport.sendto(wire, addr)

    async def _forward(self, forward: Forward) -> bytes:
        """The first upstream answer to ``forward``, else its SERVFAIL."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._upstream_timeout_s
        upstream = self.upstream
        for i, target in enumerate(upstream):
            remaining = deadline - loop.time()
            if remaining <= 0:
                break
            # Time left is shared by the upstreams not tried yet: one that is down
            # silently cannot take the others' time.
            share = remaining / (len(upstream) - i)
            try:
                return await self._exchange(forward, target, share)
            except (OSError, TimeoutError) as exc:
                logger.debug(
                    "site dns: upstream %s:%d did not answer %s: %r",
                    *target,
                    forward.name,
                    exc,
                )
        self.stats["upstream_failed"] += 1
        self._log_limited(
            "upstream", logging.WARNING, f"no upstream answered {forward.name}; answered SERVFAIL"
        )
        return forward.servfail

    async def _exchange(self, forward: Forward, target: Address, timeout_s: float) -> bytes:
        loop = asyncio.get_running_loop()
        done: asyncio.Future[bytes] = loop.create_future()
        transport, _ = await loop.create_datagram_endpoint(
            lambda: _Exchange(forward, done), remote_addr=target
        )
        try:
            transport.sendto(forward.query)
            async with asyncio.timeout(timeout_s):
                return await done
        finally:
            transport.close()

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        if task is None or not self.running or len(self._connections) >= self._max_tcp:
            writer.close()
            return
        self._connections.add(task)
        try:
            while self.running:
                try:
                    async with asyncio.timeout(self._tcp_idle_s):
                        size = int.from_bytes(await reader.readexactly(2), "big")
                        if size == 0 or size > MAX_QUERY_BYTES:
                            # The framing is all we have; past this we cannot trust it.
                            self.stats["queries"] += 1
                            self.stats["malformed"] += 1
                            break
                        data = await reader.readexactly(size)
                except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
                    break
                reply = self._decide(data, tcp=True)
                if isinstance(reply, Drop):
                    break
                wire = reply.wire if isinstance(reply, Answer) else await self._forward(reply)
                writer.write(len(wire).to_bytes(2, "big") + wire)
                try:
                    async with asyncio.timeout(self._tcp_idle_s):
                        await writer.drain()
                except (TimeoutError, ConnectionError):
                    break
        finally:
            self._connections.discard(task)
            writer.close()

    # -- logging ------------------------------------------------------------------

    def _resolver_failed(self, exc: Exception) -> None:
        message = (
            f"the service resolver failed; answered SERVFAIL ({self.stats['servfail']} so far)"
        )
        self._log_limited("resolver", logging.ERROR, message, exc)

    def _log_limited(
        self, kind: str, level: int, message: str, exc: Exception | None = None
    ) -> None:
        # A broken resolver or a dead upstream fails every query: log once per interval.
        now = asyncio.get_running_loop().time()
        if now >= self._next_warn.get(kind, -math.inf):
            self._next_warn[kind] = now + _WARN_INTERVAL_S
            logger.log(level, "site dns: %s", message, exc_info=exc)
        else:
            logger.debug("site dns: %s", message, exc_info=exc)


__all__ = ["STATS", "Address", "SiteDns", "upstream_from_resolv_conf"]
