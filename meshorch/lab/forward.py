"""A TCP port of this namespace forwarded to an address inside a lab namespace.

The lab never touches the root namespace (see ``meshorch.lab.plan``), so a browser on
the machine cannot reach the hub on the lab's WAN. ``NetnsForward`` listens here and, for
each connection, connects from a socket made inside the target namespace, then copies
bytes both ways (half-closes passed on). Meant for a person's browser and CLI: one
thread per new connection to enter the namespace is fine at that rate.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from types import TracebackType
from typing import Self

from meshorch.net.netns import in_netns

log = logging.getLogger(__name__)

COPY_CHUNK = 64 * 1024
CONNECT_TIMEOUT_S = 5.0


class NetnsForward:
    """Forward ``listen_host:listen_port`` to ``target_host:target_port`` in ``netns``."""

    def __init__(
        self, listen_host: str, listen_port: int, netns: str, target_host: str, target_port: int
    ) -> None:
        self.listen_host = listen_host
        self.listen_port = listen_port
        self.netns = netns
        self.target = (target_host, target_port)
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def url(self) -> str:
        host = f"[{self.listen_host}]" if ":" in self.listen_host else self.listen_host
        return f"http://{host}:{self.listen_port}"

    async def start(self) -> None:
        """Listen; an OSError (port taken, say) says which address."""
        try:
            self._server = await asyncio.start_server(
                self._serve, self.listen_host, self.listen_port
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"cannot listen on {self.listen_host}:{self.listen_port}: {exc.strerror}"
            ) from exc
        if self.listen_port == 0:
            self.listen_port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

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

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        try:
            await self._relay(reader, writer)
        except asyncio.CancelledError:
            pass
        finally:
            self._tasks.discard(task)
            writer.close()

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        sock = await asyncio.to_thread(
            in_netns, self.netns, lambda: socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        )
        sock.setblocking(False)
        try:
            async with asyncio.timeout(CONNECT_TIMEOUT_S):
                await loop.sock_connect(sock, self.target)
        except (OSError, TimeoutError) as exc:
            sock.close()
            log.warning("forward to %s:%s in %s failed: %r", *self.target, self.netns, exc)
            return
        target_reader, target_writer = await asyncio.open_connection(sock=sock)
        try:
            await asyncio.gather(_copy(reader, target_writer), _copy(target_reader, writer))
        finally:
            target_writer.close()


async def _copy(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
    """Copy until end of stream, then half-close ``sink``; a reset on either side closes
    ``sink``, which ends the other direction too."""
    try:
        while data := await source.read(COPY_CHUNK):
            sink.write(data)
            await sink.drain()
        if sink.can_write_eof():
            sink.write_eof()
    except ConnectionError:
        sink.close()
