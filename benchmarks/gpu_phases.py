"""The measurements of benchmarks/gpu.py, each against a running topology (see gpu.Topology).

kv_bandwidth  pulls of N-token prompts through the proxy at concurrency 1; the decoder's own
              NIXL histograms give bytes, time, descriptors per transfer
equality      greedy answers through the proxy against the decoder alone, token by token, with
              logprobs: float32 must be identical; bf16 may split only at a near-tie
latency       concurrency 1, interleaved rounds of direct / floor / proxy; PD's TTFT excess
              split into prefill leg, KV transfer, decoder's first step and proxy
calibrate     the engine's prefill time per token, decode step time against batch size, and
              decode step time while a long prefill runs beside it (for the simulator)
serve         `vllm bench serve` through the proxy and against the decoder alone
kv_health     what the proxy itself reports about the KV path (gauges, warning)
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import statistics
import time
from collections.abc import Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp

from benchmarks.gpu_client import (
    REMOTE_DECODE,
    Answer,
    call,
    delta,
    get_json,
    metrics,
    percentile,
    post_json,
    summary_ms,
    text_prompt,
    token_prompt,
    total,
)

COMPLETIONS = "/v1/completions"
CHAT = "/v1/chat/completions"
NIXL_COUNT = "vllm:nixl_xfer_time_seconds_count"


@dataclass
class Target:
    """The running topology a phase measures."""

    name: str
    connector: str
    proxy: str
    prefill: str
    decode: str
    model: str
    tokenizer: str
    dtype: str
    vocab: int
    log_dir: Path
    engines: tuple[str, ...] = ()  # every engine (a pool's decode on any of them)

    def all_engines(self) -> tuple[str, ...]:
        return self.engines or (self.prefill, self.decode)


def _session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=0),
        timeout=aiohttp.ClientTimeout(total=900),
    )


async def engine_metrics(s: aiohttp.ClientSession, urls: tuple[str, ...]) -> dict[str, float]:
    """Every engine's samples summed by name and labels: the topology's total (in a pool a
    pull is counted on whichever engine decoded)."""
    out: dict[str, float] = {}
    for url in urls:
        for k, v in (await metrics(s, url)).items():
            out[k] = out.get(k, 0.0) + v
    return out


def _greedy(t: Target, **extra: Any) -> dict[str, Any]:
    return {"model": t.model, "temperature": 0, "ignore_eos": True, **extra}


# ------------------------------------------------------------------ KV bandwidth


def nixl_transfer_stats(after: dict[str, float], before: dict[str, float]) -> dict[str, Any]:
    """Per-transfer figures from the decoder's NIXL histograms between two scrapes."""
    n = delta(after, before, NIXL_COUNT)
    secs = delta(after, before, "vllm:nixl_xfer_time_seconds_sum")
    nbytes = delta(after, before, "vllm:nixl_bytes_transferred_sum")
    desc = delta(after, before, "vllm:nixl_num_descriptors_sum")
    post = delta(after, before, "vllm:nixl_post_time_seconds_sum")
    out: dict[str, Any] = {"transfers": int(n)}
    if n > 0 and secs > 0:
        out.update(
            gb_per_s=round(nbytes / secs / 1e9, 3),
            ms_per_transfer=round(1000 * secs / n, 3),
            mb_per_transfer=round(nbytes / n / 1e6, 2),
            descriptors_per_transfer=round(desc / n, 1),
            us_per_descriptor=round(1e6 * secs / desc, 3) if desc else None,
            post_ms_per_transfer=round(1000 * post / n, 3),
        )
    out["failed"] = int(delta(after, before, "vllm:nixl_num_failed_transfers_total"))
    return out


async def kv_bandwidth(t: Target, sizes: list[int], per_size: int) -> dict[str, Any]:
    rnd = random.Random(3)
    rows = []
    # NIXL: the pull is counted where it decodes (any engine of a pool); LMCache: the decoder's
    urls = t.all_engines() if t.connector == "nixl" else (t.decode,)
    async with _session() as s:
        for n_tokens in sizes:
            before = await engine_metrics(s, urls)
            lat = []
            for _ in range(per_size):
                body = _greedy(t, prompt=token_prompt(rnd, n_tokens, t.vocab), max_tokens=2)
                a = await call(s, t.proxy + COMPLETIONS, body)
                if not a.ok:
                    raise RuntimeError(f"kv_bandwidth: proxy answered {a.status}: {a.error}")
                lat.append(a.e2e)
            after = await engine_metrics(s, urls)
            row: dict[str, Any] = {"prompt_tokens": n_tokens, "requests": per_size}
            row["client_e2e_ms"] = summary_ms(lat)
            if t.connector == "nixl":
                row.update(nixl_transfer_stats(after, before))
            else:
                row["decoder_lmcache"] = {
                    k: round(after[k] - before.get(k, 0.0), 6)
                    for k in after
                    if k.startswith("lmcache:") and after[k] != before.get(k, 0.0)
                }
            rows.append(row)
            print(f"[kv_bandwidth {t.name}] {json.dumps(row)}", flush=True)
    return {"rows": rows}


# ------------------------------------------------------------------ equality


def _equality_cases(vocab: int, max_prompt: int) -> list[tuple[str, dict[str, Any], str]]:
    """(path, body part, label): completions and chat, text and token-id prompts, short to long,
    none longer than `max_prompt` tokens (text counted at 4 tokens a word, an upper bound). The
    short case sits under vLLM's kv_recompute_threshold (64 tokens): no pull there."""
    rnd = random.Random(5)
    cases: list[tuple[str, dict[str, Any], str]] = [
        (COMPLETIONS, {"prompt": text_prompt(100, 8)}, "text-short"),
        (COMPLETIONS, {"prompt": text_prompt(101, 300)}, "text-300w"),
        (COMPLETIONS, {"prompt": text_prompt(102, 1500)}, "text-1500w"),
        (COMPLETIONS, {"prompt": token_prompt(rnd, 2000, vocab)}, "ids-2000"),
        (COMPLETIONS, {"prompt": token_prompt(rnd, 5000, vocab)}, "ids-5000"),
        (CHAT, {"messages": [{"role": "user", "content": text_prompt(200, 60)}]}, "chat-60w"),
        (
            CHAT,
            {
                "messages": [
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": text_prompt(201, 900)},
                ]
            },
            "chat-900w",
        ),
    ]

    def size(part: dict[str, Any]) -> int:
        if isinstance(part.get("prompt"), list):
            return len(part["prompt"])
        text = part.get("prompt") or " ".join(m["content"] for m in part["messages"])
        return 4 * len(text.split())

    return [c for c in cases if size(c[1]) <= max_prompt]


def _gap(top: dict[str, float]) -> float | None:
    v = sorted(top.values(), reverse=True)
    return v[0] - v[1] if len(v) >= 2 else None


def compare(via: Answer, direct: Answer, bound: float, exact: bool) -> dict[str, Any]:
    """Token-by-token comparison of a PD answer with the direct one.

    exact: any difference fails. Otherwise a split passes only where the direct run's top-1
    minus top-2 logprob gap is at most `bound` (a near-tie that numerics may flip); before the
    split, the chosen tokens' logprobs must agree within `bound` too (a wrong KV moves them by
    about the top-k spread, ~0.5 nat)."""
    vt, dt = [x.token for x in via.tokens], [x.token for x in direct.tokens]
    n = min(len(vt), len(dt))
    k = next((i for i in range(n) if vt[i] != dt[i]), n)
    diffs = [
        abs(via.tokens[i].logprob - direct.tokens[i].logprob)  # type: ignore[operator]
        for i in range(k)
        if via.tokens[i].logprob is not None and direct.tokens[i].logprob is not None
    ]
    row: dict[str, Any] = {
        "tokens": n,
        "identical": vt == dt and via.text == direct.text and n > 0,
        "first_split": k if k < n else None,
        "prefix_max_abs_dlogprob": round(max(diffs), 6) if diffs else 0.0,
    }
    if k < n:
        row["direct_gap_at_split"] = (
            round(g, 6) if (g := _gap(direct.tokens[k].top)) is not None else None
        )
        row["tokens_at_split"] = {"pd": vt[k], "direct": dt[k]}
    if exact:
        row["ok"] = row["identical"]
    else:
        gap = row.get("direct_gap_at_split")
        row["ok"] = (
            n > 0
            and row["prefix_max_abs_dlogprob"] <= bound
            and (k == n or (gap is not None and gap <= bound))
        )
    return row


async def equality(t: Target, max_tokens: int, bound: float, max_prompt: int) -> dict[str, Any]:
    exact = t.dtype == "float32"
    rows = []
    async with _session() as s:
        for ci, (path, part, label) in enumerate(_equality_cases(t.vocab, max_prompt)):
            for stream in (False, True):
                body = json.loads(json.dumps(part))
                tag = f"[{ci}{'s' if stream else 'n'}] "  # a fresh prompt per request: it pulls
                if "prompt" in body and isinstance(body["prompt"], str):
                    body["prompt"] = tag + body["prompt"]
                elif "prompt" in body:
                    body["prompt"] = [100 + ci * 2 + stream, *body["prompt"]]
                else:
                    body["messages"][-1]["content"] = tag + body["messages"][-1]["content"]
                body.update(_greedy(t, max_tokens=max_tokens, stream=stream))
                if path == COMPLETIONS:
                    body.update(logprobs=5, return_tokens_as_token_ids=True)
                else:
                    body.update(logprobs=True, top_logprobs=5, return_tokens_as_token_ids=True)
                if stream:
                    body["stream_options"] = {"include_usage": True}
                m0 = await engine_metrics(s, t.all_engines())
                via = await call(s, t.proxy + path, body)
                m1 = await engine_metrics(s, t.all_engines())
                direct = await call(s, t.decode + path, body)
                m2 = await engine_metrics(s, t.all_engines())
                row: dict[str, Any] = {"case": label, "endpoint": path, "stream": stream}
                if not (via.ok and direct.ok):
                    row.update(ok=False, error=f"proxy {via.error} / direct {direct.error}")
                else:
                    row.update(compare(via, direct, bound, exact))
                    row["prompt_tokens"] = (direct.usage or {}).get("prompt_tokens")
                    row["usage_equal"] = via.usage == direct.usage
                row["pulls_proxied"] = int(delta(m1, m0, NIXL_COUNT))
                row["pulls_direct"] = int(delta(m2, m1, NIXL_COUNT))
                rows.append(row)
                print(f"[equality {t.name}] {json.dumps(row)}", flush=True)
        proxy_m = await metrics(s, t.proxy)
    judged = [r for r in rows if "ok" in r]
    summary = {
        "dtype": t.dtype,
        "rule": "identical tokens" if exact else f"splits only where direct top-2 gap <= {bound}",
        "cases": len(rows),
        "identical": sum(bool(r.get("identical")) for r in rows),
        "ok": all(r["ok"] for r in judged) and len(judged) == len(rows),
        "gaps_at_splits": sorted(
            r["direct_gap_at_split"] for r in rows if r.get("direct_gap_at_split") is not None
        ),
        "max_prefix_abs_dlogprob": max(r.get("prefix_max_abs_dlogprob", 0) for r in rows),
        "proxied_with_a_pull": sum(r["pulls_proxied"] >= 1 for r in rows)
        if t.connector == "nixl"
        else None,  # LMCache pushes: the decoder's NIXL metrics do not see it
        "direct_without_a_pull": sum(r["pulls_direct"] == 0 for r in rows),
        "proxy_recompute_total": total(proxy_m, "pdproxy_kv_recompute_total"),
        "proxy_fallbacks_total": total(proxy_m, "pdproxy_prefill_fallbacks_total"),
    }
    print(f"[equality {t.name}] {json.dumps(summary)}", flush=True)
    return {"summary": summary, "rows": rows}


# ------------------------------------------------------------------ latency at concurrency 1

PROXY_HIST = (
    "pdproxy_prefill_seconds",
    "pdproxy_decode_first_token_seconds",
    "pdproxy_ttft_seconds",
)


def _mean_of(after: dict[str, float], before: dict[str, float], hist: str) -> float | None:
    n = delta(after, before, hist + "_count")
    return delta(after, before, hist + "_sum") / n if n else None


async def _floor_request(s: aiohttp.ClientSession, t: Target, body: dict[str, Any]) -> Answer:
    """What a client doing PD itself pays: the prefill leg, then the decode leg."""
    t0 = time.perf_counter()
    pb = dict(body, stream=False, max_tokens=1, n=1, kv_transfer_params=dict(REMOTE_DECODE))
    pdata = await post_json(s, t.prefill + COMPLETIONS, pb)
    prefill_leg = time.perf_counter() - t0
    a = await call(
        s, t.decode + COMPLETIONS, dict(body, kv_transfer_params=pdata["kv_transfer_params"])
    )
    a.ttft = (a.ttft or 0.0) + prefill_leg
    a.e2e += prefill_leg
    a.body = {"prefill_leg": prefill_leg}
    return a


async def latency(t: Target, rounds: int, prompt_len: int, max_tokens: int) -> dict[str, Any]:
    modes = ["direct", "proxy"] + (["floor"] if t.connector == "nixl" else [])
    rnd = random.Random(7)
    res: dict[str, list[Answer]] = {m: [] for m in modes}
    warmup = 3
    async with _session() as s:
        for i in range(rounds + warmup):
            if i == warmup:  # the proxy records a request just after its last byte: let it
                await asyncio.sleep(0.5)
                p0, d0 = await metrics(s, t.proxy), await metrics(s, t.decode)
            order = list(modes)
            rnd.shuffle(order)
            for mode in order:
                body = _greedy(
                    t,
                    prompt=token_prompt(rnd, prompt_len, t.vocab),
                    max_tokens=max_tokens,
                    stream=True,
                )
                if mode == "floor":
                    a = await _floor_request(s, t, body)
                else:
                    a = await call(
                        s, (t.decode if mode == "direct" else t.proxy) + COMPLETIONS, body
                    )
                if not a.ok or a.ttft is None:
                    raise RuntimeError(f"latency: {mode} failed: {a.status} {a.error}")
                if i >= warmup:
                    res[mode].append(a)
        await asyncio.sleep(0.5)
        p1, d1 = await metrics(s, t.proxy), await metrics(s, t.decode)
    out: dict[str, Any] = {"rounds": rounds, "prompt_tokens": prompt_len, "max_tokens": max_tokens}
    for mode, answers in res.items():
        out[mode] = {
            "ttft_ms": summary_ms([a.ttft or 0.0 for a in answers]),
            "e2e_ms": summary_ms([a.e2e for a in answers]),
        }
    if "floor" in res:
        out["floor"]["prefill_leg_ms"] = summary_ms([a.body["prefill_leg"] for a in res["floor"]])  # type: ignore[index]
        for key in ("ttft_ms", "e2e_ms"):
            out[f"proxy_minus_floor_{key}"] = {
                q: round(out["proxy"][key][q] - out["floor"][key][q], 3) for q in ("p50", "mean")
            }
    # PD's TTFT excess over direct, in means, from the proxy's and the decoder's own metrics
    prefill = _mean_of(p1, p0, "pdproxy_prefill_seconds")
    handoff = _mean_of(p1, p0, "pdproxy_decode_first_token_seconds")
    proxy_ttft = _mean_of(p1, p0, "pdproxy_ttft_seconds")
    parts: dict[str, Any] = {}
    if prefill is not None and handoff is not None and proxy_ttft is not None:
        xfer = None
        if t.connector == "nixl":
            n = delta(d1, d0, NIXL_COUNT)
            xfer = delta(d1, d0, "vllm:nixl_xfer_time_seconds_sum") / n if n else None
        client = out["proxy"]["ttft_ms"]["mean"]
        parts = {
            "direct_ttft_ms": out["direct"]["ttft_ms"]["mean"],
            "pd_ttft_ms": client,
            "prefill_leg_ms": round(prefill * 1000, 3),
            "kv_transfer_ms": None if xfer is None else round(xfer * 1000, 3),
            "decoder_first_step_ms": round((handoff - (xfer or 0.0)) * 1000, 3),
            "proxy_and_client_ms": round(client - proxy_ttft * 1000, 3),
            "proxy_internal_ms": round((proxy_ttft - prefill - handoff) * 1000, 3),
        }
        parts["excess_ms"] = round(client - parts["direct_ttft_ms"], 3)
    out["ttft_parts_mean"] = parts
    print(f"[latency {t.name}] {json.dumps(out)}", flush=True)
    return out


# ------------------------------------------------------------------ calibration


async def _stream_steps(s: aiohttp.ClientSession, url: str, body: dict[str, Any]) -> list[float]:
    a = await call(s, url, dict(body, stream=True))
    if not a.ok:
        raise RuntimeError(f"calibrate: {a.status} {a.error}")
    return a.chunk_times


def _short_streams(
    s: aiohttp.ClientSession, url: str, t: Target, rnd: random.Random, n: int, steps: int
) -> list[Coroutine[Any, Any, list[float]]]:
    """`n` streams of a fresh 128-token prompt and `steps` tokens each, not yet started."""
    return [
        _stream_steps(
            s,
            url + COMPLETIONS,
            _greedy(t, prompt=token_prompt(rnd, 128, t.vocab), max_tokens=steps),
        )
        for _ in range(n)
    ]


def _itls(times: list[float], lo: float, hi: float) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times) if lo <= a and b <= hi]


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    """Least squares y = a + b x."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    sxx = sum((x - mx) ** 2 for x in xs)
    b = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / sxx if sxx else 0.0
    return my - b * mx, b


async def calibrate(
    url: str, t: Target, prefill_lens: list[int], batches: list[int], mixed_lens: list[int]
) -> dict[str, Any]:
    """Against one engine (the decoder alone; its prefiller idle)."""
    rnd = random.Random(9)
    out: dict[str, Any] = {"engine": url}
    async with _session() as s:
        # 1. prefill: one request at a time, max_tokens 1; the engine's own prefill histogram
        rows = []
        for n in prefill_lens:
            await call(
                s, url + COMPLETIONS, _greedy(t, prompt=token_prompt(rnd, n, t.vocab), max_tokens=1)
            )
            m0 = await metrics(s, url)
            lat = []
            for _ in range(3):
                a = await call(
                    s,
                    url + COMPLETIONS,
                    _greedy(t, prompt=token_prompt(rnd, n, t.vocab), max_tokens=1),
                )
                lat.append(a.e2e)
            m1 = await metrics(s, url)
            engine = _mean_of(m1, m0, "vllm:request_prefill_time_seconds")
            rows.append(
                {
                    "prompt_tokens": n,
                    "client_ms": round(statistics.median(lat) * 1000, 3),
                    "engine_prefill_ms": None if engine is None else round(engine * 1000, 3),
                }
            )
        ys = [r["engine_prefill_ms"] or r["client_ms"] for r in rows]
        a0, b0 = _fit([float(r["prompt_tokens"]) for r in rows], ys)
        out["prefill"] = {"rows": rows, "overhead_ms": round(a0, 4), "ms_per_token": round(b0, 6)}
        print(f"[calibrate] prefill {json.dumps(out['prefill'])}", flush=True)

        # 2. decode step against batch size: B streams of a short prompt, steady part only
        rows = []
        steps = 96
        for b in batches:
            runs = await asyncio.gather(*_short_streams(s, url, t, rnd, b, steps))
            lo = max(r[min(8, len(r) - 1)] for r in runs)  # every stream past its first tokens
            hi = min(r[-1] for r in runs)  # and none finished yet
            itl = [g for r in runs for g in _itls(r, lo, hi)]
            if not itl:
                itl = [g for r in runs for g in _itls(r, r[0], r[-1])]
            rows.append(
                {
                    "batch": b,
                    "step_ms_p50": round(percentile(itl, 50) * 1000, 3),
                    "step_ms_p90": round(percentile(itl, 90) * 1000, 3),
                }
            )
        a1, b1 = _fit([float(r["batch"]) for r in rows], [r["step_ms_p50"] for r in rows])
        out["decode"] = {"rows": rows, "base_ms": round(a1, 4), "ms_per_seq": round(b1, 5)}
        print(f"[calibrate] decode {json.dumps(out['decode'])}", flush=True)

        # 3. decode steps while a long prefill runs beside them (chunked prefill)
        rows = []
        b = 16
        for n in mixed_lens:
            tasks = [asyncio.create_task(c) for c in _short_streams(s, url, t, rnd, b, 160)]
            await asyncio.sleep(0.6)
            t_in = time.perf_counter()
            long = await call(
                s, url + COMPLETIONS, _greedy(t, prompt=token_prompt(rnd, n, t.vocab), max_tokens=1)
            )
            t_out = time.perf_counter()
            runs = await asyncio.gather(*tasks)
            during = [g for r in runs for g in _itls(r, t_in, t_out + 0.05)]
            before = [g for r in runs for g in _itls(r, t_in - 0.4, t_in)]
            stalls = [max(_itls(r, t_in, t_out + 0.2) or [0.0]) for r in runs]
            rows.append(
                {
                    "prefill_tokens": n,
                    "batch": b,
                    "long_request_ms": round(long.e2e * 1000, 3),
                    "step_ms_before_p50": round(percentile(before, 50) * 1000, 3)
                    if before
                    else None,
                    "step_ms_during_max_p50": round(statistics.median(stalls) * 1000, 3),
                    "steps_during": round(
                        statistics.fmean([len(_itls(r, t_in, t_out)) for r in runs]), 1
                    ),
                    "itl_ms_during_p50": round(percentile(during, 50) * 1000, 3)
                    if during
                    else None,
                }
            )
        out["mixed"] = {"rows": rows}
        print(f"[calibrate] mixed {json.dumps(out['mixed'])}", flush=True)
    return out


# ------------------------------------------------------------------ vllm bench serve


def bench_serve(argv: list[str], bench_cmd: list[str] | None, log: Path) -> dict[str, Any]:
    """One `vllm bench serve` run; in this process when vLLM is importable (no start-up cost
    per run), else as `bench_cmd`. Returns vLLM's own result JSON."""
    if bench_cmd is None:
        from vllm.benchmarks.serve import add_cli_args, main
        from vllm.utils.argparse_utils import FlexibleArgumentParser

        parser = FlexibleArgumentParser()
        add_cli_args(parser)
        args = parser.parse_args(argv)
        with log.open("a") as f, contextlib.redirect_stdout(f), contextlib.redirect_stderr(f):
            result: dict[str, Any] = main(args)
        return result
    import subprocess
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        full = [
            *bench_cmd,
            *argv,
            "--save-result",
            "--result-dir",
            tmp,
            "--result-filename",
            "r.json",
        ]
        with log.open("a") as f:
            subprocess.run(full, stdout=f, stderr=subprocess.STDOUT, check=True)
        return json.loads((Path(tmp) / "r.json").read_text())  # type: ignore[no-any-return]


KEEP = (
    "completed",
    "failed",
    "duration",
    "request_throughput",
    "output_throughput",
    "request_goodput",
    "total_input_tokens",
    "total_output_tokens",
)


def bench_row(result: dict[str, Any]) -> dict[str, Any]:
    row = {k: result.get(k) for k in KEEP}
    for metric in ("ttft", "tpot", "itl", "e2el"):
        for stat in ("mean", "median", "p50", "p95", "p99"):
            key = f"{stat}_{metric}_ms"
            if key in result:
                row[key] = round(float(result[key]), 3)
    return row


async def _scrape(*urls: str) -> dict[str, float]:
    """The samples of these /metrics, summed (see engine_metrics), in a session of their own."""
    async with _session() as s:
        return await engine_metrics(s, urls)


def serve(
    t: Target,
    plan: list[tuple[str, str, int, int, int, float]],
    slo_ttft_ms: float,
    slo_tpot_ms: float,
    bench_cmd: list[str] | None,
) -> dict[str, Any]:
    """plan: (label, 'proxy'|'direct', input_len, output_len, num_prompts, rate)."""
    rows = []
    log = t.log_dir / "bench-serve.log"
    # one seed per workload: its proxy and direct runs get the same prompts, no two workloads do
    seeds = {label: n for n, label in enumerate(dict.fromkeys(row[0] for row in plan))}
    for label, where, n_in, n_out, num, rate in plan:
        base = t.proxy if where == "proxy" else t.decode
        argv = [
            "--backend",
            "vllm",
            "--base-url",
            base,
            "--model",
            t.model,
            "--tokenizer",
            t.tokenizer,
            "--dataset-name",
            "random",
            "--random-input-len",
            str(n_in),
            "--random-output-len",
            str(n_out),
            "--num-prompts",
            str(num),
            "--request-rate",
            str(rate),
            "--ignore-eos",
            "--seed",
            str(seeds[label]),
            "--percentile-metrics",
            "ttft,tpot,itl,e2el",
            "--metric-percentiles",
            "50,95,99",
            "--goodput",
            f"ttft:{slo_ttft_ms}",
            f"tpot:{slo_tpot_ms}",
        ]
        d0 = asyncio.run(_scrape(*t.all_engines()))
        p0 = asyncio.run(_scrape(t.proxy))
        started = time.time()
        result = bench_serve(argv, bench_cmd, log)
        d1 = asyncio.run(_scrape(*t.all_engines()))
        p1 = asyncio.run(_scrape(t.proxy))
        row: dict[str, Any] = {
            "label": label,
            "target": where,
            "input_len": n_in,
            "output_len": n_out,
            "num_prompts": num,
            "request_rate": rate,
            "wall_s": round(time.time() - started, 1),
            "command": "vllm bench serve " + " ".join(argv),
        }
        row.update(bench_row(result))
        if t.connector == "nixl":
            row["decoder_pulls"] = int(delta(d1, d0, NIXL_COUNT))
            row["kv"] = nixl_transfer_stats(d1, d0)
        proxied = delta(p1, p0, "pdproxy_disagg_decisions_total")
        if proxied:
            row["disagg_decisions"] = {
                k.partition("{")[2].rstrip("}"): int(v - p0.get(k, 0.0))
                for k, v in p1.items()
                if k.startswith("pdproxy_disagg_decisions_total{") and v != p0.get(k, 0.0)
            }
        row["proxy_recomputes"] = delta(p1, p0, "pdproxy_kv_recompute_total")
        row["proxy_fallbacks"] = delta(p1, p0, "pdproxy_prefill_fallbacks_total")
        rows.append(row)
        brief = {
            k: row.get(k)
            for k in (
                "label",
                "target",
                "completed",
                "failed",
                "median_ttft_ms",
                "p99_ttft_ms",
                "median_itl_ms",
                "p99_itl_ms",
                "request_goodput",
                "decoder_pulls",
            )
        }
        print(f"[serve {t.name}] {json.dumps(brief)}", flush=True)
    return {"rows": rows, "slo": {"ttft_ms": slo_ttft_ms, "tpot_ms": slo_tpot_ms}}


# ------------------------------------------------------------------ the proxy's own view


async def kv_health(t: Target) -> dict[str, Any]:
    async with _session() as s:
        stats = await get_json(s, t.proxy + "/stats")
        m = await metrics(s, t.proxy)
    log = (
        (t.log_dir / "proxy.log").read_text(errors="replace")
        if (t.log_dir / "proxy.log").exists()
        else ""
    )
    warnings = [line for line in log.splitlines() if "WARNING" in line and "KV transfer to" in line]
    return {
        "stats_kv_transfer": stats.get("kv_transfer"),
        "gauges": {k: v for k, v in m.items() if k.startswith("pdproxy_kv_transfer")},
        "warnings": warnings[-3:],
        "warning_count": len(warnings),
    }
