"""The LMCache connector's pieces, in process, over real ZMQ sockets on 127.0.0.1."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import msgspec
import orjson
import pytest
import zmq
import zmq.asyncio

from proxy.config import ConfigError, load_config
from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.engines.connectors.base import Handoff
from proxy.engines.connectors.lmcache import (
    LMCacheConnector,
    disagg_spec,
    first_token_params,
    new_transfer_id,
    prefill_body,
)
from proxy.engines.connectors.lmcache_config import LMCacheConfig, Receiver, resolve_receivers
from proxy.engines.connectors.lmcache_notify import Notifications
from proxy.engines.connectors.lmcache_wire import MalformedNotification, decode, encode
from proxy.errors import UpstreamError
from proxy.request import CHAT, ClientRequest


# The message exactly as LMCache declares and sends it (lmcache/v1/storage_backend/pd_backend.py:
# `class PDMsgBase(msgspec.Struct, tag=True)`, `class ProxyNotif(PDMsgBase): req_id: str`, sent
# as `msgspec.msgpack.encode(ProxyNotif(req_id=...))`).
class PDMsgBase(msgspec.Struct, tag=True):
    pass


class ProxyNotif(PDMsgBase):
    req_id: str


class AllocResponse(PDMsgBase):
    already_sent_indexes: list[int]
    remote_indexes: list[int]


def lmcache_bytes(req_id: str) -> bytes:
    return msgspec.msgpack.encode(ProxyNotif(req_id=req_id))


def test_wire_matches_lmcache_bytes() -> None:
    raw = lmcache_bytes("pdp-lmc-1")
    assert raw == encode("pdp-lmc-1")
    assert msgspec.msgpack.decode(raw) == {"type": "ProxyNotif", "req_id": "pdp-lmc-1"}
    assert decode(raw) == "pdp-lmc-1"


@pytest.mark.parametrize(
    "raw",
    [
        b"",
        b"\xc1",
        msgspec.msgpack.encode({"req_id": "no tag"}),
        msgspec.msgpack.encode(AllocResponse(already_sent_indexes=[], remote_indexes=[1])),
        msgspec.msgpack.encode({"type": "ProxyNotif", "req_id": 7}),
    ],
)
def test_wire_rejects_other_messages(raw: bytes) -> None:
    with pytest.raises(MalformedNotification):
        decode(raw)


def run(main: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(main())  # type: ignore[arg-type]


class Pusher:
    """A prefiller TP rank's PUSH socket, connected as LMCache connects it."""

    def __init__(self, port: int) -> None:
        self.context = zmq.asyncio.Context()
        self.socket = self.context.socket(zmq.PUSH)
        self.socket.setsockopt(zmq.LINGER, 0)
        self.socket.connect(f"tcp://127.0.0.1:{port}")

    async def send(self, raw: bytes) -> None:
        await self.socket.send(raw)

    def close(self) -> None:
        self.socket.close(linger=0)
        self.context.term()


async def settle(notes: Notifications, received: float, timeout: float = 3.0) -> None:
    """Wait until the channel has routed `received` messages in all."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while sum(_counts(notes).values()) < received:
        assert loop.time() < deadline, _counts(notes)
        await asyncio.sleep(0.01)


def _counts(notes: Notifications) -> dict[str, float]:
    out: dict[str, float] = {}
    for metric in notes.metrics.received.collect():
        for sample in metric.samples:
            if sample.name.endswith("_total"):
                out[sample.labels["result"]] = sample.value
    return out


def test_notifications_route_count_and_forget() -> None:
    async def main() -> None:
        notes = Notifications("127.0.0.1", 0, late_memory=2, registry=None)
        await notes.start()
        pusher = Pusher(notes.port)
        try:
            with notes.expect("a", 2) as waiter:
                await pusher.send(lmcache_bytes("a"))
                await settle(notes, 1)
                assert not waiter.complete
                await pusher.send(lmcache_bytes("a"))
                async with asyncio.timeout(3):
                    await waiter.wait()
                await pusher.send(lmcache_bytes("a"))  # a third rank's: extra, harmless
                await settle(notes, 3)
            assert notes.waiting == 0 and notes.remembered == 0  # complete: nothing kept
            await pusher.send(lmcache_bytes("nobody"))
            await pusher.send(b"garbage")
            await settle(notes, 5)
            assert _counts(notes) == {"matched": 2, "extra": 1, "unknown": 1, "malformed": 1}
        finally:
            pusher.close()
            await notes.close()

    run(main)


def test_waiters_leave_on_every_path_and_late_ids_are_bounded() -> None:
    async def main() -> None:
        notes = Notifications("127.0.0.1", 0, late_memory=2, registry=None)
        await notes.start()
        pusher = Pusher(notes.port)
        try:
            for req_id in ("t1", "t2", "t3"):  # each times out: remembered, at most 2
                with notes.expect(req_id, 1) as waiter, pytest.raises(TimeoutError):
                    async with asyncio.timeout(0.05):
                        await waiter.wait()
            assert notes.waiting == 0 and notes.remembered == 2

            async def abandoned() -> None:
                with notes.expect("gone", 1) as waiter:
                    await waiter.wait()

            task = asyncio.create_task(abandoned())  # the client leaves: cancelled
            await asyncio.sleep(0.05)
            assert notes.waiting == 1
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert notes.waiting == 0 and notes.remembered == 2
            for req_id in ("gone", "t3", "t1"):
                await pusher.send(lmcache_bytes(req_id))
            await settle(notes, 3)
            assert _counts(notes) == {"late": 2, "unknown": 1}  # t1 was forgotten
            with notes.expect("dup", 1), pytest.raises(ValueError), notes.expect("dup", 1):
                pass
            assert notes.waiting == 0
        finally:
            pusher.close()
            await notes.close()

    run(main)


def test_port_in_use_is_a_clear_error() -> None:
    async def main() -> None:
        first = Notifications("127.0.0.1", 0, 8, None)
        await first.start()
        try:
            second = Notifications("127.0.0.1", first.port, 8, None)
            with pytest.raises(OSError, match="notify_port"):
                await second.start()
        finally:
            await first.close()

    run(main)


def chat_request(**extra: Any) -> ClientRequest:
    body = {"model": "m", "messages": [{"role": "user", "content": "hi"}], **extra}
    return ClientRequest(CHAT, body, "rid-1", bool(extra.get("stream")), False, 2)


def test_prefill_body_is_lmcache_shaped() -> None:
    client = chat_request(
        stream=True,
        stream_options={"include_usage": True},
        max_completion_tokens=300,
        min_tokens=3,
        tools=[{"type": "function", "function": {"name": "f"}}],
        kv_transfer_params={"from": "client"},
    ).body
    spec = disagg_spec("pdp-lmc-x", Receiver("10.0.0.7", (7301, 7302), (7401, 7402)))
    assert prefill_body(client, spec) == {
        "model": "m",
        "messages": [{"role": "user", "content": "hi"}],
        "tools": [{"type": "function", "function": {"name": "f"}}],
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "n": 1,
        "kv_transfer_params": {
            "ret_first_tok": True,
            "disagg_spec": {
                "req_id": "pdp-lmc-x",
                "receiver_host": "10.0.0.7",
                "receiver_init_port": [7301, 7302],
                "receiver_alloc_port": [7401, 7402],
            },
        },
    }
    assert "max_completion_tokens" not in prefill_body({"model": "m", "prompt": "x"}, spec)


def test_transfer_ids_are_random() -> None:
    ids = {new_transfer_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(i.startswith("pdp-lmc-") and len(i) == 40 for i in ids)


def test_first_token_params() -> None:
    worker = Worker("prefill", "p0", "http://p")
    ok = orjson.dumps({"choices": [], "kv_transfer_params": {"first_tok": 42}})
    assert first_token_params(ok, worker) == {"first_tok": 42}
    assert first_token_params(b'{"kv_transfer_params": null}', worker) is None
    assert first_token_params(b"{}", worker) is None
    with pytest.raises(UpstreamError, match="not JSON"):
        first_token_params(b"<html>", worker)


def test_decode_body_is_the_clients_own_request() -> None:
    connector = LMCacheConnector(EngineClient(1.0), 1.0, LMCacheConfig())
    request = chat_request(stream=True, kv_transfer_params={"x": 1}, tools=[{"type": "function"}])
    body = orjson.loads(connector.decode_body(request, Handoff({"first_tok": 5})))
    assert body == {k: v for k, v in request.body.items() if k != "kv_transfer_params"}
    assert body["stream"] is True and body["tools"] == [{"type": "function"}]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "proxy.yaml"
    path.write_text(text)
    return path


def test_config_defaults_follow_lmcache_convention(tmp_path: Path) -> None:
    cfg = load_config(
        write(
            tmp_path,
            "connector: lmcache\nprefill: [http://p:1]\n"
            "decode: [http://d0:2, http://d1:2, {url: 'http://d2:2', lmcache: "
            "{host: 10.1.1.1, init_ports: [7600, 7601], alloc_ports: [7700, 7701]}}]\n",
        )
    )
    assert cfg.connector == "lmcache"
    assert cfg.lmcache == LMCacheConfig()
    assert (cfg.lmcache.notify_host, cfg.lmcache.notify_port) == ("127.0.0.1", 7500)
    assert cfg.lmcache.on_timeout == "error"
    receivers = resolve_receivers([(w.url, w.lmcache) for w in cfg.decode])
    assert receivers == [
        Receiver("d0", (7300,), (7400,)),
        Receiver("d1", (7301,), (7401,)),
        Receiver("10.1.1.1", (7600, 7601), (7700, 7701)),
    ]
    assert [r.tp for r in receivers] == [1, 1, 2]


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            "decode: [{url: 'http://d:1', lmcache: {init_ports: [1, 2], alloc_ports: [3]}}]",
            "one port per decoder TP rank",
        ),
        ("decode: [{url: 'http://d:1', lmcache: {init_ports: [7300]}}]", "both init_ports"),
        (
            "decode: [http://d:1, {url: 'http://d:2', lmcache: {init_ports: [7300], "
            "alloc_ports: [7999]}}]",
            "used twice",
        ),
        ("decode: [http://d:1]\nprefill: [{url: 'http://p:1', lmcache: {}}]", "decode workers"),
        ("decode: [http://d:1]\nlmcache: {on_timeout: retry}", "on_timeout"),
        ("decode: [http://d:1]\nlmcache: {notify_timeout: 0}", "notify_timeout"),
    ],
)
def test_config_errors_say_what_to_change(tmp_path: Path, text: str, words: str) -> None:
    if "prefill:" not in text:
        text += "\nprefill: [http://p:1]"
    with pytest.raises(ConfigError, match=words):
        load_config(write(tmp_path, "connector: lmcache\n" + text))


def test_nixl_stays_the_default_and_ignores_lmcache_ports(tmp_path: Path) -> None:
    cfg = load_config(
        write(tmp_path, "prefill: [http://p:1]\ndecode: [http://d:1, http://d:2]\n"),
    )
    assert cfg.connector == "nixl"


def test_serve_flag_selects_lmcache_with_lmcache_defaults() -> None:
    import argparse

    from proxy.cli.main import _serve_args, config_from_args

    parser = argparse.ArgumentParser()
    _serve_args(parser)
    args = parser.parse_args(
        [
            *("--connector", "lmcache", "--prefill", "http://p:1"),
            *("--decode", "http://d:1", "--decode", "http://d:2"),
        ]
    )
    cfg = config_from_args(args)
    assert cfg.connector == "lmcache" and cfg.lmcache.notify_port == 7500
    assert resolve_receivers([(w.url, w.lmcache) for w in cfg.decode]) == [
        Receiver("d", (7300,), (7400,)),
        Receiver("d", (7301,), (7401,)),
    ]


def test_notification_before_the_prefill_answer_is_not_lost() -> None:
    """Real LMCache may notify before its HTTP answer: the waiter exists before the request."""
    from aiohttp import web

    async def main() -> None:
        pusher: Pusher | None = None

        async def prefill(request: web.Request) -> web.Response:
            body = orjson.loads(await request.read())
            assert pusher is not None
            await pusher.send(lmcache_bytes(body["kv_transfer_params"]["disagg_spec"]["req_id"]))
            await asyncio.sleep(0.2)  # the notification is routed while we still answer
            return web.json_response({"choices": [], "kv_transfer_params": {"first_tok": 9}})

        app = web.Application()
        app.router.add_post("/v1/chat/completions", prefill)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        engine = EngineClient(1.0)
        await engine.start()
        config = LMCacheConfig(notify_port=0, notify_timeout=0.5)
        connector = LMCacheConnector(engine, 5.0, config)
        await connector.start()
        pusher = Pusher(connector.notifications.port)
        try:
            prefiller = Worker("prefill", "p0", f"http://127.0.0.1:{port}")
            decoder = Worker("decode", "d0", "http://127.0.0.1:1", Receiver("h", (1,), (2,)))
            handoff = await connector.prefill(chat_request(), prefiller, decoder)
            assert handoff == Handoff({"first_tok": 9})
            assert connector.notifications.waiting == 0
            assert connector.notifications.remembered == 0
        finally:
            pusher.close()
            await connector.close()
            await engine.close()
            await runner.cleanup()

    run(main)
