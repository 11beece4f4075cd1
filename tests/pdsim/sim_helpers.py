"""Helpers for simulator tests: run a coroutine against fresh servers on real sockets."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
import orjson
import zmq
import zmq.asyncio

from pdsim import SimConfig, SimServer, Timing, start_sim

T = TypeVar("T")
FAST = Timing(speed_factor=0.0)


def config(**kw: Any) -> SimConfig:
    kw.setdefault("timing", FAST)
    kw.setdefault("eos_probability", 0.0)
    return SimConfig(port=0, side_channel_port=0, **kw)


def run_with(
    configs: list[SimConfig],
    body: Callable[[list[SimServer], aiohttp.ClientSession], Awaitable[T]],
) -> T:
    """Start one server per config, run ``body``, and close everything."""

    async def main() -> T:
        servers: list[SimServer] = []
        try:
            for c in configs:
                servers.append(await start_sim(c))
            async with aiohttp.ClientSession() as session:
                return await body(servers, session)
        finally:
            for s in servers:
                await s.close()

    return asyncio.run(main())


def _json_headers(headers: dict[str, str] | None) -> dict[str, str]:
    """vLLM (and the sim) accept only application/json bodies."""
    return {"Content-Type": "application/json", **(headers or {})}


async def post(
    session: aiohttp.ClientSession,
    url: str,
    body: Any,
    headers: dict[str, str] | None = None,
) -> tuple[int, Any]:
    async with session.post(url, data=orjson.dumps(body), headers=_json_headers(headers)) as resp:
        raw = await resp.read()
        try:
            return resp.status, orjson.loads(raw)
        except orjson.JSONDecodeError:
            return resp.status, raw


async def stream_events(
    session: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str] | None = None
) -> list[Any]:
    """All SSE data payloads (parsed JSON, or the raw string such as ``[DONE]``)."""
    events: list[Any] = []
    async with session.post(url, data=orjson.dumps(body), headers=_json_headers(headers)) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        async for line in resp.content:
            text = line.decode().strip()
            if not text.startswith("data: "):
                continue
            data = text[6:]
            events.append(data if data == "[DONE]" else orjson.loads(data))
    return events


async def metrics(session: aiohttp.ClientSession, server: SimServer) -> dict[str, float]:
    """Metric samples keyed by name plus labels other than engine/model_name."""
    async with session.get(server.url + "/metrics") as resp:
        text = await resp.text()
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name_labels, value = line.rsplit(" ", 1)
        name, _, labels = name_labels.partition("{")
        extra = [
            p for p in labels.rstrip("}").split(",") if not p.startswith(("engine=", "model_name="))
        ]
        key = name + ("{" + ",".join(extra) + "}" if extra else "")
        out[key] = float(value)
    return out


@contextlib.asynccontextmanager
async def notification_socket(port: int) -> AsyncIterator[zmq.asyncio.Socket]:
    """The proxy's end of LMCache's notifications: a ZMQ PULL socket bound on ``port``."""
    context = zmq.asyncio.Context()
    sock = context.socket(zmq.PULL)
    sock.bind(f"tcp://127.0.0.1:{port}")
    try:
        yield sock
    finally:
        sock.close(linger=0)
        context.term()
