"""A serving process's paths other than the generation paths, answered by the control process.

The admin API, the console, /metrics, /stats, /health and /v1/models read or change what the
control process owns, so a serving process forwards them, as they came, as HTTP/1.1 over the
control process's private Unix socket (where the control process's uvicorn serves the app's
FastAPI surface), one connection per request (`Connection: close`: these paths are rare), and
streams the answer back as it comes (the console's event stream is one long answer). The client
sees one port; nothing here is on the generation paths.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import httptools

from proxy.errors import NoWorkerAvailable, ProxyError
from proxy.serve.responder import Receive, Responder, Scope, Send, read_body

# not forwarded: they describe the hop, not the request or the answer (the request's length is
# set anew; an answer's body arrives de-chunked, so its length stays where it had one)
HOP_BY_HOP = frozenset((b"connection", b"keep-alive", b"transfer-encoding", b"te", b"upgrade"))
SET_ANEW = HOP_BY_HOP | {b"content-length"}


class _Answer:
    """httptools' callbacks: the status and headers once complete, then the body's pieces."""

    def __init__(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.head = asyncio.Event()  # the headers are complete, or the answer broke off
        self.headers_done = False
        self.error: Exception | None = None
        self.pieces: asyncio.Queue[bytes | None] = asyncio.Queue()

    def on_header(self, name: bytes, value: bytes) -> None:
        if name.lower() not in HOP_BY_HOP:
            self.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        self.headers_done = True
        self.head.set()

    def on_body(self, body: bytes) -> None:
        self.pieces.put_nowait(body)

    def on_message_complete(self) -> None:
        self.pieces.put_nowait(None)


def request_head(scope: Scope, length: int) -> bytes:
    target = scope.get("raw_path") or scope["path"].encode()
    if scope.get("query_string"):
        target += b"?" + scope["query_string"]
    lines = [b"%s %s HTTP/1.1" % (scope["method"].encode(), target)]
    for name, value in scope["headers"]:
        if name.lower() not in SET_ANEW:
            lines.append(name + b": " + value)
    lines += [b"Content-Length: %d" % length, b"Connection: close", b"", b""]
    return b"\r\n".join(lines)


async def forward(path: str, scope: Scope, receive: Receive, send: Send, max_body: int) -> None:
    """Answer this request with the control process's answer, streamed as it comes."""
    out = Responder(send, "")
    try:
        body = await read_body(receive, scope, max_body)
        reader, writer = await _connect(path)
    except ProxyError as exc:
        await out.error(exc)
        return
    try:
        writer.write(request_head(scope, len(body)) + body)
        relay = asyncio.ensure_future(_relay(reader, send, out))
        gone = asyncio.ensure_future(_disconnected(receive))
        await asyncio.wait((relay, gone), return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not relay.done():
            relay.cancel()  # the client left (the console's page was closed)
        with contextlib.suppress(asyncio.CancelledError):
            await relay
    except (ConnectionError, httptools.HttpParserError) as exc:
        if not out.started:
            await out.error(_unavailable(f"its answer broke off: {exc}"))
    finally:
        writer.close()


async def _connect(path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    try:
        return await asyncio.open_unix_connection(path)
    except OSError as exc:
        raise _unavailable(str(exc)) from None


def _unavailable(why: str) -> ProxyError:
    return NoWorkerAvailable(f"the proxy's control process did not answer ({why}); try again")


async def _relay(reader: asyncio.StreamReader, send: Send, out: Responder) -> None:
    answer = _Answer()
    parser = httptools.HttpResponseParser(answer)
    feeding = asyncio.ensure_future(_feed(reader, parser, answer))
    try:
        await answer.head.wait()
        if not answer.headers_done:
            raise ConnectionError(str(answer.error or "closed before the answer's headers"))
        out.started = True
        start: dict[str, Any] = {"type": "http.response.start", "status": parser.get_status_code()}
        await send({**start, "headers": answer.headers})
        while (piece := await answer.pieces.get()) is not None:
            await send({"type": "http.response.body", "body": piece, "more_body": True})
        out.complete = True
        await send({"type": "http.response.body", "body": b""})
    finally:
        feeding.cancel()


async def _feed(
    reader: asyncio.StreamReader, parser: httptools.HttpResponseParser, answer: _Answer
) -> None:
    """Parse the answer until EOF; what breaks it ends the body where it broke."""
    try:
        while data := await reader.read(65536):
            parser.feed_data(data)
    except (ConnectionError, httptools.HttpParserError) as exc:
        answer.error = exc
    finally:
        answer.head.set()
        answer.pieces.put_nowait(None)  # EOF ends the body (a complete one ended it already)


async def _disconnected(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass
