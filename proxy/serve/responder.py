"""The client's side of a response: sending it (`Responder`, which knows whether it has
started), reading the request body within its limit, and the ASGI types of the edge."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

from proxy.errors import PayloadTooLarge, ProxyError, TooManyRequests
from proxy.flow.relay import sse_error_event

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

JSON = b"application/json"
SSE = b"text/event-stream"


class Responder:
    """Sends the client's response; knows whether it has started."""

    __slots__ = ("_send", "complete", "failure", "request_id", "started", "status")

    def __init__(self, send: Send, request_id: str) -> None:
        self._send = send
        self.request_id = request_id
        self.failure: str | None = None  # the error message the client got
        self.started = False
        self.complete = False  # the last byte was handed to the server
        self.status = 0

    def _headers(self, content_type: bytes, length: int | None) -> list[tuple[bytes, bytes]]:
        headers = [(b"content-type", content_type), (b"x-request-id", self.request_id.encode())]
        if length is None:
            headers.append((b"cache-control", b"no-cache"))
        else:
            headers.append((b"content-length", str(length).encode()))
        return headers

    async def whole(self, status: int, body: bytes, content_type: bytes = JSON) -> None:
        self.started = True
        self.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._headers(content_type, len(body)),
            }
        )
        self.complete = True
        await self._send({"type": "http.response.body", "body": body})

    async def start_stream(self) -> None:
        await self.start(200, SSE, None)

    async def start(self, status: int, content_type: bytes, length: int | None) -> None:
        """Start a response whose body follows in `chunk`s and `end`."""
        self.started = True
        self.status = status
        await self._send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": self._headers(content_type, length),
            }
        )

    async def chunk(self, data: bytes) -> None:
        await self._send({"type": "http.response.body", "body": data, "more_body": True})

    async def end(self, data: bytes = b"") -> None:
        self.complete = True
        await self._send({"type": "http.response.body", "body": data})

    async def error(self, exc: ProxyError) -> None:
        self.failure = exc.message
        if self.started:
            await self.end(sse_error_event(exc.body()))
            return
        body = exc.body()
        self.started = True
        self.status = exc.status
        headers = self._headers(JSON, len(body))
        if isinstance(exc, TooManyRequests):
            headers.append((b"retry-after", str(exc.retry_after).encode()))
        await self._send({"type": "http.response.start", "status": exc.status, "headers": headers})
        self.complete = True
        await self._send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive, scope: Scope, limit: int) -> bytes:
    for name, value in scope["headers"]:
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise asyncio.CancelledError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than the limit of {limit} bytes")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def request_header(scope: Scope, wanted: bytes) -> bytes | None:
    for name, value in scope["headers"]:
        if name == wanted:
            return bytes(value)
    return None
