"""What a batch costs through pdproxy: one request with 8 prompts (fanned out into 8
disaggregated sub-requests and merged) against the same 8 prompts sent as 8 concurrent single
requests, both through pdproxy, in one run, interleaved.

Simulated engines with zero delay (each token its own SSE event), so what is measured is the
proxy and the engines' HTTP handling, not simulated compute. For each round, in turn:

  batch          POST /v1/completions with `prompt` = the 8 prompts (streamed: the merged stream)
  8 singles      the 8 prompts as 8 concurrent requests, the same body otherwise

Read: the time until the whole answer (batch: its last byte; 8 singles: the last of the 8),
the time to the first token (batch: the first event with text; 8 singles: the earliest of
the 8), and the proxy's CPU per batch of 8 completions (/proc/<pid>/stat). The proxy runs
alone on CPU 0; engines and this client share CPU 1.

    python benchmarks/batch.py                 # ~2 min: results/batch.{md,json}
    python benchmarks/batch.py --rounds 5 --per-round 10
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (
    MODEL,
    RESULTS,
    Procs,
    Sample,
    cpu_seconds,
    new_session,
    percentile,
    pin_self,
    provenance,
    provenance_lines,
    stream_once,
)

PROXY_CPU, ENGINE_CPU = "0", "1"
PROMPTS = [
    f"Question {i}: the river turned toward the sea before the city, and the people there knew "
    f"its water well. What did the children do every morning, in story number {i}?"
    for i in range(8)
]


def body(prompt: Any, tokens: int, stream: bool) -> bytes:
    return orjson.dumps({"model": MODEL, "prompt": prompt, "max_tokens": tokens,
                         "ignore_eos": True, "stream": stream})  # fmt: skip


async def whole_once(session: aiohttp.ClientSession, url: str, data: bytes) -> Sample:
    """A non-streamed request: e2e only (its TTFT is its e2e)."""
    t0 = time.perf_counter()
    try:
        async with session.post(url, data=data) as resp:
            raw = await resp.read()
            ok = resp.status == 200 and b'"choices"' in raw
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return Sample(False, error=f"{type(exc).__name__}: {exc}")
    e2e = time.perf_counter() - t0
    return Sample(ok, e2e, e2e, error="" if ok else raw[:200].decode(errors="replace"))


async def one(session: aiohttp.ClientSession, url: str, data: bytes, stream: bool) -> Sample:
    return await (stream_once(session, url, data) if stream else whole_once(session, url, data))


async def batch_of_8(session: aiohttp.ClientSession, url: str, tokens: int, stream: bool) -> Sample:
    sample = await one(session, url, body(PROMPTS, tokens, stream), stream)
    if sample.ok and stream and sample.tokens < 8:
        return Sample(False, error=f"merged stream carried {sample.tokens} token events")
    return sample


async def singles_8(session: aiohttp.ClientSession, url: str, tokens: int, stream: bool) -> Sample:
    """8 concurrent requests, seen as one: first token = the earliest, e2e = the last."""
    t0 = time.perf_counter()
    parts = await asyncio.gather(
        *(one(session, url, body(p, tokens, stream), stream) for p in PROMPTS)
    )
    if not all(p.ok for p in parts):
        return Sample(False, error=next(p.error for p in parts if not p.ok))
    e2e = time.perf_counter() - t0
    return Sample(True, min(p.ttft for p in parts), e2e)


async def measure(
    proxy_url: str, pid: int, tokens: int, stream: bool, rounds: int, per_round: int
) -> dict[str, Any]:
    url = proxy_url + "/v1/completions"
    modes = {"batch of 8": batch_of_8, "8 singles": singles_8}
    samples: dict[str, list[Sample]] = {m: [] for m in modes}
    cpu: dict[str, float] = dict.fromkeys(modes, 0.0)
    async with new_session() as session:
        for _ in range(3):  # warm: connections, caches
            for send in modes.values():
                await send(session, url, tokens, stream)
        for _ in range(rounds):
            for name, send in modes.items():
                before = cpu_seconds(pid)
                for _ in range(per_round):  # one after another: latency, not throughput
                    samples[name].append(await send(session, url, tokens, stream))
                cpu[name] += cpu_seconds(pid) - before
    rows: dict[str, Any] = {}
    for name, got in samples.items():
        ok = [s for s in got if s.ok]
        rows[name] = {
            "requests": len(got),
            "failed": len(got) - len(ok),
            "errors": sorted({s.error for s in got if not s.ok})[:3],
            "ttft_p50_ms": percentile([s.ttft for s in ok], 50) * 1e3,
            "e2e_p50_ms": percentile([s.e2e for s in ok], 50) * 1e3,
            "e2e_p99_ms": percentile([s.e2e for s in ok], 99) * 1e3,
            "proxy_cpu_ms_per_8": cpu[name] / max(1, len(got)) * 1e3,
        }
    singles, batch = rows["8 singles"], rows["batch of 8"]
    ratios = {
        key: batch[key] / singles[key] if singles[key] else None
        for key in ("ttft_p50_ms", "e2e_p50_ms", "proxy_cpu_ms_per_8")
    }
    return {"rows": rows, "batch_over_singles": ratios,
            "added_e2e_p50_ms": batch["e2e_p50_ms"] - singles["e2e_p50_ms"]}  # fmt: skip


def render(result: dict[str, Any]) -> str:
    prov = result["provenance"]
    lines = [
        "# A batch of 8 prompts against 8 concurrent single requests, through pdproxy",
        "",
        *provenance_lines(prov),
        "- 1p1d simulated engines, zero delay, each token its own SSE event, "
        f"{result['tokens']} tokens per completion; proxy pinned to CPU 0, engines and the "
        "client on CPU 1; requests one after another, the two modes interleaved over "
        f"{result['rounds']} rounds of {result['per_round']}.",
        "- batch: one request with 8 prompts (8 disaggregated sub-requests, merged); 8 singles: "
        "the 8 prompts as 8 concurrent requests. TTFT: first event with text (8 singles: the "
        "earliest); e2e: whole answer (8 singles: the last to finish); proxy CPU per 8 "
        "completions.",
        "",
    ]
    for kind in ("whole", "stream"):
        res = result[kind]
        lines += [
            f"## {'streamed' if kind == 'stream' else 'not streamed'}",
            "",
            "| mode | requests | failed | TTFT p50 ms | e2e p50 ms | e2e p99 ms | proxy CPU ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, r in res["rows"].items():
            lines.append(
                f"| {name} | {r['requests']} | {r['failed']} | {r['ttft_p50_ms']:.2f} | "
                f"{r['e2e_p50_ms']:.2f} | {r['e2e_p99_ms']:.2f} | {r['proxy_cpu_ms_per_8']:.2f} |"
            )
        ratio = {k: "-" if v is None else f"{v:.2f}x" for k, v in res["batch_over_singles"].items()}
        lines += [
            "",
            f"batch / 8 singles: TTFT p50 {ratio['ttft_p50_ms']}, e2e p50 {ratio['e2e_p50_ms']} "
            f"({res['added_e2e_p50_ms']:+.2f} ms), proxy CPU {ratio['proxy_cpu_ms_per_8']}",
            "",
        ]
    return "\n".join(lines)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pin_self({int(ENGINE_CPU)} if (os.cpu_count() or 1) > 1 else {0})
    procs = Procs(Path(tempfile.mkdtemp(prefix="pdproxy-batch-")))
    zero = ["--speed-factor", "0", "--token-per-chunk"]
    try:
        prefill = procs.sim("prefill", ENGINE_CPU, "--role", "prefill", *zero)
        decode = procs.sim("decode", ENGINE_CPU, "--role", "decode", *zero)
        proxy = procs.pdproxy("pdproxy", PROXY_CPU, [prefill.url], [decode.url],
                              "--stats-interval", "0", "--log-level", "warning")  # fmt: skip
        result: dict[str, Any] = {}
        for kind, stream in (("whole", False), ("stream", True)):
            result[kind] = await measure(
                proxy.url, proxy.pid, args.tokens, stream, args.rounds, args.per_round
            )
            print(f"{kind}: {result[kind]['batch_over_singles']}", flush=True)
    finally:
        procs.stop_all()
    return {
        "provenance": provenance([Path(sys.executable).name, *sys.argv]),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "per_round": args.per_round,
        **result,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    p.add_argument("--per-round", type=int, default=40, help="requests per mode and round")
    p.add_argument("--tokens", type=int, default=32, help="tokens per completion (default 32)")
    p.add_argument("--out", default=str(RESULTS / "batch"), help="results path stem")
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    stem = Path(args.out)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
