"""The exact prefix index against real vLLM engines on a GPU host: KV-cache events arrive, and
for a shared-prefix workload the proxy's predicted cached tokens equal what the engine reused.

Start a topology with the launcher (KV events are on by default) and prefix caching on, e.g.

    launchers/disagg.sh --model MODEL ... -- --enable-prefix-caching --enable-prompt-tokens-details

then, with the proxy on :9100 and the prefiller on :7100:

    python benchmarks/gpu_kvevents.py --proxy http://127.0.0.1:9100 \
        --engine http://127.0.0.1:7100 --out kvevents.json

Each request of the sequence (prompts of token ids: a few shared prefixes of 16 to 2,000 tokens,
each followed by its own suffix) is first looked up in the proxy's index (POST
/admin/prefix-index, once the engine's events have settled), then sent straight to the engine,
whose answer says how many prompt tokens it reused (`usage.prompt_tokens_details.cached_tokens`
with --enable-prompt-tokens-details; else the rise of its prefix-cache hit counter). A KV cache
smaller than the workload (--num-gpu-blocks-override) makes the engine evict, and the lookups
must follow. Then --through-proxy requests go through the
proxy (prefill, NIXL pull, decode), and the index's blocks per engine show that both engines'
events arrived. The admin key, where the proxy has one, is read from PDPROXY_ADMIN_KEY.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import random
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

SETTLE = 0.3  # seconds the engine's index must stay unchanged before a lookup
PREFIXES = (16, 100, 512, 1000, 2000)


def call(url: str, body: dict[str, Any] | None = None, timeout: float = 120.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method="GET" if body is None else "POST")
    request.add_header("Content-Type", "application/json")
    key = os.environ.get("PDPROXY_ADMIN_KEY")
    if key and "/admin/" in url:
        request.add_header("Authorization", f"Bearer {key}")
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return json.loads(response.read())


def hits(engine: str) -> float:
    """The engine's prefix-cache hits so far, in tokens (vllm:prefix_cache_hits_total)."""
    with urllib.request.urlopen(f"{engine}/metrics", timeout=30) as response:
        text = response.read().decode()
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:prefix_cache_hits_total")
    )


def index_of(proxy: str) -> dict[str, dict[str, Any]]:
    engines: dict[str, dict[str, Any]] = call(f"{proxy}/admin/prefix-index")["engines"]
    return engines


def settle(proxy: str, engine: str, deadline: float = 10.0) -> dict[str, Any]:
    """The engine's entry once its batches stopped arriving for SETTLE seconds."""
    end = time.monotonic() + deadline
    last = index_of(proxy)[engine]
    since = time.monotonic()
    while time.monotonic() < end:
        time.sleep(0.05)
        now = index_of(proxy)[engine]
        if (now["next_seq"], now["digest"]) != (last["next_seq"], last["digest"]):
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= SETTLE:
            return now
    raise SystemExit(f"{engine}'s KV events did not settle in {deadline} s")


def wait_ready(proxy: str, engines: list[str], timeout: float) -> None:
    end = time.monotonic() + timeout
    while True:
        try:
            seen = index_of(proxy)
            if all(e in seen for e in engines):
                return
        except OSError:
            pass
        if time.monotonic() > end:
            raise SystemExit(f"the proxy's index has no subscriber for {engines}")
        time.sleep(1)


def workload(requests: int, seed: int, vocab: int) -> list[tuple[int, list[int]]]:
    """(prefix length, prompt) per request: shared prefixes in a seeded order, own suffixes."""
    rng = random.Random(seed)
    prefixes = {n: [rng.randrange(100, vocab) for _ in range(n)] for n in PREFIXES}
    out = []
    for _ in range(requests):
        n = rng.choice(PREFIXES)
        suffix = [rng.randrange(100, vocab) for _ in range(rng.randint(1, 300))]
        out.append((n, prefixes[n] + suffix))
    return out


def direct_phase(args: argparse.Namespace, model: str) -> list[dict[str, Any]]:
    rows = []
    for i, (shared, prompt) in enumerate(workload(args.requests, args.seed, args.vocab)):
        before = settle(args.proxy, args.engine)
        predicted = call(f"{args.proxy}/admin/prefix-index", {"token_ids": prompt})
        counted = hits(args.engine)
        answer = call(
            f"{args.engine}/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": 1, "temperature": 0},
        )
        details = (answer.get("usage") or {}).get("prompt_tokens_details") or {}
        time.sleep(0.2)  # the engine's counters follow its step's output
        counter = hits(args.engine) - counted
        rows.append(
            {
                "request": i,
                "prompt_tokens": len(prompt),
                "shared_prefix": shared,
                "predicted": predicted["cached_tokens"].get(args.engine),
                # what the engine says it reused: its answer's usage where it reports it,
                # else its prefix-cache hit counter's rise over the request
                "reused": details.get("cached_tokens", int(counter)),
                "usage_cached_tokens": details.get("cached_tokens"),
                "hit_counter_rise": counter,
                "index_blocks_before": before["blocks"],
            }
        )
        row = rows[-1]
        mark = "==" if row["predicted"] == row["reused"] else "!="
        print(f"  {i:3d} prompt {len(prompt):5d} shared {shared:5d}: predicted "
              f"{row['predicted']} {mark} reused {row['reused']} "
              f"(index {before['blocks']} blocks)", flush=True)  # fmt: skip
    return rows


def proxy_phase(args: argparse.Namespace, model: str) -> dict[str, Any]:
    before = index_of(args.proxy)
    done = 0
    for _, prompt in workload(args.through_proxy, args.seed + 1, args.vocab):
        answer = call(
            f"{args.proxy}/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": 8, "temperature": 0},
        )
        done += bool(answer.get("choices"))
    time.sleep(1.0)
    after = index_of(args.proxy)
    return {"requests": args.through_proxy, "answered": done, "before": before, "after": after}


def summary(rows: list[dict[str, Any]], through: dict[str, Any]) -> dict[str, Any]:
    equal = sum(r["predicted"] == r["reused"] for r in rows)
    seen_blocks = [r["index_blocks_before"] for r in rows]
    # a prefix sent before whose blocks the engine no longer held: evicted in between
    evicted = sum(
        r["shared_prefix"] >= 32
        and not r["reused"]
        and any(q["shared_prefix"] == r["shared_prefix"] for q in rows[: r["request"]])
        for r in rows
    )
    return {
        "requests": len(rows),
        "equal": equal,
        "predicted_tokens": sum(r["predicted"] or 0 for r in rows),
        "reused_tokens": sum(r["reused"] or 0 for r in rows),
        "requests_with_reuse": sum(bool(r["reused"]) for r in rows),
        "usage_and_counter_agree": sum(
            r["usage_cached_tokens"] == r["hit_counter_rise"]
            for r in rows
            if r["usage_cached_tokens"] is not None
        ),
        "index_blocks_max": max(seen_blocks, default=0),
        "requests_after_their_prefix_was_evicted": evicted,
        "index_shrank": sum(b < a for a, b in itertools.pairwise(seen_blocks)),
        "through_proxy": {
            "answered": f"{through['answered']} of {through['requests']}",
            "blocks_per_engine_before": {u: e["blocks"] for u, e in through["before"].items()},
            "blocks_per_engine_after": {u: e["blocks"] for u, e in through["after"].items()},
            "batches_per_engine_after": {u: e["batches"] for u, e in through["after"].items()},
            "lost_or_repaired": {
                u: (e["lost"], e["repaired"]) for u, e in through["after"].items()
            },
        },
    }


def main() -> int:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    p.add_argument("--proxy", default="http://127.0.0.1:9100")
    p.add_argument("--engine", default="http://127.0.0.1:7100", help="the engine to check")
    p.add_argument("--others", nargs="*", default=["http://127.0.0.1:7200"],
                   help="the other engines whose events the proxy must also receive")  # fmt: skip
    p.add_argument("--requests", type=int, default=80)
    p.add_argument("--through-proxy", type=int, default=20)
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--ready-timeout", type=float, default=60.0)
    p.add_argument("--out", type=Path, default=Path("kvevents.json"))
    args = p.parse_args()
    wait_ready(args.proxy, [args.engine, *args.others], args.ready_timeout)
    model = call(f"{args.engine}/v1/models")["data"][0]["id"]
    print(f"engine {args.engine} serves {model}; index before: {index_of(args.proxy)}", flush=True)
    rows = direct_phase(args, model)
    through = proxy_phase(args, model)
    totals = summary(rows, through)
    result = {"summary": totals, "rows": rows, "through_proxy": through}
    args.out.write_text(json.dumps(result, indent=1))
    print(json.dumps(totals, indent=1))
    return 0 if totals["equal"] == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
