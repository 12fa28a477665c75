"""A site's uplink that a test can cut: a TCP relay on loopback between the site and the hub.

Cut, it behaves like a dead uplink behind NAT rather than a refusing hub: connections
are accepted and bytes are swallowed, nothing comes back, and open connections go
silent, so the site sees timeouts, not errors.
"""

from __future__ import annotations

import asyncio
import contextlib


class Uplink:
    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.cut = False
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self._server is not None:
            self._server.close()
        for writer in list(self._writers):
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def sever(self) -> None:
        """Cut the uplink: from now on nothing goes through, in either direction."""
        self.cut = True

    def heal(self) -> None:
        """Restore the uplink for new connections; the ones open during the cut stay dead."""
        self.cut = False

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            if self.cut:
                await self._swallow(reader)
                return
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            self._writers.add(up_writer)
            born_cut = asyncio.Event()
            pumps = [
                asyncio.create_task(self._pump(reader, up_writer, born_cut)),
                asyncio.create_task(self._pump(up_reader, writer, born_cut)),
            ]
            self._tasks.update(pumps)
            await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
            for pump in pumps:
                pump.cancel()
            self._tasks.difference_update(pumps)
            up_writer.close()
        except OSError:
            pass
        finally:
            if not self.cut:
                writer.close()

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, dead: asyncio.Event
    ) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                return
            if self.cut or dead.is_set():
                dead.set()  # a connection that saw the cut never carries bytes again
                await self._swallow(reader)
                return
            writer.write(data)
            with contextlib.suppress(ConnectionError):
                await writer.drain()

    @staticmethod
    async def _swallow(reader: asyncio.StreamReader) -> None:
        with contextlib.suppress(ConnectionError):
            while await reader.read(65536):
                pass
