"""The engine client against scripted HTTP servers on real sockets: keep-alive, framing, streaming,
flow control, and every failure translated into the proxy's errors."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from proxy.control.workers import Worker
from proxy.engines.client import EngineClient
from proxy.errors import UpstreamError, UpstreamRejected, UpstreamTimeout

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def run(handler: Handler, scenario: Callable[[EngineClient, Worker], Awaitable[Any]]) -> Any:
    """Serve `handler` on 127.0.0.1 and run `scenario` with a client pointed at it."""

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await handler(reader, writer)
        finally:
            writer.close()

    async def main() -> Any:
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = EngineClient(connect_timeout=2.0, api_key="engine-key")
        await client.start()
        try:
            return await scenario(client, Worker("decode", "d0", f"http://127.0.0.1:{port}"))
        finally:
            await client.close()
            server.close()
            await server.wait_closed()

    return asyncio.run(main())


async def read_request(reader: asyncio.StreamReader) -> tuple[bytes, dict[bytes, bytes], bytes]:
    """One request: its request line, headers (lower-cased names) and body."""
    head = await reader.readuntil(b"\r\n\r\n")
    line, *lines = head[:-4].split(b"\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (h.partition(b":") for h in lines)}
    body = await reader.readexactly(int(headers.get(b"content-length", b"0")))
    return line, headers, body


def response(status: int, body: bytes, *extra: bytes) -> bytes:
    head = [b"HTTP/1.1 %d X" % status, b"content-length: %d" % len(body), *extra]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def chunked(*parts: bytes) -> bytes:
    head = (
        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
    )
    return head + b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def test_post_sends_the_request_and_reuses_the_connection() -> None:
    seen: list[tuple[bytes, dict[bytes, bytes], bytes]] = []
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while not reader.at_eof():
            try:
                seen.append(await read_request(reader))
            except asyncio.IncompleteReadError:
                break
            writer.write(response(200, b'{"ok":%d}' % len(seen)))
        writer.close()

    async def scenario(client: EngineClient, worker: Worker) -> list[bytes]:
        return [
            await client.call(worker, "/v1/completions", b'{"a":1}', f"rid-{i}", 5, "prefill")
            for i in range(3)
        ]

    assert run(handler, scenario) == [b'{"ok":1}', b'{"ok":2}', b'{"ok":3}']
    assert connections == 1
    line, headers, body = seen[0]
    assert line == b"POST /v1/completions HTTP/1.1"
    assert headers[b"x-request-id"] == b"rid-0" and seen[2][1][b"x-request-id"] == b"rid-2"
    assert headers[b"authorization"] == b"Bearer engine-key"
    assert headers[b"content-type"] == b"application/json" and body == b'{"a":1}'
    assert headers[b"host"].startswith(b"127.0.0.1:")


def test_an_idle_connection_the_engine_closed_is_replaced_without_failing() -> None:
    """The engine drops a kept-alive connection just as the next request is written: the
    request goes out again on a new connection (the engine never saw it)."""
    connections = 0

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        await read_request(reader)
        writer.write(response(200, b"{}"))
        await writer.drain()
        await reader.read(1)  # the next request arrives: close without answering
        writer.close()

    async def scenario(client: EngineClient, worker: Worker) -> list[bytes]:
        return [await client.call(worker, "/p", b"{}", "r", 5, "prefill") for _ in range(3)]

    assert run(handler, scenario) == [b"{}"] * 3
    assert connections == 3


def test_a_stream_yields_bytes_as_they_come_and_ends_cleanly() -> None:
    async def scenario(client: EngineClient, worker: Worker) -> list[bytes]:
        stream, first = await client.open_stream(worker, "/v1/completions", b"{}", "r", 5)
        got = [first]
        while data := await stream.read():
            got.append(data)
        stream.close()
        return got

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        head, _, _ = chunked().partition(b"\r\n\r\n")
        writer.write(head + b"\r\n\r\n")
        for event in (b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"):
            writer.write(b"%x\r\n%s\r\n" % (len(event), event))
            await writer.drain()
            await asyncio.sleep(0.02)
        writer.write(b"0\r\n\r\n")
        await writer.drain()
        await reader.read()

    got = run(handler, scenario)
    assert b"".join(got) == b"data: 1\n\ndata: 2\n\ndata: [DONE]\n\n"
    assert len(got) >= 3  # relayed as they came, not gathered


def test_a_large_answer_for_a_slow_reader_pauses_and_resumes_reading() -> None:
    payload = bytes(range(256)) * 8192  # 2 MiB, well over the read buffer limit

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked(*(payload[i : i + 65536] for i in range(0, len(payload), 65536))))
        await writer.drain()
        await reader.read()

    async def scenario(client: EngineClient, worker: Worker) -> bytes:
        stream, first = await client.open_stream(worker, "/s", b"{}", "r", 5)
        parts = [first]
        while data := await stream.read():
            parts.append(data)
            await asyncio.sleep(0.001)
        stream.close()
        return b"".join(parts)

    assert run(handler, scenario) == payload


def test_a_body_without_length_ends_when_the_engine_closes() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nconnection: close\r\n\r\nall of it")
        await writer.drain()
        writer.close()

    async def scenario(client: EngineClient, worker: Worker) -> tuple[int, bytes]:
        return await client.get(worker, "/metrics", 5)

    assert run(handler, scenario) == (200, b"all of it")


def test_closing_a_stream_early_closes_its_connection() -> None:
    """How the engine learns that the client left: its connection closes."""

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(chunked(b"data: 1\n\n")[:-5])  # the stream goes on...
        await writer.drain()
        closed.append(await reader.read() == b"")

    closed: list[bool] = []

    async def scenario(client: EngineClient, worker: Worker) -> None:
        stream, _ = await client.open_stream(worker, "/s", b"{}", "r", 5)
        stream.close()
        for _ in range(100):
            if closed:
                return
            await asyncio.sleep(0.01)

    run(handler, scenario)
    assert closed == [True]


def test_engine_statuses_become_the_proxys_errors() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while True:
            try:
                line, _, _ = await read_request(reader)
            except asyncio.IncompleteReadError:
                return
            if b"/bad" in line:
                writer.write(response(400, b'{"error":{"message":"max_tokens is too large"}}'))
            else:
                writer.write(response(503, b"overloaded"))

    async def scenario(client: EngineClient, worker: Worker) -> list[BaseException]:
        errors: list[BaseException] = []
        for path in ("/bad", "/down"):
            try:
                await client.open_stream(worker, path, b"{}", "r", 5)
            except (UpstreamRejected, UpstreamError) as exc:
                errors.append(exc)
        return errors

    rejected, failed = run(handler, scenario)
    assert isinstance(rejected, UpstreamRejected) and rejected.status == 400
    assert b"max_tokens is too large" in rejected.body()
    assert isinstance(failed, UpstreamError) and "answered 503: overloaded" in failed.message


@pytest.mark.parametrize(
    ("reply", "expected"),
    [
        (b"HTTP/1.1 200 OK\r\ncontent-length: 100\r\n\r\nshort", "closed the connection early"),
        (chunked(b"data: 1\n\n")[:-10], "closed the connection early"),
        (b"SSH-2.0-OpenSSH_9.6\r\n\r\n", "invalid HTTP response"),
        (b"", "closed the connection early"),
    ],
    ids=["truncated-length", "truncated-chunked", "not-http", "closed-at-once"],
)
def test_broken_answers_are_upstream_errors(reply: bytes, expected: str) -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        writer.write(reply)
        await writer.drain()
        writer.close()

    async def scenario(client: EngineClient, worker: Worker) -> str:
        with pytest.raises(UpstreamError) as info:
            await client.call(worker, "/p", b"{}", "r", 5, "prefill")
        return info.value.message

    message = run(handler, scenario)
    assert expected in message and "decode worker http://127.0.0.1:" in message


def test_no_answer_in_time_is_a_timeout_and_a_refused_port_a_connect_error() -> None:
    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_request(reader)
        await asyncio.sleep(5)

    async def scenario(client: EngineClient, worker: Worker) -> tuple[str, str]:
        with pytest.raises(UpstreamTimeout) as slow:
            await client.call(worker, "/p", b"{}", "r", 0.2, "prefill")
        gone = Worker("prefill", "p1", "http://127.0.0.1:1")
        with pytest.raises(UpstreamError) as refused:
            await client.get(gone, "/health", 2)
        return slow.value.message, refused.value.message

    slow, refused = run(handler, scenario)
    assert "did not answer in time" in slow
    assert "GET /health: cannot connect to prefill worker http://127.0.0.1:1" in refused


def test_a_forgotten_engine_keeps_no_connection() -> None:
    connections = 0
    closed = asyncio.Event()

    async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal connections
        connections += 1
        while True:
            try:
                await read_request(reader)
            except asyncio.IncompleteReadError:
                closed.set()  # the client closed its kept-alive connection
                return
            writer.write(response(200, b"{}"))

    async def scenario(client: EngineClient, worker: Worker) -> None:
        stream, _ = await client.open_stream(worker, "/v1/completions", b"{}", "r0", 5)
        await client.call(worker, "/v1/completions", b"{}", "r1", 5, "decode")  # a 2nd, now idle
        client.forget(worker.url)  # the idle connection closes at once
        await asyncio.wait_for(closed.wait(), 2)
        closed.clear()
        while await stream.read():
            pass
        stream.close()  # a connection released after the forget is not kept either
        await asyncio.wait_for(closed.wait(), 2)

    run(handler, scenario)
    assert connections == 2
