"""The only module that speaks HTTP to engines.

A small HTTP/1.1 client: each engine call is one write of a pre-built request and, for a stream,
one parser callback per network read (proxy.engines.http1), handed to the relay as the bytes that
came. Connections are kept alive in a pool per engine.

Every transport or timeout failure is translated here, once, into the proxy's error tree
(`proxy.errors`); callers never see a socket or parser exception.
"""

from __future__ import annotations

import asyncio
import ssl
import types
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from time import perf_counter
from typing import Any
from urllib.parse import urlsplit

from proxy.control.workers import Worker
from proxy.engines.http1 import BadResponse, ConnectFailed, Connection, ConnectionClosed
from proxy.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    error_message,
    openai_error_body,
)

# An idle connection is used again only for this long. vLLM's server (uvicorn) closes idle
# keep-alive connections after 5 s; reusing one just as it closes would fail the request.
IDLE_REUSE_SECONDS = 4.0


@contextmanager
def engine_errors(worker: Worker, what: str) -> Iterator[None]:
    """Translate transport failures talking to `worker` into ProxyErrors naming it."""
    where = f"{worker.role} worker {worker.url}"
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"{what}: {where} did not answer in time") from None
    except ConnectFailed as exc:
        raise UpstreamError(f"{what}: cannot connect to {where}: {exc}") from None
    except ConnectionClosed as exc:
        raise UpstreamError(f"{what}: {where} closed the connection early ({exc})") from None
    except BadResponse as exc:
        raise UpstreamError(f"{what}: {where} failed: {exc}") from None


class IdleTimeout:
    """Cancels the enclosing task when `last` (a perf_counter reading, set by the reader at each
    chunk) is older than `seconds`.

    Cheaper than an asyncio.timeout per chunk: noting progress is one attribute store, and the
    timer is re-armed only when it fires. Raises TimeoutError on exit when it fired.
    """

    __slots__ = ("_handle", "_loop", "_task", "expired", "last", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self.last = perf_counter()
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def _fire(self) -> None:
        quiet = perf_counter() - self.last
        if quiet >= self.seconds:
            self.expired = True
            assert self._task is not None
            self._task.cancel()
        else:
            self._handle = self._loop.call_later(self.seconds - quiet, self._fire)

    async def __aenter__(self) -> IdleTimeout:
        self._task = asyncio.current_task()
        self.last = perf_counter()
        self._handle = self._loop.call_later(self.seconds, self._fire)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        assert self._handle is not None and self._task is not None
        self._handle.cancel()
        if self.expired and exc_type is asyncio.CancelledError and self._task.uncancel() == 0:
            raise TimeoutError from exc


class _Endpoint:
    """Where one engine listens, and its idle connections (most recently used last)."""

    __slots__ = ("host", "host_header", "idle", "port", "retired", "tls")

    def __init__(self, url: str) -> None:
        self.retired = False  # its worker left: connections close when released
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or ""
        self.port = parts.port or (443 if self.tls else 80)
        self.host_header = parts.netloc.rpartition("@")[2].encode("idna")
        self.idle: list[Connection] = []


class EngineStream:
    """An open streaming response from an engine. Owns its connection: `close()` gives it back,
    and closing before the end tells the engine to abort the request."""

    __slots__ = ("_client", "_conn", "_endpoint", "read")

    def __init__(self, client: EngineClient, endpoint: _Endpoint, conn: Connection) -> None:
        self._client = client
        self._endpoint = endpoint
        self._conn = conn
        # The next bytes from the engine; b"" at the end of the stream. Errors are raw: read
        # inside `engine_errors`. (The connection's own method: no extra frame per chunk.)
        self.read: Callable[[], Awaitable[bytes]] = conn.read

    def close(self) -> None:
        self._client._release(self._endpoint, self._conn)


class EngineClient:
    """HTTP client for vLLM-compatible engines (and the simulated one)."""

    def __init__(self, connect_timeout: float, api_key: str | None = None) -> None:
        self._connect_timeout = connect_timeout
        auth = f"Authorization: Bearer {api_key}\r\n".encode() if api_key else b""
        self._auth = auth
        self._endpoints: dict[str, _Endpoint] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tls: ssl.SSLContext | None = None

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()

    async def close(self) -> None:
        for endpoint in self._endpoints.values():
            for conn in endpoint.idle:
                conn.close()
            endpoint.idle.clear()

    def forget(self, url: str) -> None:
        """The engine at `url` left: close its idle connections (busy ones close on release)."""
        endpoint = self._endpoints.pop(url, None)
        if endpoint is not None:
            endpoint.retired = True
            for conn in endpoint.idle:
                conn.close()
            endpoint.idle.clear()

    def _endpoint(self, worker: Worker) -> _Endpoint:
        endpoint = self._endpoints.get(worker.url)
        if endpoint is None:
            endpoint = self._endpoints[worker.url] = _Endpoint(worker.url)
        return endpoint

    def _request(
        self,
        endpoint: _Endpoint,
        method: bytes,
        path: str,
        body: bytes,
        request_id: str | None,
        content_type: bytes = b"application/json",
    ) -> bytes:
        head = b"%s %s HTTP/1.1\r\nHost: %s\r\n%s" % (
            method,
            path.encode(),
            endpoint.host_header,
            self._auth,
        )
        if request_id is not None:
            head += b"X-Request-Id: %s\r\n" % request_id.encode()
        if method != b"GET":
            head += b"Content-Type: %s\r\nContent-Length: %d\r\n" % (content_type, len(body))
        return head + b"\r\n" + body

    async def _connect(self, endpoint: _Endpoint) -> Connection:
        if self._loop is None:
            raise RuntimeError("EngineClient.start() was not awaited")
        loop = self._loop
        tls: ssl.SSLContext | None = None
        if endpoint.tls:
            tls = self._tls = self._tls or ssl.create_default_context()
        try:
            async with asyncio.timeout(self._connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: Connection(loop), endpoint.host, endpoint.port, ssl=tls
                )
        except TimeoutError:
            raise ConnectFailed(f"no connection within {self._connect_timeout} s") from None
        except OSError as exc:
            raise ConnectFailed(exc.strerror or str(exc)) from None
        return conn

    async def _exchange(self, endpoint: _Endpoint, request: bytes) -> Connection:
        """Send `request` on a kept-alive connection (or a new one) and wait for the answer's
        headers. A kept-alive connection that the engine closed before answering (an idle close
        racing our write) is replaced by a new one, once: the engine never saw the request."""
        idle = endpoint.idle
        now = asyncio.get_running_loop().time()
        while idle:
            conn = idle.pop()
            if conn.closed or now - conn.idle_since > IDLE_REUSE_SECONDS:
                conn.close()
                continue
            try:
                conn.send(request)
                await conn.head()
                return conn
            except ConnectionClosed:
                if conn.received:
                    raise
            except BaseException:
                conn.close()
                raise
        conn = await self._connect(endpoint)
        try:
            conn.send(request)
            await conn.head()
        except BaseException:
            conn.close()
            raise
        return conn

    def _release(self, endpoint: _Endpoint, conn: Connection) -> None:
        if conn.reusable() and not endpoint.retired:
            conn.reset()
            conn.idle_since = asyncio.get_running_loop().time()
            endpoint.idle.append(conn)
        else:
            conn.close()

    async def _raise_for_status(self, conn: Connection, worker: Worker, what: str) -> None:
        if conn.status < 400:
            return
        raw = await conn.read_all()
        body = openai_error_body(conn.status, raw)
        if conn.status < 500:
            raise UpstreamRejected(conn.status, body, error_message(body))
        raise UpstreamError(
            f"{what}: {worker.role} worker {worker.url} answered {conn.status}: "
            f"{error_message(body)}"
        )

    async def call(
        self, worker: Worker, path: str, body: bytes, request_id: str, timeout: float, what: str
    ) -> bytes:
        """POST `body` and return the whole 2xx response body; anything else raises a ProxyError."""
        _, answer = await self._whole(worker, b"POST", path, body, request_id, timeout, what)
        return answer

    async def get(self, worker: Worker, path: str, timeout: float) -> tuple[int, bytes]:
        """GET for health, models and metrics: any status, with its body; transport failures
        raise a ProxyError."""
        return await self._whole(worker, b"GET", path, b"", None, timeout, f"GET {path}")

    async def _whole(
        self,
        worker: Worker,
        method: bytes,
        path: str,
        body: bytes,
        request_id: str | None,
        timeout: float,
        what: str,
    ) -> tuple[int, bytes]:
        """One exchange, its answer read whole. A POST's non-2xx status raises."""
        endpoint = self._endpoint(worker)
        request = self._request(endpoint, method, path, body, request_id)
        conn: Connection | None = None
        try:
            with engine_errors(worker, what):
                async with asyncio.timeout(timeout):
                    conn = await self._exchange(endpoint, request)
                    if method == b"POST":
                        await self._raise_for_status(conn, worker, what)
                    return conn.status, await conn.read_all()
        finally:
            if conn is not None:
                self._release(endpoint, conn)

    async def forward(
        self,
        worker: Worker,
        method: bytes,
        path: str,
        body: bytes,
        content_type: bytes,
        request_id: str,
        first_byte_timeout: float,
    ) -> tuple[EngineStream, int, bytes, bytes | None]:
        """Send a request as the client made it (any method, path and body) and return the open
        answer, whatever its status: the stream, status, content type and content length (None
        when not given). A pass-through: only transport failures raise."""
        what = f"{method.decode()} {path}"
        endpoint = self._endpoint(worker)
        request = self._request(endpoint, method, path, body, request_id, content_type)
        conn: Connection | None = None
        try:
            with engine_errors(worker, what):
                async with asyncio.timeout(first_byte_timeout):
                    conn = await self._exchange(endpoint, request)
        except BaseException:
            if conn is not None:
                self._release(endpoint, conn)
            raise
        stream = EngineStream(self, endpoint, conn)
        return stream, conn.status, conn.content_type, conn.content_length

    async def open_stream(
        self, worker: Worker, path: str, body: bytes, request_id: str, first_byte_timeout: float
    ) -> tuple[EngineStream, bytes]:
        """POST `body`; return the open stream and its first bytes once they arrived.

        The first bytes are awaited here so that a failure before them is still an ordinary
        error response, and the client's response starts only when there is something to send.
        """
        what = "decode"
        endpoint = self._endpoint(worker)
        request = self._request(endpoint, b"POST", path, body, request_id)
        conn: Connection | None = None
        try:
            with engine_errors(worker, what):
                async with asyncio.timeout(first_byte_timeout):
                    conn = await self._exchange(endpoint, request)
                    await self._raise_for_status(conn, worker, what)
                    first = await conn.read()
        except BaseException:
            if conn is not None:
                self._release(endpoint, conn)
            raise
        return EngineStream(self, endpoint, conn), first
