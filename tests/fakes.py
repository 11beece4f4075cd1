"""A minimal engine for tests that need only what the proxy's HTTP client sends: a real
HTTP/1.1 server on a real socket that logs the path of every request and answers each with
`status` and `body`, after `delay` seconds (settable while it runs)."""

from __future__ import annotations

import asyncio


class LoggingEngine:
    def __init__(self, body: bytes = b"", status: int = 200, delay: float = 0.0) -> None:
        self.body = body
        self.status = status
        self.delay = delay
        self.log: list[str] = []
        self.url = ""
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def __aenter__(self) -> LoggingEngine:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.url = f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.append(writer)
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                self.log.append(head.split(b" ", 2)[1].decode())
                await asyncio.sleep(self.delay)
                writer.write(
                    b"HTTP/1.1 %d X\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                    % (self.status, len(self.body), self.body)
                )
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
