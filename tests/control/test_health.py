"""Active health checks against real servers on real sockets: each worker's /health noted on
it, and panic routing's turns logged."""

from __future__ import annotations

import asyncio
import logging

import pytest

from proxy.control.health import HealthChecker
from proxy.control.registry import WorkerRegistry
from proxy.control.workers import Health
from proxy.engines.client import EngineClient


class HealthServer:
    """Answers every request with `status` and logs its path."""

    def __init__(self) -> None:
        self.status = 200
        self.log: list[str] = []
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []

    async def start(self) -> str:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self._server.sockets[0].getsockname()[1]}"

    async def stop(self) -> None:
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
                writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\n\r\n" % self.status)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass


def test_checks_note_health_and_log_panic_routing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdproxy")

    async def scenario() -> None:
        d0, d1 = HealthServer(), HealthServer()
        registry = WorkerRegistry.empty()
        registry.add("decode", await d0.start())
        registry.add("decode", await d1.start())
        engine = EngineClient(1.0)
        await engine.start()
        checker = HealthChecker(engine, tuple(registry.pools.values()), 1.0)
        decode = registry.pools["decode"]
        try:
            await checker.check()
            assert [w.health for w in decode.workers] == [Health.HEALTHY] * 2
            assert d0.log == d1.log == ["/health"]
            d0.status = 503
            await checker.check()
            assert [w.health for w in decode.workers] == [Health.UNHEALTHY, Health.HEALTHY]
            d1.status = 500
            await checker.check()
            assert decode.panic
            d0.status = 200
            await checker.check()
            assert not decode.panic
        finally:
            await engine.close()
            await d0.stop()
            await d1.stop()

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert sum("is now unhealthy" in m for m in said) == 2  # d0, then d1
    assert "every decode worker fails its health check: routing to them anyway" in said
    assert "a decode worker passes its health check again: panic routing off" in said
