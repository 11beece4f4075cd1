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
from tests.fakes import LoggingEngine


def test_checks_note_health_and_log_panic_routing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="pdproxy")

    async def scenario() -> None:
        async with LoggingEngine() as d0, LoggingEngine() as d1:
            await check(d0, d1)

    async def check(d0: LoggingEngine, d1: LoggingEngine) -> None:
        registry = WorkerRegistry.empty()
        registry.add("decode", d0.url)
        registry.add("decode", d1.url)
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

    asyncio.run(scenario())
    said = [r.getMessage() for r in caplog.records]
    assert sum("is now unhealthy" in m for m in said) == 2  # d0, then d1
    assert "every decode worker fails its health check: routing to them anyway" in said
    assert "a decode worker passes its health check again: panic routing off" in said
