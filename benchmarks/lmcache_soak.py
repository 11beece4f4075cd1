"""LMCache PD under sustained load: how many requests pass before a push is never notified, and
how full the decoder's receive buffer is, read from LMCache's own log lines.

    # N prompts of L random token ids through the proxy, C at a time; stops sending new ones
    # after the first failure (a 504 on a missed notification, or no answer in --timeout s)
    python benchmarks/lmcache_soak.py soak --proxy http://127.0.0.1:9100 --n 300 --len 2000 \
        --concurrency 4 --max-tokens 16 --out soak.json

    # the decoder's buffer over time, from its log with LMCACHE_LOG_LEVEL=DEBUG
    python benchmarks/lmcache_soak.py occupancy --log logs/disagg/decode-0.log --out occ.json

The occupancy is the count of chunks the receiver holds (`data_size` in its `[PD-ALLOC]` and
`[PD-FREE]` debug lines, one buffer page each) against `total_chunks` from its start-up line;
the scheduler's "LMCache hit tokens: X, need to load: Y" lines say what each request loaded.
Runs under the GPU host's python (aiohttp), like benchmarks/gpu*.py.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import re
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks.gpu_client import token_prompt  # noqa: E402


async def _proxy_counters(s: aiohttp.ClientSession, proxy: str) -> dict[str, float]:
    """The proxy's LMCache and outcome counters (Prometheus text), summed per sample line."""
    try:
        async with s.get(f"{proxy}/metrics") as r:
            text = await r.text()
    except aiohttp.ClientError:
        return {}
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(("pdproxy_lmcache", "pdproxy_requests")):
            continue
        name, _, val = line.rpartition(" ")
        with contextlib.suppress(ValueError):
            out[name] = float(val)
    return out


async def _one(
    s: aiohttp.ClientSession, args: argparse.Namespace, i: int, prompt: list[int]
) -> dict[str, Any]:
    body = {
        "model": args.model,
        "prompt": prompt,
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "ignore_eos": True,
    }
    t0 = time.perf_counter()
    row: dict[str, Any] = {"i": i, "t_start": round(t0 - args.t0, 3)}
    try:
        async with s.post(
            f"{args.proxy}/v1/completions",
            json=body,
            timeout=aiohttp.ClientTimeout(total=args.timeout),
        ) as r:
            raw = await r.read()
            row["status"] = r.status
            if r.status != 200:
                row["error"] = raw[:400].decode(errors="replace")
    except TimeoutError:
        row["status"] = None
        row["error"] = f"no answer in {args.timeout:g} s"
    except aiohttp.ClientError as e:
        row["status"] = None
        row["error"] = f"{type(e).__name__}: {e}"
    row["seconds"] = round(time.perf_counter() - t0, 3)
    return row


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rnd = random.Random(args.seed)
    args.t0 = time.perf_counter()
    rows: list[dict[str, Any]] = []
    failures = 0
    queue = iter(range(args.n))
    async with aiohttp.ClientSession() as s:
        before = await _proxy_counters(s, args.proxy)

        async def worker() -> None:
            nonlocal failures
            for i in queue:
                if failures >= args.stop_after:
                    return
                row = await _one(s, args, i, token_prompt(rnd, args.len, args.vocab))
                rows.append(row)
                if row["status"] != 200:
                    failures += 1
                if args.verbose or row["status"] != 200 or i % 25 == 0:
                    print(f"[soak] {json.dumps(row)}", flush=True)

        await asyncio.gather(*(worker() for _ in range(args.concurrency)))
        after = await _proxy_counters(s, args.proxy)
    rows.sort(key=lambda r: r["i"])
    bad = [r for r in rows if r["status"] != 200]
    ok_before_first = next((k for k, r in enumerate(rows) if r["status"] != 200), len(rows))
    summary = {
        "sent": len(rows),
        "ok": len(rows) - len(bad),
        "failed": len(bad),
        "ok_before_first_failure": ok_before_first,
        "first_failure": bad[0] if bad else None,
        "wall_s": round(time.perf_counter() - args.t0, 1),
        "proxy_counters_delta": {
            k: after[k] - before.get(k, 0.0) for k in sorted(after) if after[k] != before.get(k)
        },
        "params": {
            k: getattr(args, k)
            for k in ("n", "len", "concurrency", "max_tokens", "seed", "timeout", "stop_after")
        },
    }
    print(f"[soak] summary {json.dumps(summary)}", flush=True)
    return {"summary": summary, "rows": rows}


_TOTAL = re.compile(r"total_chunks=(\d+) \(buffer=(\d+) bytes, chunk=(\d+) bytes\)")
_ALLOC = re.compile(
    r"\[PD-ALLOC\] req=(\S+) alloc chunk (\d+)/(\d+), free_chunks=(-?\d+), data_size=(\d+)"
)
_FREE = re.compile(r"\[PD-FREE\] remove key=.*?data_size=(\d+), free_chunks_before=(-?\d+)")
_HIT = re.compile(
    r"Total tokens (\d+), Inference Engine computed tokens: (\d+), "
    r"LMCache hit tokens: (\d+), need to load: (-?\d+)"
)


def occupancy(log: Path) -> dict[str, Any]:
    """The receiver's buffer over the log: chunks held after each alloc or free, and loads."""
    total = None
    held: list[int] = []
    allocs = frees = 0
    hits: Counter[str] = Counter()
    for line in log.read_text(errors="replace").splitlines():
        if m := _TOTAL.search(line):
            total = {"chunks": int(m[1]), "buffer_bytes": int(m[2]), "chunk_bytes": int(m[3])}
        elif m := _ALLOC.search(line):
            allocs += 1
            held.append(int(m[5]))
        elif m := _FREE.search(line):
            frees += 1
            held.append(int(m[1]))
        elif m := _HIT.search(line):
            hits[f"total {m[1]} -> hit {m[3]}, load {m[4]}"] += 1
    step = max(1, len(held) // 200)
    return {
        "total": total,
        "chunk_allocs": allocs,
        "chunk_frees": frees,
        "held_max": max(held, default=0),
        "held_last": held[-1] if held else None,
        "held_every_nth": {"n": step, "values": held[::step]},
        "lookups": dict(hits.most_common(20)),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("soak")
    p.add_argument("--proxy", default="http://127.0.0.1:9100")
    p.add_argument("--model", default="m")
    p.add_argument("--n", type=int, default=300)
    p.add_argument("--len", type=int, default=2000, help="prompt tokens (random ids)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=60.0, help="seconds per request")
    p.add_argument("--stop-after", type=int, default=1, help="failures before no more are sent")
    p.add_argument("--verbose", action="store_true")
    p.add_argument("--out", type=Path, required=True)
    o = sub.add_parser("occupancy")
    o.add_argument("--log", type=Path, required=True)
    o.add_argument("--out", type=Path, required=True)
    args = ap.parse_args()
    if args.cmd == "soak":
        result = asyncio.run(soak(args))
    else:
        result = occupancy(args.log)
        print(json.dumps({k: v for k, v in result.items() if k != "held_every_nth"}))
    args.out.write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
