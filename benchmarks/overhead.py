"""What a PD proxy adds: TTFT, end-to-end time and CPU per request, against the floor.

Simulated engines with zero delay (`--speed-factor 0 --token-per-chunk`: each of the 64 tokens is
its own SSE event), and in the same run, interleaved and repeated:

  direct        the client calls the decoder alone (no prefill leg)
  floor         the client calls the prefiller, then the decoder, itself, with the bodies
                pdproxy would send (the least any PD proxy can cost)
  pdproxy       through pdproxy
  vllm-router   through `vllm-router --vllm-pd-disaggregation --kv-connector nixl` (if installed)
  sglang-router through `sglang_router.launch_router --pd-disaggregation` (if installed; SGLang's
                bootstrap protocol: both legs at once, no kv_transfer_params, see the notes)

The proxy under test runs alone on CPU 0 (taskset); engines and this client share CPU 1. The
proxy's CPU per request is read from /proc/<pid>/stat (utime + stime, all threads) around each
batch. Scenarios:

  overhead      concurrency 1, 64 and 256, streaming 64 tokens, --rounds rounds
  latency       concurrency 1, --latency-requests requests per mode: pdproxy vs direct vs floor
  open-streams  --open-streams streams held open on a slow decoder (20 ms per token): TTFT
  kv-index      pdproxy with the exact prefix index (kv_events) off and on, same engines and
                requests (each a new prompt, so every one stores blocks): CPU per request, ratio

    python benchmarks/overhead.py                    # all scenarios, ~5 min on 2 cores
    python benchmarks/overhead.py --quick            # small, ~1 min
    python benchmarks/overhead.py --scenario latency --latency-requests 500

Routers: `python3 -m venv .bench-routers && .bench-routers/bin/pip install vllm-router
sglang-router` (or --routers-venv DIR). Results: benchmarks/results/overhead.{md,json}.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
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
    Sample,
    chat_body,
    cpu_seconds,
    drop_worktree,
    free_port,
    new_session,
    pd_router_argv,
    percentile,
    pin_self,
    provenance,
    provenance_lines,
    stream_once,
    vllm_router_argv,
    worktree,
)
from proxy.engines.connectors.nixl import prefill_body

CHAT = "/v1/chat/completions"
PROXY_CPU = "0"
PDPROXY_ARGS = ("--stats-interval", "0", "--log-level", "warning")  # current and baselines
ENGINE_CPU = "1"
PROMPT = (
    "You are a helpful assistant. Summarise the following paragraph in one sentence. "
    "The river turned toward the sea before the city, and the people there knew its water well. "
    "Every morning the children went down to the river to play, and their mothers told them "
    "stories of the great sea beyond the hills."
)
Sender = Callable[[aiohttp.ClientSession], Awaitable[Sample]]


@dataclass
class Target:
    """One way of serving a request; `pid` is the proxy whose CPU is counted, if any."""

    name: str
    send: Sender
    pid: int | None = None
    note: str = ""


@dataclass
class Batch:
    samples: list[Sample] = field(default_factory=list)
    wall: float = 0.0
    cpu: float | None = None


def _targets(
    procs: Procs, prefill: Proc, decode: Proc, tokens: int, args: argparse.Namespace
) -> list[Target]:
    body = chat_body(PROMPT, tokens)
    raw = orjson.dumps(body)
    pre = orjson.dumps(prefill_body(body))

    async def direct(session: aiohttp.ClientSession) -> Sample:
        return await stream_once(session, decode.url + CHAT, raw)

    async def floor(session: aiohttp.ClientSession) -> Sample:
        rid = {"X-Request-Id": f"floor-{uuid.uuid4().hex}"}
        t0 = time.perf_counter()
        async with session.post(prefill.url + CHAT, data=pre, headers=rid) as resp:
            answer = await resp.read()
        params = orjson.loads(answer)["kv_transfer_params"]
        leg = orjson.dumps({**body, "kv_transfer_params": params})
        return await stream_once(session, decode.url + CHAT, leg, rid, start=t0)

    def through(url: str) -> Sender:
        async def send(session: aiohttp.ClientSession) -> Sample:
            return await stream_once(session, url + CHAT, raw)

        return send

    targets = [Target("direct", direct), Target("floor", floor)]
    if "pdproxy" not in args.skip:
        proxy = procs.pdproxy("pdproxy", PROXY_CPU, [prefill.url], [decode.url], *PDPROXY_ARGS)
        targets.append(Target("pdproxy", through(proxy.url), proxy.pid))
    for ref, src in args.baseline_src.items():
        label = ref.rstrip("/").rsplit("/", 1)[-1]
        base = procs.pdproxy(
            f"pdproxy@{label}", PROXY_CPU, [prefill.url], [decode.url], *PDPROXY_ARGS, src=src
        )
        targets.append(
            Target(f"pdproxy@{label}", through(base.url), base.pid, f"pdproxy as of {ref}")
        )
    venv = Path(args.routers_venv)
    vllm_router = venv / "bin" / "vllm-router"
    if vllm_router.exists() and "vllm-router" not in args.skip:
        port = free_port()
        argv = vllm_router_argv(vllm_router, [prefill.url], [decode.url], port, "round_robin")
        router = procs.start("vllm-router", argv, f"http://127.0.0.1:{port}", PROXY_CPU)
        targets.append(Target("vllm-router", through(router.url), router.pid))
    sglang_py = venv / "bin" / "python"
    has_sglang = (
        sglang_py.exists()
        and "sglang-router" not in args.skip
        and subprocess.run(
            [str(sglang_py), "-c", "import sglang_router"], capture_output=True
        ).returncode
        == 0
    )
    if has_sglang:
        port = free_port()
        program = [str(sglang_py), "-m", "sglang_router.launch_router", "--pd-disaggregation"]
        argv = pd_router_argv(program, [prefill.url], [decode.url], port, "round_robin", "warn")
        router = procs.start("sglang-router", argv, f"http://127.0.0.1:{port}", PROXY_CPU)
        targets.append(
            Target(
                "sglang-router",
                through(router.url),
                router.pid,
                "SGLang bootstrap protocol: sends both legs at once, no kv_transfer_params",
            )
        )
    return targets


async def run_batch(target: Target, concurrency: int, requests: int) -> Batch:
    per_worker = max(1, requests // concurrency)
    batch = Batch()
    async with new_session() as session:

        async def worker() -> None:
            for _ in range(per_worker):
                batch.samples.append(await target.send(session))

        cpu0 = cpu_seconds(target.pid) if target.pid else None
        t0 = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        batch.wall = time.perf_counter() - t0
        if target.pid and cpu0 is not None:
            batch.cpu = cpu_seconds(target.pid) - cpu0
    return batch


def summarise(batches: list[Batch]) -> dict[str, Any]:
    ok = [s for b in batches for s in b.samples if s.ok]
    failed = sum(1 for b in batches for s in b.samples if not s.ok)
    errors = sorted({s.error for b in batches for s in b.samples if not s.ok})[:3]
    rates = sorted(sum(1 for s in b.samples if s.ok) / b.wall for b in batches if b.wall)
    chunk_rates = sorted(sum(s.events for s in b.samples if s.ok) / b.wall for b in batches)
    cpu = [b.cpu for b in batches if b.cpu is not None]
    n = sum(len(b.samples) for b in batches)
    ttft = [s.ttft for s in ok]
    e2e = [s.e2e for s in ok]
    return {
        "requests": n,
        "failed": failed,
        "errors": errors,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "e2e_p50_ms": percentile(e2e, 50) * 1e3,
        "e2e_p99_ms": percentile(e2e, 99) * 1e3,
        "req_per_s": rates[len(rates) // 2] if rates else 0.0,
        "chunks_per_s": chunk_rates[len(chunk_rates) // 2] if chunk_rates else 0.0,
        "proxy_cpu_us_per_req": sum(cpu) / n * 1e6 if cpu and n else None,
    }


async def interleaved(
    targets: list[Target], concurrency: int, requests: int, rounds: int
) -> dict[str, dict[str, Any]]:
    """Each round runs every target once, in a rotated order, so drift hits all alike."""
    batches: dict[str, list[Batch]] = {t.name: [] for t in targets}
    for r in range(rounds):
        shift = r % len(targets)
        for target in targets[shift:] + targets[:shift]:
            batches[target.name].append(await run_batch(target, concurrency, requests))
    return {name: summarise(b) for name, b in batches.items()}


def with_added(rows: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    floor, direct = rows.get("floor"), rows.get("direct")
    for row in rows.values():
        for base_name, base in (("floor", floor), ("direct", direct)):
            if base is None:
                continue
            for key in ("ttft_p50_ms", "ttft_p99_ms", "e2e_p50_ms", "e2e_p99_ms"):
                row[f"{key.removesuffix('_ms')}_vs_{base_name}_ms"] = row[key] - base[key]
    return rows


async def warm(targets: list[Target], n: int) -> None:
    for target in targets:
        await run_batch(target, 8, n)


def _start_engines(procs: Procs, slow_decoder: bool) -> tuple[Proc, Proc]:
    zero = ["--speed-factor", "0", "--token-per-chunk"]
    prefill = procs.sim("prefill", ENGINE_CPU, "--role", "prefill", *zero)
    if slow_decoder:
        timing = ["--speed-factor", "1", "--decode-base-ms", "20", "--decode-ms-per-seq", "0"]
        timing += ["--prefill-overhead-ms", "0", "--prefill-ms-per-token", "0"]
        timing += ["--xfer-overhead-ms", "0", "--xfer-ms-per-block", "0"]
        decode = procs.sim("decode", ENGINE_CPU, "--role", "decode", *timing)
    else:
        decode = procs.sim("decode", ENGINE_CPU, "--role", "decode", *zero)
    return prefill, decode


async def scenario_overhead(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    prefill, decode = _start_engines(procs, slow_decoder=False)
    targets = _targets(procs, prefill, decode, args.tokens, args)
    await warm(targets, 64)
    out: dict[str, Any] = {
        "notes": {t.name: t.note for t in targets if t.note},
        "by_concurrency": {},
    }
    for conc in args.concurrency:
        requests = max(conc * args.per_worker, args.min_requests if conc == 1 else 0)
        rows = await interleaved(targets, conc, requests, args.rounds)
        out["by_concurrency"][str(conc)] = with_added(rows)
        print(f"concurrency {conc}: " + _brief(rows), flush=True)
    procs.stop_all()
    return out


async def scenario_latency(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    prefill, decode = _start_engines(procs, slow_decoder=False)
    targets = [
        t
        for t in _targets(procs, prefill, decode, args.tokens, args)
        if t.name in ("direct", "floor", "pdproxy") or t.name.startswith("pdproxy@")
    ]
    await warm(targets, 64)
    block = 50
    rounds = max(1, -(-args.latency_requests // block))
    rows = with_added(await interleaved(targets, 1, block, rounds))
    print("latency: " + _brief(rows), flush=True)
    procs.stop_all()
    return {"requests_per_mode": rounds * block, "rows": rows}


async def scenario_open_streams(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    prefill, decode = _start_engines(procs, slow_decoder=True)
    targets = _targets(procs, prefill, decode, args.tokens, args)
    await warm(targets, 16)
    conc = args.open_streams
    rows = with_added(await interleaved(targets, conc, conc * 2, 1))
    print(f"open streams {conc}: " + _brief(rows), flush=True)
    procs.stop_all()
    return {"streams": conc, "decoder_ms_per_token": 20, "rows": rows}


async def scenario_kv_index(procs: Procs, args: argparse.Namespace) -> dict[str, Any]:
    """The exact prefix index's cost: pdproxy with kv_events off and on, the same engines
    (prefix caching, KV events on ipc:// sockets they bind), the same requests: each a new
    prompt (a unique first line before PROMPT), so every request stores blocks on both engines
    and, once their caches are full, evicts some: the proxy with the index applies those
    events and asks the decoder's /tokenize for every request."""
    endpoints: dict[str, Any] = {}
    engines: dict[str, Proc] = {}
    for role in ("prefill", "decode"):
        pub, replay = f"ipc://{procs.logdir}/{role}-kv-events", f"tcp://127.0.0.1:{free_port()}"
        events = {"enable_kv_cache_events": True, "endpoint": pub, "replay_endpoint": replay}
        engines[role] = procs.sim(
            f"{role}-kv", ENGINE_CPU, "--role", role, "--speed-factor", "0", "--token-per-chunk",
            "--enable-prefix-caching", "--kv-events-config", json.dumps(events),
        )  # fmt: skip
        endpoints[engines[role].url] = {"publisher": pub, "replay": replay, "bind": False}

    def proxy(name: str, index: bool) -> Proc:
        config: dict[str, Any] = {"prefill": [engines["prefill"].url]}
        config["decode"] = [engines["decode"].url]
        if index:
            config["kv_events"] = {"enabled": True, "endpoints": endpoints}
        path = procs.logdir / f"{name}.json"
        path.write_text(json.dumps(config))  # JSON is YAML
        return procs.pdproxy(name, PROXY_CPU, [], [], *PDPROXY_ARGS, "--config", str(path))

    def unique(url: str) -> Sender:
        async def send(session: aiohttp.ClientSession) -> Sample:
            body = chat_body(f"Request {uuid.uuid4().hex}. {PROMPT}", args.tokens)
            return await stream_once(session, url + CHAT, orjson.dumps(body))

        return send

    off, on = proxy("pdproxy-index-off", False), proxy("pdproxy-index-on", True)
    targets = [Target("index off", unique(off.url), off.pid)]
    targets.append(Target("index on", unique(on.url), on.pid))
    await warm(targets, 64)
    out: dict[str, Any] = {"by_concurrency": {}}
    for conc in args.concurrency:
        requests = max(conc * args.per_worker, args.min_requests if conc == 1 else 0)
        rows = await interleaved(targets, conc, requests, args.rounds)
        cpu_on, cpu_off = (rows[n]["proxy_cpu_us_per_req"] for n in ("index on", "index off"))
        ratio = cpu_on / cpu_off if cpu_on and cpu_off else None
        out["by_concurrency"][str(conc)] = {"rows": rows, "cpu_ratio_on_off": ratio}
        print(f"kv index, concurrency {conc}: " + _brief(rows) + f" ratio {ratio}", flush=True)
    async with new_session() as session, session.get(on.url + "/admin/prefix-index") as resp:
        out["index"] = (await resp.json())["engines"]  # what the index saw: batches, blocks
    procs.stop_all()
    return out


def _brief(rows: dict[str, dict[str, Any]]) -> str:
    return "  ".join(
        f"{name} ttft50={r['ttft_p50_ms']:.2f}ms rps={r['req_per_s']:.0f}"
        + (f" cpu={r['proxy_cpu_us_per_req']:.0f}us" if r["proxy_cpu_us_per_req"] else "")
        for name, r in rows.items()
    )


def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def render(result: dict[str, Any]) -> str:
    prov = result["provenance"]
    lines = [
        "# Proxy overhead (simulated engines, zero delay)",
        "",
        *provenance_lines(prov),
        f"- routers: {result.get('routers', '-')}",
        "- proxy pinned to CPU 0; engines and the load generator (one aiohttp process) on CPU 1.",
        "- added = this mode minus the floor (client calls prefiller, then decoder), same run;",
        "  percentiles over all rounds' requests; req/s and chunks/s: median of the rounds.",
        "",
    ]
    header = (
        "| mode | requests | failed | TTFT p50 | TTFT p99 | added TTFT p50 | added TTFT p99 "
        "| e2e p50 | added e2e p50 | req/s | chunks/s | proxy CPU µs/req |"
    )
    sep = "|" + "---|" * 12

    def table(rows: dict[str, dict[str, Any]]) -> list[str]:
        out = [header, sep]
        for name, r in rows.items():
            out.append(
                f"| {name} | {r['requests']} | {r['failed']} | {_fmt(r['ttft_p50_ms'])} | "
                f"{_fmt(r['ttft_p99_ms'])} | {_fmt(r.get('ttft_p50_vs_floor_ms'))} | "
                f"{_fmt(r.get('ttft_p99_vs_floor_ms'))} | {_fmt(r['e2e_p50_ms'])} | "
                f"{_fmt(r.get('e2e_p50_vs_floor_ms'))} | {_fmt(r['req_per_s'], 0)} | "
                f"{_fmt(r['chunks_per_s'], 0)} | {_fmt(r['proxy_cpu_us_per_req'], 0)} |"
            )
        return out

    scen = result["scenarios"]
    if "overhead" in scen:
        lines += [f"## Streaming {result['tokens']} tokens, {result['rounds']} rounds (ms)", ""]
        for conc, rows in scen["overhead"]["by_concurrency"].items():
            lines += [f"### concurrency {conc}", "", *table(rows), ""]
        for name, note in scen["overhead"]["notes"].items():
            lines.append(f"- {name}: {note}")
        lines.append("")
    if "latency" in scen:
        lat = scen["latency"]
        lines += [
            f"## Concurrency 1, {lat['requests_per_mode']} requests per mode (ms)",
            "",
            "| mode | TTFT p50 | TTFT p99 | e2e p50 | e2e p99 | TTFT p50 vs direct "
            "| TTFT p99 vs direct | e2e p50 vs direct | e2e p99 vs direct | TTFT p50 vs floor |",
            "|" + "---|" * 10,
        ]
        for name, r in lat["rows"].items():
            lines.append(
                f"| {name} | {_fmt(r['ttft_p50_ms'])} | {_fmt(r['ttft_p99_ms'])} | "
                f"{_fmt(r['e2e_p50_ms'])} | {_fmt(r['e2e_p99_ms'])} | "
                f"{_fmt(r.get('ttft_p50_vs_direct_ms'))} | "
                f"{_fmt(r.get('ttft_p99_vs_direct_ms'))} | "
                f"{_fmt(r.get('e2e_p50_vs_direct_ms'))} | {_fmt(r.get('e2e_p99_vs_direct_ms'))} | "
                f"{_fmt(r.get('ttft_p50_vs_floor_ms'))} |"
            )
        lines.append("")
    if "open_streams" in scen:
        op = scen["open_streams"]
        lines += [
            f"## {op['streams']} open streams, decoder {op['decoder_ms_per_token']} ms per token",
            "",
            *table(op["rows"]),
            "",
        ]
    if "kv_index" in scen:
        lines += render_kv_index(scen["kv_index"], table)
    return "\n".join(lines)


def render_kv_index(kv: dict[str, Any], table: Callable[[Any], list[str]]) -> list[str]:
    lines = [
        "## The exact prefix index: pdproxy with kv_events off and on (ms)",
        "",
        "Every request a new prompt; the engines publish KV events, the proxy with the index",
        "applies them and asks the decoder's /tokenize per request. CPU ratio = index on / off.",
        "",
    ]
    for conc, data in kv["by_concurrency"].items():
        ratio = data["cpu_ratio_on_off"]
        lines += [f"### concurrency {conc}: CPU per request on/off = {_fmt(ratio)}", ""]
        lines += [*table(data["rows"]), ""]
    for url, e in kv["index"].items():
        lines.append(
            f"- index of {url}: {e['prefix_source']}, {e['batches']} batches applied, "
            f"{e['blocks']} blocks held, {e['repaired']} repaired, {e['lost']} lost"
        )
    lines.append("")
    return lines


def _source(ref: str, logdir: Path) -> Path:
    """A source tree to run: `ref` itself if it is a directory, else a worktree of that ref."""
    return Path(ref) if Path(ref).is_dir() else worktree(ref, logdir)


def _router_versions(venv: Path) -> str:
    if not (venv / "bin" / "python").exists():
        return "not installed (see --routers-venv)"
    out = subprocess.run(
        [str(venv / "bin" / "python"), "-m", "pip", "list", "--format=freeze"],
        capture_output=True,
        text=True,
    ).stdout
    return ", ".join(line for line in out.splitlines() if "router" in line) or "none"


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pin_self({int(ENGINE_CPU)} if (os.cpu_count() or 1) > 1 else {0})
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-overhead-"))
    procs = Procs(logdir)
    args.baseline_src = {ref: _source(ref, logdir) for ref in args.baseline}
    scenarios: dict[str, Any] = {}
    every = ["overhead", "latency", "open-streams", "kv-index"]
    wanted = every if args.scenario == "all" else [args.scenario]
    try:
        for name in wanted:
            run = {
                "overhead": scenario_overhead,
                "latency": scenario_latency,
                "open-streams": scenario_open_streams,
                "kv-index": scenario_kv_index,
            }[name]
            scenarios[name.replace("-", "_")] = await run(procs, args)
    finally:
        procs.stop_all()
        for ref, src in args.baseline_src.items():
            if src != Path(ref):
                drop_worktree(src)
    return {
        "provenance": provenance([Path(sys.executable).name, *sys.argv]),
        "routers": _router_versions(Path(args.routers_venv)),
        "tokens": args.tokens,
        "rounds": args.rounds,
        "logs": str(logdir),
        "scenarios": scenarios,
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument(
        "--scenario",
        choices=("all", "overhead", "latency", "open-streams", "kv-index"),
        default="all",
    )
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 64, 256])
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds (default 3)")
    p.add_argument("--per-worker", type=int, default=8, help="requests per client per batch")
    p.add_argument("--min-requests", type=int, default=100, help="batch size at concurrency 1")
    p.add_argument("--tokens", type=int, default=64, help="tokens streamed per request")
    p.add_argument("--latency-requests", type=int, default=300, help="scenario latency")
    p.add_argument("--open-streams", type=int, default=256, help="scenario open-streams")
    p.add_argument("--routers-venv", default=".bench-routers", help="venv with the routers")
    p.add_argument(
        "--skip", nargs="*", default=[], help="modes to leave out: pdproxy vllm-router ..."
    )
    p.add_argument(
        "--baseline",
        nargs="*",
        default=[],
        metavar="REF",
        help="also run pdproxy as of these git refs (worktrees) or source trees, same run",
    )
    p.add_argument("--quick", action="store_true", help="small run (~1 min)")
    p.add_argument("--out", default=str(RESULTS / "overhead"), help="results path stem")
    args = p.parse_args(argv)
    if args.quick:
        args.rounds, args.per_worker, args.min_requests = 2, 2, 40
        args.latency_requests, args.open_streams = 100, 64
    return args


def _exit_on_term(*_: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)  # so `finally` stops every process started
    args = parse_args(argv)
    result = asyncio.run(main_async(args))
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text(render(result) + "\n")
    print(render(result))
    print(f"\nwrote {stem.with_suffix('.md')} and {stem.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
