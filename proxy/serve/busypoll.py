"""Busy polling: a serving process's event loop polls instead of sleeping while it has requests.

An idle core halts until an interrupt wakes it. On bare metal that costs microseconds; on a
virtual machine, where a halted vCPU goes back to the host's scheduler, waking it costs tens to
hundreds of microseconds, and the proxy sleeps several times on each request's way to its first
token (for the request, for the prefill's answer, for the decoder's first event). Measured on a
16-core GPU host (a microVM) with simulated engines at an H200's timing, concurrency 1: the proxy
added about 0.85 ms p50 over a client that drives both legs itself; with its core kept awake, 0.14
to 0.39 ms (README: The proxy's own cost on a GPU host).

`BusyPoll` wraps the ASGI app: while a request is in flight, and for `linger` seconds after the
last one ends, a callback puts itself back on the loop's ready queue, so that the loop polls its
sockets with a zero timeout instead of blocking. That costs the process's core while it polls
(100 % of it at concurrency 1; next to nothing under load, where the loop rarely blocks anyway);
off by default (config `busy_poll`, `--busy-poll SECONDS`).
"""

from __future__ import annotations

import asyncio
from typing import Any

from proxy.config import ProxyConfig

ASGIApp = Any


class BusyPoll:
    """The ASGI app `app`, whose event loop polls while HTTP requests are in flight and for
    `linger` seconds after the last one."""

    def __init__(self, app: ASGIApp, linger: float) -> None:
        self.app = app
        self.linger = linger
        self.in_flight = 0
        self.polls = 0  # the times the loop came round while polling (tests, debugging)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._polling = False
        self._last_end = 0.0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self.in_flight += 1
        if not self._polling:
            self._loop = self._loop or asyncio.get_running_loop()
            self._polling = True
            self._loop.call_soon(self._poll)
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1
            if not self.in_flight and self._loop is not None:
                self._last_end = self._loop.time()

    def _poll(self) -> None:
        loop = self._loop
        assert loop is not None
        self.polls += 1
        if self.in_flight or loop.time() - self._last_end < self.linger:
            loop.call_soon(self._poll)
        else:
            self._polling = False


def polling(app: ASGIApp, config: ProxyConfig) -> ASGIApp:
    """`app` as a process that serves clients runs it: wrapped in BusyPoll when the config asks."""
    return app if config.busy_poll is None else BusyPoll(app, config.busy_poll)
