"""The only module that speaks HTTP to engines.

One keep-alive connection pool serves all workers. Every aiohttp or timeout exception is translated
here, once, into the proxy's error tree (`proxy.errors`); callers never see an aiohttp type.
"""

from __future__ import annotations

import asyncio
import types
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import aiohttp

from proxy.errors import (
    UpstreamError,
    UpstreamRejected,
    UpstreamTimeout,
    error_message,
    openai_error_body,
)
from proxy.workers import Worker


@contextmanager
def engine_errors(worker: Worker, what: str) -> Iterator[None]:
    """Translate transport failures talking to `worker` into ProxyErrors naming it."""
    where = f"{worker.role} worker {worker.url}"
    try:
        yield
    except TimeoutError:
        raise UpstreamTimeout(f"{what}: {where} did not answer in time") from None
    except aiohttp.ClientConnectorError as exc:
        reason = exc.os_error.strerror or str(exc.os_error)
        raise UpstreamError(f"{what}: cannot connect to {where}: {reason}") from None
    except (aiohttp.ServerDisconnectedError, aiohttp.ClientPayloadError) as exc:
        raise UpstreamError(f"{what}: {where} closed the connection early ({exc})") from None
    except aiohttp.ClientError as exc:
        raise UpstreamError(f"{what}: {where} failed: {exc or type(exc).__name__}") from None


class IdleTimeout:
    """Cancels the enclosing task when `touch()` has not been called for `seconds`.

    Cheaper than an asyncio.timeout per chunk: touching is one clock read, and the timer is
    re-armed only when it fires. Raises TimeoutError on exit when it fired.
    """

    __slots__ = ("_handle", "_loop", "_task", "expired", "last", "seconds")

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.expired = False
        self._loop = asyncio.get_running_loop()
        self.last = self._loop.time()
        self._task: asyncio.Task[Any] | None = None
        self._handle: asyncio.TimerHandle | None = None

    def touch(self) -> None:
        self.last = self._loop.time()

    def _fire(self) -> None:
        due = self.last + self.seconds
        if self._loop.time() >= due:
            self.expired = True
            assert self._task is not None
            self._task.cancel()
        else:
            self._handle = self._loop.call_at(due, self._fire)

    async def __aenter__(self) -> IdleTimeout:
        self._task = asyncio.current_task()
        self.touch()
        self._handle = self._loop.call_at(self.last + self.seconds, self._fire)
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


async def _raise_for_status(resp: aiohttp.ClientResponse, worker: Worker, what: str) -> None:
    if resp.status < 400:
        return
    raw = await resp.read()
    body = openai_error_body(resp.status, raw)
    if resp.status < 500:
        raise UpstreamRejected(resp.status, body, error_message(body))
    raise UpstreamError(
        f"{what}: {worker.role} worker {worker.url} answered {resp.status}: {error_message(body)}"
    )


class EngineStream:
    """An open streaming response from an engine. Owns its connection: `close()` releases it,
    and closing before the end tells the engine to abort the request."""

    __slots__ = ("_resp", "_what", "_worker")

    def __init__(self, resp: aiohttp.ClientResponse, worker: Worker, what: str) -> None:
        self._resp = resp
        self._worker = worker
        self._what = what

    async def read(self) -> bytes:
        """The next bytes from the engine; b"" at the end of the stream."""
        with engine_errors(self._worker, self._what):
            return await self._resp.content.readany()

    def close(self) -> None:
        self._resp.close()


class EngineClient:
    """HTTP client for vLLM-compatible engines (and the simulated one)."""

    def __init__(self, connect_timeout: float, api_key: str | None = None) -> None:
        self._connect_timeout = connect_timeout
        self._headers = {"Content-Type": "application/json"}
        if api_key:
            self._headers["Authorization"] = f"Bearer {api_key}"
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30, ttl_dns_cache=300)
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=self._connect_timeout),
            auto_decompress=False,
            # engines set no cookies and compress nothing: no per-request jar or extra headers
            cookie_jar=aiohttp.DummyCookieJar(),
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding"),
        )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError("EngineClient.start() was not awaited")
        return self._session

    def _request_headers(self, request_id: str) -> dict[str, str]:
        return {**self._headers, "X-Request-Id": request_id}

    async def call(
        self, worker: Worker, path: str, body: bytes, request_id: str, timeout: float, what: str
    ) -> bytes:
        """POST `body` and return the whole 2xx response body; anything else raises a ProxyError."""
        with engine_errors(worker, what):
            async with asyncio.timeout(timeout):
                async with self.session.post(
                    worker.url + path, data=body, headers=self._request_headers(request_id)
                ) as resp:
                    await _raise_for_status(resp, worker, what)
                    return await resp.read()

    async def open_stream(
        self, worker: Worker, path: str, body: bytes, request_id: str, first_byte_timeout: float
    ) -> tuple[EngineStream, bytes]:
        """POST `body`; return the open stream and its first bytes once they arrived.

        The first bytes are awaited here so that a failure before them is still an ordinary
        error response, and the client's response starts only when there is something to send.
        """
        what = "decode"
        resp: aiohttp.ClientResponse | None = None
        try:
            with engine_errors(worker, what):
                async with asyncio.timeout(first_byte_timeout):
                    resp = await self.session.post(
                        worker.url + path, data=body, headers=self._request_headers(request_id)
                    )
                    await _raise_for_status(resp, worker, what)
                    first = await resp.content.readany()
        except BaseException:
            if resp is not None:
                resp.close()
            raise
        return EngineStream(resp, worker, what), first

    async def get(self, worker: Worker, path: str, timeout: float) -> tuple[int, bytes]:
        """GET for health, models and metrics; transport failures raise a ProxyError."""
        with engine_errors(worker, f"GET {path}"):
            async with asyncio.timeout(timeout):
                async with self.session.get(worker.url + path, headers=self._headers) as resp:
                    return resp.status, await resp.read()
