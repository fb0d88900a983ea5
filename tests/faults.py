"""A small TCP proxy between the broker and OpenBao, to add delay, stall or cut connections.

Besides ``delay`` and ``cut``/``heal``, a test can ``hold`` every byte (OpenBao then looks
fully stalled: requests reach the proxy but never OpenBao, answers never come back) and
``release`` them, and can wait for ``request_seen(path)``: an event set as soon as the head of
a request for that path reaches the proxy from the broker (held or not). Together they put a
fault at an exact point ("the create call is on the wire") instead of after a guessed sleep.
"""

from __future__ import annotations

import asyncio
import contextlib


class TcpProxy:
    def __init__(self, target_host: str, target_port: int) -> None:
        self._target = (target_host, target_port)
        self._server: asyncio.AbstractServer | None = None
        self._writers: set[asyncio.StreamWriter] = set()
        self._pipes: set[asyncio.Task[None]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self._watches: list[tuple[bytes, asyncio.Event]] = []
        self.cut_off = False
        self.delay = 0.0
        self.port = 0

    @property
    def address(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        """Drop every open connection (held bytes included) and refuse new ones until ``heal``."""
        self.cut_off = True
        for writer in list(self._writers):
            writer.close()
        self._writers.clear()
        for pipe in list(self._pipes):
            pipe.cancel()

    def heal(self) -> None:
        self.cut_off = False

    def hold(self) -> None:
        """From now on no byte passes either way (connections stay open) until ``release``."""
        self._flowing.clear()

    def release(self) -> None:
        """Let every held byte through, in order, and stop holding."""
        self._flowing.set()

    @property
    def held(self) -> bool:
        return not self._flowing.is_set()

    def request_seen(self, path: str) -> asyncio.Event:
        """An event set when bytes of a request line for ``path`` (a prefix, e.g.
        ``/v1/auth/token/create``) next reach the proxy from the broker's side."""
        event = asyncio.Event()
        self._watches.append((path.encode(), event))
        return event

    def _watch(self, tail: bytes, data: bytes) -> None:
        for needle, event in list(self._watches):
            if needle in tail + data and needle not in tail:  # new bytes, not ones seen before
                event.set()
                self._watches.remove((needle, event))

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.cut_off:
            writer.close()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self._target)
        except OSError:
            writer.close()
            return
        self._writers.update((writer, up_writer))
        pipes = [asyncio.create_task(self._pipe(reader, up_writer, upstream=True)),
                 asyncio.create_task(self._pipe(up_reader, writer, upstream=False))]
        self._pipes.update(pipes)
        await asyncio.gather(*pipes, return_exceptions=True)
        self._pipes.difference_update(pipes)
        for w in (writer, up_writer):
            self._writers.discard(w)
            w.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, *, upstream: bool) -> None:
        tail = b""  # the end of the previous chunk, so a path split across two reads still matches
        with contextlib.suppress(ConnectionError, OSError):
            while not reader.at_eof():
                data = await reader.read(65536)
                if not data:
                    break
                if upstream and self._watches:
                    self._watch(tail, data)
                    tail = data[-256:]
                if self.delay:
                    await asyncio.sleep(self.delay)
                await self._flowing.wait()
                if self.cut_off:
                    break
                writer.write(data)
                await writer.drain()
        writer.close()
