"""A lean zero-delay fake of a vLLM engine for throughput runs: a raw asyncio HTTP/1.1 keep-alive
server (uvloop when importable), one process per core, far cheaper per request than the simulator
(pdsim, on aiohttp), so that a few of them keep up with a proxy spread over many cores.

It answers what a PD proxy and vllm-router send and call:

  POST /v1/chat/completions, /v1/completions
      not streamed (the NIXL prefill leg): one token, `finish_reason` "length", and the
        `kv_transfer_params` a vLLM prefiller returns (`do_remote_prefill`, this engine's id, its
        blocks, host and port), when the request asked for `do_remote_decode`
      streamed (the decode leg): `max_tokens` tokens (64 unless given), each its own OpenAI
        chat-chunk SSE event and HTTP chunk, the last with `finish_reason` "length", then
        `data: [DONE]`; `--writes token` (default) sends each event with its own write, as an
        engine's decode steps do; `--writes burst` sends them in one; with `return_token_ids`
        (pdproxy's decode leg asks for them, for mid-stream migration) the events carry the
        prompt's and each token's ids, as vLLM's do
  GET /health, /v1/models, /version, /metrics (the gauges a load-aware policy scrapes, all 0)
  GET /_lean/count   {"prefill": n, "decode": n, "other": n}: requests answered per leg
  POST /_lean/reset  zeroes the counts

    python benchmarks/leanengine.py --port 8100 [--engine-id ID] [--writes token|burst]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import sys
import time
import uuid
from typing import Any

try:
    import orjson

    def _loads(raw: bytes) -> Any:
        return orjson.loads(raw)

    def _dumps(obj: Any) -> bytes:
        return orjson.dumps(obj)

except ImportError:  # pragma: no cover - the fake runs on a bare Python as well

    def _loads(raw: bytes) -> Any:
        return json.loads(raw)

    def _dumps(obj: Any) -> bytes:
        return json.dumps(obj, separators=(",", ":")).encode()


MODEL = "pdsim/llama-8b"
WORDS = [f" w{i}".encode() for i in range(64)]
STATUS = {200: b"OK", 404: b"Not Found", 400: b"Bad Request", 411: b"Length Required"}


class Engine:
    def __init__(self, engine_id: str, model: str, writes: str, side_port: int) -> None:
        self.engine_id = engine_id
        self.model = model
        self.model_b = model.encode()
        self.burst = writes == "burst"
        self.side_port = side_port
        self.counts = {"prefill": 0, "decode": 0, "other": 0}
        self.created = int(time.time())
        self.seq = 0
        self.models = _dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": model,
                        "object": "model",
                        "created": self.created,
                        "owned_by": "vllm",
                        "root": model,
                        "max_model_len": 16384,
                    }
                ],
            }
        )
        gauges = (
            "vllm:num_requests_running",
            "vllm:num_requests_waiting",
            "vllm:kv_cache_usage_perc",
        )
        self.metrics = "".join(f'{g}{{model_name="{model}"}} 0.0\n' for g in gauges).encode()

    def next_id(self) -> str:
        self.seq += 1
        return f"chatcmpl-{self.engine_id[:8]}{self.seq:x}"

    def completion(self, body: dict[str, Any]) -> bytes:
        rid = self.next_id()
        out: dict[str, Any] = {
            "id": rid,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": " w0"},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
            "usage": {"prompt_tokens": 8, "total_tokens": 9, "completion_tokens": 1},
        }
        params = body.get("kv_transfer_params")
        if isinstance(params, dict) and params.get("do_remote_decode"):
            self.counts["prefill"] += 1
            out["kv_transfer_params"] = {
                "do_remote_prefill": True,
                "do_remote_decode": False,
                "remote_block_ids": [[1]],
                "remote_engine_id": self.engine_id,
                "remote_request_id": f"{rid}-{uuid.uuid4().hex[:8]}",
                "remote_host": "127.0.0.1",
                "remote_port": self.side_port,
                "tp_size": 1,
            }
        else:
            self.counts["other"] += 1
        return _dumps(out)

    def stream(self, body: dict[str, Any]) -> list[bytes]:
        """The HTTP chunks of a streamed answer, the terminating chunk included."""
        self.counts["decode"] += 1
        tokens = body.get("max_completion_tokens") or body.get("max_tokens") or 64
        head = (
            b'data: {"id":"'
            + self.next_id().encode()
            + b'","object":"chat.completion.chunk","created":'
            + str(self.created).encode()
            + b',"model":"'
            + self.model_b
            + b'","choices":[{"index":0,"delta":{'
        )
        # with return_token_ids (which pdproxy's decode leg asks for, to continue an answer
        # elsewhere) vLLM adds the prompt's ids to the first event and each token's to its own
        ids = bool(body.get("return_token_ids"))
        first = b',"token_ids":[]}],"prompt_token_ids":[1,2,3,4,5,6,7,8]}' if ids else b"}]}"
        events = [
            head + b'"role":"assistant","content":""},"logprobs":null,"finish_reason":null' + first
        ]
        for i in range(tokens):
            end = b'"length"' if i == tokens - 1 else b"null"
            word = WORDS[i % len(WORDS)]
            tail = b',"token_ids":[%d]}]}' % (100 + i) if ids else b"}]}"
            events.append(
                head + b'"content":"' + word + b'"},"logprobs":null,"finish_reason":' + end + tail
            )
        events.append(b"data: [DONE]")
        return [b"%x\r\n%s\n\n\r\n" % (len(e) + 2, e) for e in events] + [b"0\r\n\r\n"]


def response(status: int, body: bytes, ctype: bytes = b"application/json") -> bytes:
    return (
        b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
        % (status, STATUS.get(status, b"OK"), ctype, len(body))
        + body
    )


SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream; charset=utf-8\r\n"
    b"Transfer-Encoding: chunked\r\n\r\n"
)


class Conn(asyncio.Protocol):
    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None:
            end = self.buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(self.buf[:end]).split(b"\r\n")
            method, path = lines[0].split(b" ", 2)[:2]
            length, close = 0, False
            for line in lines[1:]:
                key, _, value = line.partition(b":")
                key = key.strip().lower()
                if key == b"content-length":
                    length = int(value)
                elif key == b"transfer-encoding":
                    self.transport.write(response(411, b'{"error":"chunked body"}'))
                    self.transport.close()
                    return
                elif key == b"connection" and value.strip().lower() == b"close":
                    close = True
            if len(self.buf) < end + 4 + length:
                return
            body = bytes(self.buf[end + 4 : end + 4 + length])
            del self.buf[: end + 4 + length]
            self.handle(method, path.split(b"?", 1)[0], body)
            if close:
                self.transport.close()
                return

    def handle(self, method: bytes, path: bytes, raw: bytes) -> None:
        t = self.transport
        assert t is not None
        e = self.engine
        if method == b"POST" and path in (b"/v1/chat/completions", b"/v1/completions"):
            try:
                body = _loads(raw)
            except ValueError:
                t.write(response(400, b'{"error":"bad json"}'))
                return
            if body.get("stream"):
                chunks = e.stream(body)
                if e.burst:
                    t.write(SSE_HEAD + b"".join(chunks))
                else:
                    t.write(SSE_HEAD)
                    for chunk in chunks:
                        t.write(chunk)
            else:
                t.write(response(200, e.completion(body)))
        elif path == b"/health":
            t.write(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
        elif path == b"/v1/models":
            t.write(response(200, e.models))
        elif path == b"/metrics":
            t.write(response(200, e.metrics, b"text/plain; version=0.0.4"))
        elif path == b"/version":
            t.write(response(200, b'{"version":"0.0.0-lean"}'))
        elif path == b"/_lean/count":
            t.write(response(200, _dumps({**e.counts, "pid": os.getpid()})))
        elif path == b"/_lean/reset":
            for key in e.counts:
                e.counts[key] = 0
            t.write(response(200, b"{}"))
        else:
            print(f"lean engine: {method.decode()} {path.decode()}: 404", file=sys.stderr)
            t.write(response(404, b'{"error":"not found"}'))

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


async def serve(args: argparse.Namespace) -> None:
    engine = Engine(args.engine_id or str(uuid.uuid4()), args.model, args.writes, args.side_port)
    loop = asyncio.get_running_loop()
    server = await loop.create_server(
        lambda: Conn(engine), args.host, args.port, backlog=4096, reuse_address=True
    )
    print(f"lean engine {engine.engine_id} on {args.host}:{args.port}", flush=True)
    async with server:
        await server.serve_forever()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--engine-id", default="", help="the NIXL engine id it reports (default: new)")
    p.add_argument("--side-port", type=int, default=5600, help="the remote_port it reports")
    p.add_argument("--model", default=MODEL)
    p.add_argument("--writes", choices=("token", "burst"), default="token")
    args = p.parse_args(argv)
    try:
        import uvloop

        run: Any = uvloop.run
    except ImportError:
        run = asyncio.run
    with contextlib.suppress(KeyboardInterrupt):
        run(serve(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
