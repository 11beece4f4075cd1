"""One keep-alive HTTP/1.1 connection to an engine, on an asyncio protocol and the httptools
parser (the one uvicorn uses). Its failures are the three exceptions below, which
proxy.engines.client translates, once, into the proxy's error tree."""

from __future__ import annotations

import asyncio
from typing import cast

import httptools

# Stop reading from an engine while this much of its answer waits for a slow client.
READ_BUFFER_LIMIT = 256 * 1024


class ConnectFailed(Exception):
    """The TCP (or TLS) connection to the engine could not be made."""


class ConnectionClosed(Exception):
    """The engine closed the connection before its answer was complete."""


class BadResponse(Exception):
    """The engine's bytes are not valid HTTP."""


class Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection; carries one exchange at a time.

    The parser's callbacks fill `_body` and wake the one reader waiting in `read()`.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._parser = httptools.HttpResponseParser(self)
        self._transport: asyncio.Transport | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._body: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._framed = False  # the body has a length or is chunked (else it ends at EOF)
        self.status = 0
        self.content_type = b""
        self.content_length: bytes | None = None
        self.headers_done = False
        self.complete = False
        self.keep_alive = False
        self.received = False  # any byte of the answer arrived
        self.closed = False
        self.error: Exception | None = None
        self.idle_since = 0.0

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(BadResponse(f"invalid HTTP response ({exc})"))
            self.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.headers_done and not self._framed and not self.complete and exc is None:
            self.complete = True  # a body without length or chunking ends when the server closes
        elif not self.complete:
            reason = f"{type(exc).__name__}: {exc}" if exc else "connection closed"
            self._fail(ConnectionClosed(reason))
        self._wake()

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        lowered = name.lower()
        if lowered == b"content-length" or (
            lowered == b"transfer-encoding" and b"chunked" in value.lower()
        ):
            self._framed = True
        if lowered == b"content-length":
            self.content_length = value
        elif lowered == b"content-type":
            self.content_type = value

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self.headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        self._body.append(body)
        self._buffered += len(body)
        if self._buffered > READ_BUFFER_LIMIT and not self._paused and self._transport:
            self._paused = True
            self._transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()  # only known until the message ends
        self._wake()

    # used by the client (proxy.engines.client)

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _fail(self, exc: Exception) -> None:
        if self.error is None:
            self.error = exc

    async def _wait(self) -> None:
        self._waiter = self._loop.create_future()
        try:
            await self._waiter
        finally:
            self._waiter = None

    def send(self, request: bytes) -> None:
        assert self._transport is not None
        self._transport.write(request)

    async def head(self) -> int:
        """Wait for the status line and headers; return the status."""
        while not self.headers_done:
            if self.error is not None:
                raise self.error
            await self._wait()
        return self.status

    async def read(self) -> bytes:
        """The body bytes received since the last read; b"" once the answer is complete."""
        body = self._body
        while not body:
            if self.complete:
                return b""
            if self.error is not None:
                raise self.error
            waiter = self._waiter = self._loop.create_future()  # (not _wait(): once per chunk)
            try:
                await waiter
            finally:
                self._waiter = None
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self._buffered = 0
        if self._paused and self._transport is not None:
            self._paused = False
            self._transport.resume_reading()
        return data

    async def read_all(self) -> bytes:
        parts = []
        while data := await self.read():
            parts.append(data)
        return b"".join(parts)

    def reusable(self) -> bool:
        return self.complete and self.keep_alive and not self.closed and self.error is None

    def reset(self) -> None:
        """Ready for the next exchange on the same connection."""
        self._parser = httptools.HttpResponseParser(self)
        self._body.clear()
        self._buffered = 0
        self._framed = False
        self.status = 0
        self.content_type = b""
        self.content_length = None
        self.headers_done = self.complete = self.keep_alive = self.received = False

    def close(self) -> None:
        """Close at once; an engine aborts the request whose connection closes."""
        if self._transport is not None and not self.closed:
            self._transport.close()
        self.closed = True
