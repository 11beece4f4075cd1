"""HTTP helpers for benchmarks/gpu.py: one request to an engine or the proxy, streamed or not,
with its timing, text, per-token logprobs and usage; Prometheus text parsing.

Runs under the GPU host's python (aiohttp, and the project's package, which the launcher needs
anyway), like the rest of gpu*.py.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from proxy.engines.connectors.nixl import REMOTE_DECODE_PARAMS

# The prefill leg of a client-driven PD request, as the proxy sends it (README "What the proxy
# sends"): the "floor" mode of the latency phase does this itself.
REMOTE_DECODE = REMOTE_DECODE_PARAMS

WORDS = [
    "alpha",
    "bravo",
    "charlie",
    "delta",
    "echo",
    "foxtrot",
    "golf",
    "hotel",
    "india",
    "juliet",
    "kilo",
    "lima",
    "mike",
    "november",
    "oscar",
    "papa",
    "quebec",
    "romeo",
    "sierra",
    "tango",
    "uniform",
    "victor",
    "whiskey",
    "xray",
    "yankee",
    "zulu",
]


def text_prompt(seed: int, n_words: int) -> str:
    rnd = random.Random(seed)
    return " ".join(rnd.choice(WORDS) + str(rnd.randint(0, 999)) for _ in range(n_words))


def token_prompt(rnd: random.Random, n: int, vocab: int) -> list[int]:
    """Random token ids above the special tokens: a prompt no cache has seen."""
    return [rnd.randint(100, vocab - 1) for _ in range(n)]


@dataclass
class Token:
    token: str
    logprob: float | None
    top: dict[str, float] = field(default_factory=dict)


@dataclass
class Answer:
    status: int
    text: str = ""
    tokens: list[Token] = field(default_factory=list)
    finish: str | None = None
    usage: dict[str, Any] | None = None
    ttft: float | None = None  # seconds to the first chunk with content
    e2e: float = 0.0
    chunk_times: list[float] = field(default_factory=list)  # perf_counter of content chunks
    error: Any = None
    body: dict[str, Any] | None = None  # the whole answer when not streamed

    @property
    def ok(self) -> bool:
        return self.status == 200 and self.error is None


def _tokens_of(choice: dict[str, Any]) -> list[Token]:
    lp = choice.get("logprobs")
    if not lp:
        return []
    if "content" in lp:  # chat
        return [
            Token(
                c["token"],
                c.get("logprob"),
                {t["token"]: t["logprob"] for t in c.get("top_logprobs") or []},
            )
            for c in lp["content"] or []
        ]
    tops = lp.get("top_logprobs") or []
    return [
        Token(t, lp["token_logprobs"][i], (tops[i] if i < len(tops) and tops[i] else {}))
        for i, t in enumerate(lp.get("tokens") or [])
    ]


def _piece(choice: dict[str, Any]) -> str:
    if "text" in choice:
        return choice.get("text") or ""
    return (choice.get("delta") or {}).get("content") or ""


async def call(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Answer:
    """POST `body`; a stream is read to its end, its deltas joined."""
    t0 = time.perf_counter()
    async with s.post(url, json=body) as r:
        if not body.get("stream"):
            raw = await r.read()
            t1 = time.perf_counter()
            try:
                data = json.loads(raw)
            except ValueError:
                return Answer(r.status, e2e=t1 - t0, error=raw[:300].decode(errors="replace"))
            if r.status != 200 or "choices" not in data:
                return Answer(r.status, e2e=t1 - t0, error=data)
            ch = data["choices"][0]
            text = ch.get("text") if "text" in ch else (ch.get("message") or {}).get("content")
            return Answer(
                200,
                text or "",
                _tokens_of(ch),
                ch.get("finish_reason"),
                data.get("usage"),
                ttft=t1 - t0,
                e2e=t1 - t0,
                body=data,
            )
        out = Answer(r.status)
        parts: list[str] = []
        buf = b""
        async for chunk in r.content.iter_any():
            now = time.perf_counter()
            buf += chunk
            while b"\n\n" in buf:
                event, buf = buf.split(b"\n\n", 1)
                for line in event.split(b"\n"):
                    if not line.startswith(b"data: ") or line == b"data: [DONE]":
                        continue
                    d = json.loads(line[6:])
                    if "error" in d:
                        out.error = d
                        continue
                    if d.get("usage"):
                        out.usage = d["usage"]
                    for ch in d.get("choices") or []:
                        piece = _piece(ch)
                        if piece:
                            if out.ttft is None:
                                out.ttft = now - t0
                            out.chunk_times.append(now)
                            parts.append(piece)
                        out.tokens.extend(_tokens_of(ch))
                        if ch.get("finish_reason"):
                            out.finish = ch["finish_reason"]
        out.text = "".join(parts)
        out.e2e = time.perf_counter() - t0
        if r.status != 200 and out.error is None:
            out.error = buf[:300].decode(errors="replace")
        return out


async def post_json(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> Any:
    async with s.post(url, json=body) as r:
        return await r.json(content_type=None)


async def get_json(s: aiohttp.ClientSession, url: str) -> Any:
    async with s.get(url) as r:
        return await r.json(content_type=None)


def parse_prom(text: str) -> dict[str, float]:
    """Every sample of a Prometheus text exposition: 'name{labels}' -> value."""
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, _, value = line.rpartition(" ")
        try:
            out[name] = float(value)
        except ValueError:
            continue
    return out


async def metrics(s: aiohttp.ClientSession, base: str) -> dict[str, float]:
    async with s.get(f"{base}/metrics") as r:
        return parse_prom(await r.text())


def total(samples: dict[str, float], name: str) -> float:
    """A metric summed over its label sets (`name` or `name{...}`)."""
    return sum(v for k, v in samples.items() if k == name or k.startswith(name + "{"))


def delta(after: dict[str, float], before: dict[str, float], name: str) -> float:
    return total(after, name) - total(before, name)


def percentile(xs: list[float], q: float) -> float:
    """Nearest-rank percentile, q in [0, 100]."""
    if not xs:
        return float("nan")
    ys = sorted(xs)
    return ys[min(len(ys) - 1, max(0, round(q / 100 * (len(ys) - 1))))]


def summary_ms(xs: list[float]) -> dict[str, float]:
    """p50/p90/p99/mean in milliseconds of values in seconds."""
    ms = [x * 1000 for x in xs]
    if not ms:
        return {}
    return {
        "n": len(ms),
        "p50": round(percentile(ms, 50), 3),
        "p90": round(percentile(ms, 90), 3),
        "p99": round(percentile(ms, 99), 3),
        "mean": round(sum(ms) / len(ms), 3),
    }
