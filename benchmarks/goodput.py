"""Goodput of the routing policies: requests per second that meet the TTFT and ITL SLOs.

Two simulated prefillers and two simulated decoders with the realistic timing model (H100-like,
`--speed-factor 1`), vLLM's automatic prefix caching on, `--max-num-seqs 16` (a small batch, so
that queues form at rates this 2-core machine can drive). A Poisson stream of a mixed workload,
seeded and the same for every configuration:

  short      a short chat turn (40-150 words), no system prompt        20%
  system     one of 8 shared system prompts (~1200 words) + a question  35%
  long       a long unique document (2500-5000 words) + a question      15%
  follow-up  the next turn of an earlier conversation (its history, the answer it got, and a
             new question), sent once the previous turn has finished    30%

Another tenant (--tenant-streams long streams sent straight to decoder 0, as another proxy or
client would) keeps decoder 0 busy, which the proxy's own in-flight counts cannot see.

Configurations (prefill policy / decode policy / conditional disaggregation):
  round_robin    round_robin / round_robin / off          (the baseline)
  load_aware     round_robin / load_aware / off
  prefix_aware   prefix_aware / round_robin / off
  conditional    round_robin / round_robin / on
  combined       prefix_aware / prefix_aware (load-bounded by the engines' counts) / on
  combined-events  combined, with the exact prefix index from the engines' KV-cache events
                 (kv_events; the simulators publish them) instead of the estimate
  combined-oracle  combined, every lookup of the exact index answered by the engines themselves
                 at that moment (what each one's prefix cache holds: benchmarks/oracle_proxy.py),
                 the reference for the index's hit rate
  vllm-router    vllm-router --policy cache_aware (if installed; see benchmarks/overhead.py)

Each configuration's prefix-cache hit rate is the engines' own: vllm:prefix_cache_hits_total over
vllm:prefix_cache_queries_total, summed over the four engines for the whole run.

A request meets the SLO when it completes, its TTFT <= --ttft-slo and its mean inter-token
latency <= --itl-slo. Goodput = such requests per second of the arrival window.

    python benchmarks/goodput.py            # ~10 min on 2 cores
    python benchmarks/goodput.py --quick    # ~3 min

Results: benchmarks/results/goodput.{md,json} and goodput.png, goodput_ttft.png.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (
    RESULTS,
    Proc,
    Procs,
    chat_body,
    free_port,
    new_session,
    percentile,
    provenance,
    vllm_router_argv,
)
from pdsim.tokenizer import WORDS

CHAT = "/v1/chat/completions"
CONFIGS: dict[str, dict[str, Any]] = {
    "round_robin": {"prefill_policy": "round_robin", "decode_policy": "round_robin"},
    "load_aware": {"prefill_policy": "round_robin", "decode_policy": "load_aware"},
    "prefix_aware": {"prefill_policy": "prefix_aware", "decode_policy": "round_robin"},
    "conditional": {
        "prefill_policy": "round_robin",
        "decode_policy": "round_robin",
        "conditional_disagg": {"enabled": True},
    },
    "combined": {
        "prefill_policy": "prefix_aware",
        "decode_policy": "prefix_aware",
        "conditional_disagg": {"enabled": True},
    },
    "combined-events": {
        "prefill_policy": "prefix_aware",
        "decode_policy": "prefix_aware",
        "conditional_disagg": {"enabled": True},
        "kv_events": {"enabled": True},  # each engine's sockets are added at start
    },
    "combined-oracle": {  # run by benchmarks/oracle_proxy.py
        "prefill_policy": "prefix_aware",
        "decode_policy": "prefix_aware",
        "conditional_disagg": {"enabled": True},
        "kv_events": {"enabled": True},
    },
}
ORACLE = Path(__file__).resolve().parent / "oracle_proxy.py"


# -- workload -------------------------------------------------------------------------------


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n)) + "."


@dataclass
class Session:
    messages: list[dict[str, str]]
    busy: bool = False


@dataclass
class Workload:
    rng: random.Random
    systems: list[str]
    sessions: list[Session] = field(default_factory=list)

    @classmethod
    def make(cls, seed: int) -> Workload:
        rng = random.Random(seed)
        return cls(rng, [words(rng, 1200) for _ in range(8)])

    def next(self) -> tuple[str, list[dict[str, str]], int, Session | None]:
        """(kind, messages, max_tokens, session to extend with the answer)."""
        r, rng = self.rng.random(), self.rng
        if r < 0.20:
            return (
                "short",
                [{"role": "user", "content": words(rng, rng.randint(40, 150))}],
                (rng.randint(32, 128)),
                None,
            )
        if r < 0.55 or (r >= 0.70 and not any(not s.busy for s in self.sessions)):
            messages = [
                {"role": "system", "content": rng.choice(self.systems)},
                {"role": "user", "content": words(rng, rng.randint(20, 60))},
            ]
            session = Session(list(messages))
            self.sessions.append(session)
            return "system", messages, rng.randint(64, 256), session
        if r < 0.70:
            doc = words(rng, rng.randint(2500, 5000))
            question = words(rng, 20)
            return (
                "long",
                [{"role": "user", "content": doc + " " + question}],
                (rng.randint(64, 128)),
                None,
            )
        session = rng.choice([s for s in self.sessions if not s.busy])
        session.messages.append({"role": "user", "content": words(rng, rng.randint(20, 60))})
        return "follow-up", list(session.messages), rng.randint(64, 192), session


# -- client ---------------------------------------------------------------------------------


@dataclass(slots=True)
class Result:
    kind: str
    ok: bool
    ttft: float = 0.0
    itl: float = 0.0
    e2e: float = 0.0
    tokens: int = 0


async def stream_chat(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], timeout: float
) -> tuple[Result, str]:
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = 0
    text: list[str] = []
    buf = b""
    try:
        async with asyncio.timeout(timeout):
            async with session.post(url + CHAT, data=orjson.dumps(body)) as resp:
                if resp.status != 200:
                    await resp.read()
                    return Result("", False), ""
                async for data in resp.content.iter_any():
                    now = time.perf_counter()
                    buf += data
                    *events, buf = buf.split(b"\n\n")
                    for event in events:
                        if not event.startswith(b"data: {"):
                            continue
                        parsed = orjson.loads(event[6:])
                        for choice in parsed.get("choices") or ():
                            content = (choice.get("delta") or {}).get("content")
                            if content:
                                text.append(content)
                                tokens += 1
                                first = first or now
                                last = now
    except (aiohttp.ClientError, TimeoutError, OSError, orjson.JSONDecodeError):
        return Result("", False), ""
    if not first:
        return Result("", False), ""
    itl = (last - first) / (tokens - 1) if tokens > 1 else 0.0
    return Result("", True, first - t0, itl, time.perf_counter() - t0, tokens), "".join(text)


async def tenant(url: str, streams: int, stop: asyncio.Event) -> None:
    """Another tenant's long streams, straight to one decoder, for as long as `stop` is unset."""
    rng = random.Random(7)
    async with new_session() as session:

        async def one() -> None:
            while not stop.is_set():
                body = chat_body(words(rng, 50), 1024)
                await stream_chat(session, url, body, 120)

        await asyncio.gather(*(one() for _ in range(streams)))


async def run_rate(
    url: str, rate: float, duration: float, seed: int, timeout: float
) -> list[Result]:
    workload = Workload.make(seed)
    rng = random.Random(seed + 1)
    results: list[Result] = []
    tasks: list[asyncio.Task[None]] = []
    async with new_session() as session:

        async def send(
            kind: str, messages: list[dict[str, str]], max_tokens: int, s: Session | None
        ) -> None:
            if s is not None:
                s.busy = True
            body = chat_body("", max_tokens)
            body["messages"] = messages
            result, text = await stream_chat(session, url, body, timeout)
            result.kind = kind
            results.append(result)
            if s is not None:
                if result.ok:
                    s.messages.append({"role": "assistant", "content": text})
                else:
                    s.messages.pop()  # the turn failed: the next one asks again
                s.busy = False

        start = time.perf_counter()
        at = 0.0
        while True:
            at += rng.expovariate(rate)
            if at >= duration:
                break
            delay = start + at - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(send(*workload.next())))
        await asyncio.gather(*tasks)
    return results


def summarise(
    results: list[Result], duration: float, ttft_slo: float, itl_slo: float
) -> dict[str, Any]:
    ok = [r for r in results if r.ok]
    good = [r for r in ok if r.ttft <= ttft_slo and r.itl <= itl_slo]
    ttft = [r.ttft for r in ok]
    itl = [r.itl for r in ok if r.tokens > 1]
    by_kind = {}
    for kind in ("short", "system", "long", "follow-up"):
        mine = [r.ttft for r in ok if r.kind == kind]
        by_kind[kind] = percentile(mine, 50) * 1e3 if mine else None
    return {
        "sent": len(results),
        "failed": len(results) - len(ok),
        "goodput": len(good) / duration,
        "slo_met_share": len(good) / len(results) if results else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p90_ms": percentile(ttft, 90) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
        "ttft_p50_ms_by_kind": by_kind,
    }


# -- topology -------------------------------------------------------------------------------

ENGINE_ARGS = ["--speed-factor", "1", "--enable-prefix-caching", "--max-num-seqs", "16"]


def start_engines(
    procs: Procs, events: bool = False
) -> tuple[list[Proc], list[Proc], dict[str, Any]]:
    """Two prefillers, two decoders and, with `events`, each one's KV-event sockets as the
    proxy's kv_events.endpoints (the engines connect to the proxy's bound socket)."""
    engines: dict[str, list[Proc]] = {"prefill": [], "decode": []}
    endpoints: dict[str, Any] = {}
    for role, i in (("prefill", 0), ("prefill", 1), ("decode", 0), ("decode", 1)):
        extra: list[str] = []
        pub, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
        if events:
            config = {"enable_kv_cache_events": True, "endpoint": pub, "replay_endpoint": replay}
            extra = ["--kv-events-config", json.dumps(config)]
        sim = procs.sim(f"{role}{i}", None, "--role", role, *ENGINE_ARGS, *extra)
        engines[role].append(sim)
        endpoints[sim.url] = {"publisher": pub, "replay": replay}
    return engines["prefill"], engines["decode"], endpoints if events else {}


async def decisions(router: Proc) -> dict[str, float]:
    """The proxy's pdproxy_disagg_decisions_total, by decision/reason."""
    out: dict[str, float] = {}
    async with new_session() as session, session.get(router.url + "/metrics") as resp:
        for line in (await resp.text()).splitlines():
            if line.startswith("pdproxy_disagg_decisions_total{"):
                labels, value = line.rsplit(" ", 1)
                out[labels.partition("{")[2].rstrip("}")] = float(value)
    return out


async def hit_rate(engines: list[Proc]) -> float | None:
    """The engines' prefix-cache hits over queries, summed."""
    hits = queries = 0.0
    async with new_session() as session:
        for proc in engines:
            async with session.get(proc.url + "/metrics") as resp:
                for line in (await resp.text()).splitlines():
                    if line.startswith("vllm:prefix_cache_hits_total"):
                        hits += float(line.split()[-1])
                    elif line.startswith("vllm:prefix_cache_queries_total"):
                        queries += float(line.split()[-1])
    return hits / queries if queries else None


def start_router(
    procs: Procs,
    name: str,
    prefill: list[Proc],
    decode: list[Proc],
    args: argparse.Namespace,
    endpoints: dict[str, Any] | None = None,
) -> Proc:
    if name == "vllm-router":
        venv = Path(args.routers_venv)
        port = free_port()
        urls = ([p.url for p in prefill], [d.url for d in decode])
        argv = vllm_router_argv(venv / "bin" / "vllm-router", *urls, port, "cache_aware")
        return procs.start(name, argv, f"http://127.0.0.1:{port}", None)
    config = {
        "prefill": [p.url for p in prefill],
        "decode": [d.url for d in decode],
        "stats": {"interval": 0},
        "log_level": "warning",
        **CONFIGS[name],
    }
    if endpoints:
        config["kv_events"] = {"enabled": True, "endpoints": endpoints}
    path = procs.logdir / f"{name}.yaml"
    path.write_text(json.dumps(config))  # JSON is YAML
    if name == "combined-oracle":
        port = free_port()
        argv = [sys.executable, str(ORACLE), "serve", "--port", str(port), "--config", str(path)]
        return procs.start(name, argv, f"http://127.0.0.1:{port}", None, ready="/metrics")
    return procs.pdproxy(name, None, [], [], "--config", str(path))


async def run_config(name: str, args: argparse.Namespace, logdir: Path) -> dict[str, Any]:
    procs = Procs(logdir / name)
    procs.logdir.mkdir(parents=True, exist_ok=True)
    try:
        events = bool(CONFIGS.get(name, {}).get("kv_events"))
        prefill, decode, endpoints = start_engines(procs, events)
        router = start_router(procs, name, prefill, decode, args, endpoints)
        stop = asyncio.Event()
        background = asyncio.create_task(tenant(decode[0].url, args.tenant_streams, stop))
        await asyncio.sleep(2.0)  # the tenant's streams are running
        rows: dict[str, Any] = {}
        for rate in args.rates:
            results = await run_rate(router.url, rate, args.duration, args.seed, args.timeout)
            rows[f"{rate:g}"] = summarise(results, args.duration, args.ttft_slo, args.itl_slo)
            r = rows[f"{rate:g}"]
            print(
                f"{name:>13} rate {rate:>5g}: goodput {r['goodput']:.2f}/s "
                f"({r['slo_met_share']:.0%} in SLO, {r['failed']} failed) "
                f"TTFT p50 {r['ttft_p50_ms']:.0f} p99 {r['ttft_p99_ms']:.0f} ms "
                f"ITL p50 {r['itl_p50_ms']:.1f} ms",
                flush=True,
            )
        stop.set()
        background.cancel()
        rows["prefix_hit_rate"] = await hit_rate([*prefill, *decode])
        rows["decisions"] = await decisions(router) if name != "vllm-router" else {}
        if name == "combined-oracle":  # the index from the events against the engines
            async with new_session() as s, s.get(router.url + "/oracle/tally") as resp:
                rows["index_vs_engines"] = await resp.json()
            print(f"{name:>13} index vs engines {rows['index_vs_engines']}", flush=True)
        print(f"{name:>13} prefix-cache hit rate {rows['prefix_hit_rate']}", flush=True)
        print(f"{name:>13} decisions {rows['decisions']}", flush=True)
        return rows
    finally:
        procs.stop_all()


# -- output ---------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    prov = result["provenance"]
    rates = result["rates"]
    configs = result["configs"]
    lines = [
        "# Goodput by routing policy (simulated engines, realistic timing)",
        "",
        f"- command: `{prov['command']}`",
        f"- date: {prov['date']}; pdproxy {prov['pdproxy']}, Python {prov['python']}",
        f"- machine: {prov['machine']}",
        f"- 2 prefillers + 2 decoders (sim, H100-like timing, prefix caching, max 16 seqs); "
        f"another tenant keeps {result['tenant_streams']} streams on decoder 0",
        f"- SLO: TTFT <= {result['ttft_slo'] * 1e3:.0f} ms and mean ITL <= "
        f"{result['itl_slo'] * 1e3:.0f} ms; {result['duration']:g} s of Poisson arrivals per "
        "rate; the same seeded workload for every configuration",
        "",
        "## Goodput (requests/s meeting the SLO)",
        "",
        "| config | " + " | ".join(f"{r:g} req/s" for r in rates) + " |",
        "|---|" + "---|" * len(rates),
    ]
    for name, rows in configs.items():
        cells = []
        for r in rates:
            row = rows[f"{r:g}"]
            base = configs.get("round_robin", {}).get(f"{r:g}")
            delta = ""
            if base and name != "round_robin" and base["goodput"] > 0:
                delta = f" ({(row['goodput'] / base['goodput'] - 1) * 100:+.0f}%)"
            cells.append(f"{row['goodput']:.2f}{delta}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## TTFT p50 / p99 (ms), ITL p50 (ms), failed", ""]
    lines += ["| config | " + " | ".join(f"{r:g} req/s" for r in rates) + " |"]
    lines += ["|---|" + "---|" * len(rates)]
    for name, rows in configs.items():
        cells = [
            f"{rows[f'{r:g}']['ttft_p50_ms']:.0f} / {rows[f'{r:g}']['ttft_p99_ms']:.0f}, "
            f"{rows[f'{r:g}']['itl_p50_ms']:.1f}, {rows[f'{r:g}']['failed']}"
            for r in rates
        ]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "## TTFT p50 by request kind (ms), at the highest rate", ""]
    top = f"{rates[-1]:g}"
    kinds = ("short", "system", "long", "follow-up")
    lines += ["| config | " + " | ".join(kinds) + " |", "|---|" + "---|" * len(kinds)]
    for name, rows in configs.items():
        by = rows[top]["ttft_p50_ms_by_kind"]
        lines.append(
            f"| {name} | "
            + " | ".join("-" if by[k] is None else f"{by[k]:.0f}" for k in kinds)
            + " |"
        )
    lines += ["", "## The engines' prefix-cache hit rate (hits / queries, whole run)", ""]
    lines += ["| config | hit rate |", "|---|---|"]
    for name, rows in configs.items():
        rate = rows.get("prefix_hit_rate")
        lines.append(f"| {name} | {'-' if rate is None else f'{rate:.1%}'} |")
    lines += render_exact(configs, rates)
    lines += ["", "Plots: goodput.png (goodput vs rate), goodput_ttft.png (TTFT p50/p99 vs rate)."]
    return "\n".join(lines)


EXACT = ("combined", "combined-events", "combined-oracle")


def render_exact(configs: dict[str, Any], rates: list[float]) -> list[str]:
    """The estimate, the index from the events and the oracle side by side, if all ran."""
    if not all(name in configs for name in EXACT):
        return []
    oracle = configs["combined-oracle"]["prefix_hit_rate"]
    lines = [
        "",
        "## The prefix index: estimate (combined), events (combined-events), oracle",
        "",
        "| | hit rate | vs oracle (points) | "
        + " | ".join(f"goodput {r:g}" for r in rates)
        + " | "
        + " | ".join(f"TTFT p50/p99 {r:g}" for r in rates)
        + " |",
        "|---|---|---|" + "---|" * (2 * len(rates)),
    ]
    for name, label in zip(EXACT, ("estimate", "events", "oracle"), strict=True):
        rows = configs[name]
        hit = rows["prefix_hit_rate"]
        diff = "-" if hit is None or oracle is None else f"{(hit - oracle) * 100:+.1f}"
        cells = [f"{rows[f'{r:g}']['goodput']:.2f}" for r in rates]
        cells += [
            f"{rows[f'{r:g}']['ttft_p50_ms']:.0f} / {rows[f'{r:g}']['ttft_p99_ms']:.0f}"
            for r in rates
        ]
        shown = "-" if hit is None else f"{hit:.1%}"
        lines.append(f"| {label} | {shown} | {diff} | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(
        "The oracle asks every engine what it holds for each request (one more round trip "
        "before placement), so its TTFT carries that cost; its hit rate is the reference. Each "
        "configuration is its own run of the same seeded workload (arrival times and follow-up "
        "turns depend on the answers' timing), so hit rates differ by that too."
    )
    t = configs["combined-oracle"].get("index_vs_engines")
    if t and t["lookups"]:
        lines += [
            "",
            "In the oracle's run, the index from the events answered the same lookups beside it: "
            f"{t['lookups']} (request, engine) lookups, {t['exact']} exact "
            f"({t['exact'] / t['lookups']:.1%}); it counted {t['indexed_tokens']} cached tokens "
            f"where the engines held {t['held_tokens']} "
            f"({t['indexed_tokens'] / max(1, t['held_tokens']):.1%}), "
            f"{t['over_tokens']} of them claimed beyond what an engine held.",
        ]
    return lines


def plot(result: dict[str, Any], stem: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rates = result["rates"]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for name, rows in result["configs"].items():
        ax.plot(rates, [rows[f"{r:g}"]["goodput"] for r in rates], marker="o", label=name)
    ax.plot(rates, rates, ls=":", color="grey", label="offered load")
    ax.set_xlabel("request rate (req/s)")
    ax.set_ylabel("goodput (req/s in SLO)")
    slo = f"TTFT <= {result['ttft_slo'] * 1e3:.0f} ms, ITL <= {result['itl_slo'] * 1e3:.0f} ms"
    ax.set_title(f"Goodput: {slo}")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(stem.parent / (stem.name + ".png"), dpi=110)
    plt.close(fig)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), sharex=True)
    for q, ax in zip(("p50", "p99"), axes, strict=True):
        for name, rows in result["configs"].items():
            ax.plot(rates, [rows[f"{r:g}"][f"ttft_{q}_ms"] for r in rates], marker="o", label=name)
        ax.set_yscale("log")
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel(f"TTFT {q} (ms)")
        ax.grid(alpha=0.3, which="both")
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(stem.parent / (stem.name + "_ttft.png"), dpi=110)
    plt.close(fig)


def _exit_on_term(*_: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rates", type=float, nargs="+", default=[4, 8, 12, 16])
    p.add_argument("--duration", type=float, default=15, help="seconds of arrivals per rate")
    p.add_argument("--configs", nargs="+", default=[*CONFIGS, "vllm-router"])
    p.add_argument("--ttft-slo", type=float, default=1.0, help="seconds")
    p.add_argument("--itl-slo", type=float, default=0.05, help="seconds (mean per request)")
    p.add_argument("--tenant-streams", type=int, default=12)
    p.add_argument("--timeout", type=float, default=60, help="client timeout per request")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--routers-venv", default=".bench-routers")
    p.add_argument("--quick", action="store_true", help="3 rates x 6 s (~3 min)")
    p.add_argument("--out", default=str(RESULTS / "goodput"), help="results path stem")
    args = p.parse_args(argv)
    if args.quick:
        args.rates, args.duration = [4, 10, 16], 6
    if not (Path(args.routers_venv) / "bin" / "vllm-router").exists():
        args.configs = [c for c in args.configs if c != "vllm-router"]
    return args


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)  # so `finally` stops every process started
    args = parse_args(argv)
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-goodput-"))
    configs: dict[str, Any] = {}
    for name in args.configs:
        configs[name] = asyncio.run(run_config(name, args, logdir))
    result = {
        "provenance": provenance([Path(sys.executable).name, *sys.argv]),
        "rates": args.rates,
        "duration": args.duration,
        "ttft_slo": args.ttft_slo,
        "itl_slo": args.itl_slo,
        "tenant_streams": args.tenant_streams,
        "logs": str(logdir),
        "configs": configs,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    try:
        plot(result, stem)
    except ImportError:  # matplotlib is the bench extra's
        result["plots"] = "not drawn: matplotlib is not installed (pip install -e '.[bench]')"
    text = render(result)
    if "plots" in result:
        text = text.replace("Plots: goodput.png", f"Plots ({result['plots']}): goodput.png")
    stem.with_suffix(".md").write_text(text + "\n")
    print(text)
    print(f"\nwrote {stem}.md, {stem}.json, {stem}.png, {stem}_ttft.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
