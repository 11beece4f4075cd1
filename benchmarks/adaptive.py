"""Adaptive disaggregation: a pool of 4 engines placed per request against every fixed split.

Four simulated engines with the H200 timing profile (`--timing-profile h200-llama-8b-bf16`:
prefill 0.0231 ms per token, decode step 4.73 ms + 0.020 ms per sequence, pull 13.6 ms + 0.18 ms
per 16-token block; chunked prefill of 8192 tokens, a decode taking one token of the budget),
`--max-num-seqs` 16 each (so that decode capacity runs out at rates this 2-core machine can
drive), all delays slowed by `--speed-factor` (5: the client, the proxy and four engines share
two cores). Every figure below is in engine time (wall time / speed factor).

A seeded Poisson workload whose mix shifts, the same for every configuration:

  long        long-prompt / short-output: prompts of 4000-8000 tokens, answers of 32-96
  chat        short-prompt / long-output: prompts of 100-400 tokens, answers of 192-320
  mixed       one third long-prompt requests as above, two thirds chat requests as above

(`--phases` sets the order, `--phase-seconds` their length, `--rates` their arrival rates.)
Each prompt starts with a unique nonce: no prefix is shared, nothing is cached.

Configurations, each on four fresh engines, one after the other in the same run:

  1P3D, 2P2D, 3P1D   dedicated prefillers and decoders (NixlConnector), load_aware policies,
                     every request disaggregated
  colocated          4 plain engines (no KV connector), every request whole on the least loaded
                     one (pool_mode colocated: load_aware's measure)
  pool               4 kv_both engines, pool_mode adaptive: the planner decides per request and
                     the controller sets the split from the measured load

A request meets the SLO when it completes, its TTFT <= --ttft-slo and its mean inter-token
latency <= --itl-slo (engine seconds); goodput = such requests per second of arrivals, per phase
(by arrival time) and over the whole run. The same records give goodput under other SLOs
(--sensitivity). The engines' own step counters measure how much CPU contention stretched their
modelled time (pdsim:engine_step_wall_seconds_total against ..._model_seconds_total).

    python benchmarks/adaptive.py             # ~45 min on 2 cores
    python benchmarks/adaptive.py --quick     # ~20 min: 12 s phases
    python benchmarks/adaptive.py --render benchmarks/results/adaptive.json   # .md, .png again

Results: benchmarks/results/adaptive.{md,json} and adaptive.png.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import signal
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (
    MODEL,
    RESULTS,
    Proc,
    Procs,
    cpu_seconds,
    new_session,
    percentile,
    provenance,
    provenance_lines,
    stream_once,
)
from pdsim.profile import load_profile
from pdsim.tokenizer import WORDS

COMPLETIONS = "/v1/completions"
PROFILE = "h200-llama-8b-bf16"
FIXED = {"1P3D": (1, 3), "2P2D": (2, 2), "3P1D": (3, 1)}
CONFIGS = [*FIXED, "colocated", "pool"]


@dataclass(frozen=True)
class Kind:
    name: str
    prompt: tuple[int, int]  # tokens (words), inclusive
    output: tuple[int, int]


LONG = Kind("long", (4000, 8000), (32, 96))
CHAT = Kind("chat", (100, 400), (192, 320))
MIXES: dict[str, list[tuple[float, Kind]]] = {
    "long": [(1.0, LONG)],
    "chat": [(1.0, CHAT)],
    "mixed": [(1 / 3, LONG), (2 / 3, CHAT)],
}


@dataclass(frozen=True)
class Arrival:
    at: float  # engine seconds from the start
    phase: str
    kind: str
    prompt: int
    output: int
    seed: int


def workload(phases: list[str], rates: list[float], seconds: float, seed: int) -> list[Arrival]:
    rng = random.Random(seed)
    out: list[Arrival] = []
    for i, (phase, rate) in enumerate(zip(phases, rates, strict=True)):
        t = i * seconds
        while True:
            t += rng.expovariate(rate)
            if t >= (i + 1) * seconds:
                break
            r, acc = rng.random(), 0.0
            kind = MIXES[phase][-1][1]
            for weight, k in MIXES[phase]:
                acc += weight
                if r < acc:
                    kind = k
                    break
            out.append(
                Arrival(
                    t,
                    phase,
                    kind.name,
                    rng.randint(*kind.prompt),
                    rng.randint(*kind.output),
                    rng.getrandbits(32),
                )
            )
    return out


def prompt_text(a: Arrival) -> str:
    rng = random.Random(a.seed)
    return f"{uuid.UUID(int=rng.getrandbits(128)).hex} " + " ".join(
        rng.choice(WORDS) for _ in range(a.prompt - 2)
    )


# -- topology -------------------------------------------------------------------------------


def engine_args(args: argparse.Namespace) -> list[str]:
    return [
        "--timing-profile",
        PROFILE,
        "--speed-factor",
        f"{args.speed_factor:g}",
        "--max-num-seqs",
        str(args.max_num_seqs),
    ]


def proxy_config(name: str, engines: list[Proc], args: argparse.Namespace) -> dict[str, Any]:
    urls = [e.url for e in engines]
    base: dict[str, Any] = {
        "stats": {"interval": 0},
        "log_level": "info" if name == "pool" else "warning",
        "health": {"interval": 5.0},
        "kv_health": {"enabled": False},
        "timeouts": {"decode_idle": 600.0},
        "admission": {"max_queue": 100_000, "queue_timeout": 3600.0},
    }
    if name in FIXED:
        p, _ = FIXED[name]
        return {
            **base,
            "prefill": urls[:p],
            "decode": urls[p:],
            "prefill_policy": "load_aware",
            "decode_policy": "load_aware",
        }
    s = args.speed_factor
    planner = {
        # the engines' capacity, in wall seconds of these slowed-down engines
        "prefill_tokens_per_second": 1000.0
        / load_profile(PROFILE).timing["prefill_ms_per_token"]
        / s,
        "decode_streams": args.max_num_seqs,
        # the controller's time constants, in engine seconds, scaled
        "window": args.window * s,
        "interval": 0.5 * s,
        "min_dwell": 1.5 * s,
        "max_prefill_wait": 0.5 * s,
        "hold": 2,
    }
    mode = "colocated" if name == "colocated" else "adaptive"
    return {**base, "pool": urls, "pool_mode": mode, "pool_planner": planner}


async def poll_pool(url: str, start: float, s: float, out: list[list[float]]) -> None:
    async with aiohttp.ClientSession() as session:
        while True:
            try:
                async with session.get(url + "/stats") as resp:
                    pool = (await resp.json())["pool"]
                out.append([(time.perf_counter() - start) / s, pool["prefill"], pool["decode"]])
            except (aiohttp.ClientError, KeyError, TypeError):
                pass
            await asyncio.sleep(0.5 * s)


async def engine_steps(engines: list[Proc]) -> list[tuple[float, float]]:
    """Each engine's (model, wall) step seconds so far."""
    out = []
    async with aiohttp.ClientSession() as session:
        for e in engines:
            async with session.get(e.url + "/metrics") as resp:
                text = await resp.text()
            got = {"model": 0.0, "wall": 0.0}
            for line in text.splitlines():
                for key in got:
                    if line.startswith(f"pdsim:engine_step_{key}_seconds_total"):
                        got[key] = float(line.rsplit(" ", 1)[1])
            out.append((got["model"], got["wall"]))
    return out


async def run_config(
    name: str, arrivals: list[Arrival], args: argparse.Namespace, logdir: Path
) -> dict[str, Any]:
    procs = Procs(logdir / name)
    procs.logdir.mkdir(parents=True, exist_ok=True)
    s = args.speed_factor
    try:
        extra = ["--no-kv-transfer"] if name == "colocated" else []
        engines = [
            procs.sim(f"engine{i}", None, "--role", "both", *engine_args(args), *extra)
            for i in range(4)
        ]
        path = procs.logdir / "proxy.yaml"
        path.write_text(json.dumps(proxy_config(name, engines, args)))
        proxy = procs.pdproxy("proxy", None, [], [], "--config", str(path))
        url = proxy.url + COMPLETIONS
        async with new_session() as session:
            for i in range(4):  # warm the connections
                body = {"model": MODEL, "prompt": f"warm {i}", "max_tokens": 2, "stream": True}
                await stream_once(session, url, orjson.dumps(body))
        steps0 = await engine_steps(engines)
        cpu0 = cpu_seconds(proxy.proc.pid)
        split: list[list[float]] = []
        records = await drive(url, arrivals, s, proxy.url if name == "pool" else None, split)
        steps1 = await engine_steps(engines)
        cpu1 = cpu_seconds(proxy.proc.pid)
        stretch = [
            (w1 - w0) / (m1 - m0) if m1 > m0 else None
            for (m0, w0), (m1, w1) in zip(steps0, steps1, strict=True)
        ]
        return {
            "records": records,
            "split": split,
            "step_stretch": stretch,
            "proxy_cpu_seconds": round(cpu1 - cpu0, 2),
        }
    finally:
        procs.stop_all()


async def drive(
    url: str, arrivals: list[Arrival], s: float, pool_url: str | None, split: list[list[float]]
) -> list[list[Any]]:
    """Send every arrival at its time; return [at, phase, kind, ok, ttft, itl, tokens] per
    request, times in engine seconds."""
    records: list[list[Any]] = []
    async with new_session() as session:
        start = time.perf_counter()
        poller = None
        if pool_url is not None:
            poller = asyncio.create_task(poll_pool(pool_url, start, s, split))

        async def one(a: Arrival) -> None:
            body = {
                "model": MODEL,
                "prompt": prompt_text(a),
                "max_tokens": a.output,
                "ignore_eos": True,
                "stream": True,
            }
            sample = await stream_once(session, url, orjson.dumps(body))
            records.append(
                [
                    round(a.at, 4),
                    a.phase,
                    a.kind,
                    sample.ok,
                    round(sample.ttft / s, 5),
                    round(sample.itl / s, 6),
                    sample.tokens,
                ]
            )

        tasks = []
        for a in arrivals:
            delay = start + a.at * s - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(a)))
        await asyncio.gather(*tasks)
        if poller is not None:
            poller.cancel()
    records.sort(key=lambda r: r[0])
    return records


# -- summaries ------------------------------------------------------------------------------


def good(r: list[Any], ttft_slo: float, itl_slo: float) -> bool:
    return bool(r[3]) and r[4] <= ttft_slo and r[5] <= itl_slo


def summarise(
    records: list[list[Any]], seconds: float, ttft_slo: float, itl_slo: float
) -> dict[str, Any]:
    ok = [r for r in records if r[3]]
    ttft = [r[4] for r in ok]
    itl = [r[5] for r in ok if r[6] > 1]
    n_good = sum(1 for r in records if good(r, ttft_slo, itl_slo))
    return {
        "sent": len(records),
        "failed": len(records) - len(ok),
        "goodput": n_good / seconds,
        "slo_share": n_good / len(records) if records else 0.0,
        "ttft_p50_ms": percentile(ttft, 50) * 1e3,
        "ttft_p99_ms": percentile(ttft, 99) * 1e3,
        "itl_p50_ms": percentile(itl, 50) * 1e3,
        "itl_p99_ms": percentile(itl, 99) * 1e3,
    }


def analyse(result: dict[str, Any], ttft_slo: float, itl_slo: float) -> dict[str, Any]:
    """Per config: per phase and overall summaries under one SLO."""
    seconds = result["phase_seconds"]
    out: dict[str, Any] = {}
    for name, run in result["configs"].items():
        recs = run["records"]
        phases = {
            p: summarise([r for r in recs if r[1] == p], seconds, ttft_slo, itl_slo)
            for p in result["phases"]
        }
        overall = summarise(recs, seconds * len(result["phases"]), ttft_slo, itl_slo)
        out[name] = {"phases": phases, "overall": overall}
    return out


def timeseries(
    records: list[list[Any]], total: float, step: float, slo: tuple[float, float]
) -> list[tuple[float, float]]:
    bins = [0] * int(total / step + 0.999)
    for r in records:
        if good(r, *slo):
            bins[min(len(bins) - 1, int(r[0] / step))] += 1
    return [(i * step + step / 2, n / step) for i, n in enumerate(bins)]


# -- output ---------------------------------------------------------------------------------


def render(result: dict[str, Any]) -> str:
    slo = (result["ttft_slo"], result["itl_slo"])
    table = analyse(result, *slo)
    phases = result["phases"]
    names = list(result["configs"])
    fixed = [n for n in names if n != "pool"]
    lines = [
        "# Adaptive disaggregation: a pool of 4 engines against every fixed split",
        "",
        *provenance_lines(result["provenance"]),
        f"- engines: 4 simulated, timing profile `{PROFILE}` (H200, calibration from "
        "`benchmarks/results/gpu-h200.json`), `--max-num-seqs "
        f"{result['max_num_seqs']}`, `--speed-factor {result['speed_factor']:g}`; all times "
        "below are engine time (wall / speed factor)",
        "- phases: "
        + ", ".join(f"{p} ({r:g} req/s)" for p, r in zip(phases, result["rates"], strict=True))
        + f", {result['phase_seconds']:g} s each; seed {result['seed']}",
        f"- SLO: TTFT <= {slo[0] * 1e3:.0f} ms and mean ITL <= {slo[1] * 1e3:.0f} ms; goodput = "
        "requests in SLO per second of arrivals",
        "",
        "## Goodput (requests/s in SLO)",
        "",
        "| config | " + " | ".join(phases) + " | overall |",
        "|---|" + "---|" * (len(phases) + 1),
    ]
    for n in names:
        t = table[n]
        cells = [f"{t['phases'][p]['goodput']:.2f}" for p in phases]
        lines.append(f"| {n} | " + " | ".join(cells) + f" | {t['overall']['goodput']:.2f} |")
    if "pool" in table and fixed:
        pool = table["pool"]
        cells = []
        for p in phases:
            best = max(fixed, key=lambda n: table[n]["phases"][p]["goodput"])
            b = table[best]["phases"][p]["goodput"]
            ratio = pool["phases"][p]["goodput"] / b if b else float("nan")
            cells.append(f"{ratio:.2f}x of {best}")
        over = [
            f"{n} {pool['overall']['goodput'] / table[n]['overall']['goodput']:.2f}x"
            if table[n]["overall"]["goodput"]
            else f"{n} -"
            for n in fixed
        ]
        lines += [
            "",
            "Pool against the best fixed configuration of each phase (goal: >= 0.95x): "
            + "; ".join(f"{p}: {c}" for p, c in zip(phases, cells, strict=True)),
            "",
            "Pool over the whole run against each fixed configuration (goal: >= 1.2x): "
            + ", ".join(over),
        ]
        # no configuration can have more goodput than requests arrived
        seconds_total = result["phase_seconds"] * len(phases)
        arrived = len(result["configs"]["pool"]["records"]) / seconds_total
        best_all = max(fixed, key=lambda n: table[n]["overall"]["goodput"])
        b = table[best_all]["overall"]["goodput"]
        if b:
            lines += [
                "",
                f"Upper bound: {arrived:.2f} requests/s arrived over the {seconds_total:g} s; "
                f"{best_all} served {b / arrived:.0%} of them in SLO, so no configuration can "
                f"reach more than {arrived / b:.2f}x of its goodput over this run.",
            ]
    lines += [
        "",
        "## TTFT and ITL, p50 / p99 (ms), share in SLO, failed",
        "",
        "| config | phase | TTFT p50 | TTFT p99 | ITL p50 | ITL p99 | in SLO | failed |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for n in names:
        for p in [*phases, "overall"]:
            row = table[n]["overall"] if p == "overall" else table[n]["phases"][p]
            lines.append(
                f"| {n} | {p} | {row['ttft_p50_ms']:.0f} | {row['ttft_p99_ms']:.0f} | "
                f"{row['itl_p50_ms']:.1f} | {row['itl_p99_ms']:.1f} | "
                f"{row['slo_share']:.0%} | {row['failed']} |"
            )
    lines += [
        "",
        "## Overall goodput under other SLOs (the same records)",
        "",
        "| TTFT, ITL | " + " | ".join(names) + " | pool / best fixed |",
        "|---|" + "---|" * (len(names) + 1),
    ]
    for ttft, itl in result["sensitivity"]:
        t = analyse(result, ttft, itl)
        goods = {n: t[n]["overall"]["goodput"] for n in names}
        best = max((goods[n] for n in fixed), default=0.0)
        ratio = goods.get("pool", 0.0) / best if best else float("nan")
        lines.append(
            f"| {ttft * 1e3:.0f} ms, {itl * 1e3:.0f} ms | "
            + " | ".join(f"{goods[n]:.2f}" for n in names)
            + f" | {ratio:.2f}x |"
        )
    lines += [
        "",
        "## How the pool split its engines",
        "",
    ]
    if "pool" in result["configs"]:
        split = result["configs"]["pool"]["split"]
        for p_i, p in enumerate(phases):
            lo, hi = p_i * result["phase_seconds"], (p_i + 1) * result["phase_seconds"]
            inside = [row[1] for row in split if lo <= row[0] < hi]
            if inside:
                share = {k: inside.count(k) / len(inside) for k in sorted(set(inside))}
                lines.append(
                    f"- {p}: prefill-leaning engines "
                    + ", ".join(f"{k}: {v:.0%} of the time" for k, v in share.items())
                )
        changes = sum(1 for a, b in itertools.pairwise(split) if a[1] != b[1])
        lines.append(f"- {changes} changes of the split in the run")
    lines += [
        "",
        "## The machine",
        "",
        "Step time of each engine as run against its modelled time (1.00 = no distortion; "
        "CPU contention stretches it), and the proxy's CPU over the run:",
        "",
        "| config | engine steps (wall / modelled) | proxy CPU s |",
        "|---|---|---|",
    ]
    for n in names:
        run = result["configs"][n]
        st = ", ".join("-" if x is None else f"{x:.3f}" for x in run["step_stretch"])
        lines.append(f"| {n} | {st} | {run['proxy_cpu_seconds']} |")
    lines += ["", "Plot: adaptive.png (goodput over time per configuration; the pool's split)."]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    slo = (result["ttft_slo"], result["itl_slo"])
    total = result["phase_seconds"] * len(result["phases"])
    step = max(1.0, result["phase_seconds"] / 10)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(10, 7), sharex=True,
                                      gridspec_kw={"height_ratios": [3, 1.3]})  # fmt: skip
    for name, run in result["configs"].items():
        series = timeseries(run["records"], total, step, slo)
        style = {"lw": 2.6, "color": "black"} if name == "pool" else {"lw": 1.3}
        top.plot([x for x, _ in series], [y for _, y in series], label=name, **style)
    for i, p in enumerate(result["phases"]):
        for ax in (top, bottom):
            ax.axvspan(i * result["phase_seconds"], (i + 1) * result["phase_seconds"],
                       color="grey", alpha=0.06 * (i % 2 + 1))  # fmt: skip
        top.text((i + 0.5) * result["phase_seconds"], 0, p, ha="center", va="bottom")
    top.set_ylabel("goodput (req/s in SLO)")
    top.set_title(
        f"Goodput over time: TTFT <= {slo[0] * 1e3:.0f} ms, mean ITL <= {slo[1] * 1e3:.0f} ms"
    )
    top.legend(ncol=3, fontsize=9)
    top.grid(alpha=0.3)
    split = result["configs"].get("pool", {}).get("split", [])
    if split:
        xs = [r[0] for r in split]
        bottom.step(xs, [r[1] for r in split], where="post", label="prefill-leaning")
        bottom.step(xs, [r[2] for r in split], where="post", label="decode-leaning")
        bottom.set_ylim(-0.2, 4.2)
        bottom.legend(fontsize=9)
    bottom.set_ylabel("pool engines")
    bottom.set_xlabel("engine seconds")
    bottom.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _exit_on_term(*_: object) -> None:
    raise KeyboardInterrupt


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--configs", nargs="+", default=CONFIGS, choices=CONFIGS)
    p.add_argument("--phases", nargs="+", default=["long", "chat", "mixed"], choices=list(MIXES))
    p.add_argument("--rates", type=float, nargs="+", default=[15.0, 30.0, 22.0],
                   help="arrivals per engine second, one per phase")  # fmt: skip
    p.add_argument("--phase-seconds", type=float, default=30.0, help="engine seconds per phase")
    p.add_argument("--speed-factor", type=float, default=5.0)
    p.add_argument("--max-num-seqs", type=int, default=16)
    p.add_argument("--window", type=float, default=6.0, help="controller window, engine s")
    p.add_argument("--ttft-slo", type=float, default=1.0, help="engine seconds")
    p.add_argument("--itl-slo", type=float, default=0.015, help="engine seconds (mean)")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="12 s phases")
    p.add_argument("--out", default=str(RESULTS / "adaptive"), help="results path stem")
    p.add_argument(
        "--render", metavar="JSON", help="write the .md and .png of a results file again; run none"
    )
    args = p.parse_args(argv)
    if len(args.rates) != len(args.phases):
        p.error("give one rate per phase")
    if args.quick:
        args.phase_seconds = 12.0
    args.sensitivity = [(t, i) for t in (0.5, 1.0, 2.0) for i in (0.010, 0.015, 0.025, 0.050)]
    return args


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _exit_on_term)  # so `finally` stops every process started
    args = parse_args(argv)
    if args.render:
        stem = Path(args.render).with_suffix("")
        result = json.loads(stem.with_suffix(".json").read_text())
        stem.with_suffix(".md").write_text(render(result) + "\n")
        plot(result, stem.with_suffix(".png"))
        print(f"wrote {stem}.md, {stem}.png")
        return 0
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-adaptive-"))
    arrivals = workload(args.phases, args.rates, args.phase_seconds, args.seed)
    print(f"{len(arrivals)} requests over {len(args.phases)} phases; logs in {logdir}", flush=True)
    configs: dict[str, Any] = {}
    for name in args.configs:
        t0 = time.perf_counter()
        configs[name] = asyncio.run(run_config(name, arrivals, args, logdir))
        partial = {
            "phases": args.phases,
            "phase_seconds": args.phase_seconds,
            "configs": {name: configs[name]},
        }
        row = analyse(partial, args.ttft_slo, args.itl_slo)[name]
        print(
            f"{name:>9}: goodput "
            + " ".join(f"{p} {row['phases'][p]['goodput']:.2f}" for p in args.phases)
            + f" overall {row['overall']['goodput']:.2f}/s; "
            f"stretch {configs[name]['step_stretch']}; {time.perf_counter() - t0:.0f} s wall",
            flush=True,
        )
    result = {
        "provenance": provenance([Path(sys.executable).name, *sys.argv]),
        "phases": args.phases,
        "rates": args.rates,
        "phase_seconds": args.phase_seconds,
        "speed_factor": args.speed_factor,
        "max_num_seqs": args.max_num_seqs,
        "window": args.window,
        "ttft_slo": args.ttft_slo,
        "itl_slo": args.itl_slo,
        "seed": args.seed,
        "sensitivity": args.sensitivity,
        "record_fields": ["at", "phase", "kind", "ok", "ttft", "itl", "tokens"],
        "configs": configs,
    }
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, separators=(",", ":")) + "\n")
    stem.with_suffix(".md").write_text(render(result) + "\n")
    plot(result, stem.with_suffix(".png"))
    print(render(result))
    print(f"\nwrote {stem}.md, {stem}.json, {stem}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
