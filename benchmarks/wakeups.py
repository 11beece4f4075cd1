"""What a halted core costs the proxy at concurrency 1, and what `--busy-poll` buys back.

At concurrency 1 the proxy sleeps three times on a request's way to its first token (for the
request, the prefill's answer, the decoder's first event); a client that drives both legs itself
sleeps twice. Where an idle CPU halts and waking it is slow (a virtual machine's vCPU), those
sleeps cost. Two measurements, no GPU:

    ping-pong   a loopback TCP echo, one byte, after 0, 2 and 20 ms idle; the echoing process's
                core left to halt, or kept busy by a spinner at idle priority (`chrt -i 0`),
                which any runnable task preempts at once
    latency     `gpu.py`'s latency phase (2,000 prompt token ids, 16 tokens streamed, rounds of
                decoder alone, client-driven floor and proxy, shuffled) against simulated engines
                at the H200 timing profile, through: `plain` (a proxy as configured by default),
                `busy-poll` (`--busy-poll 1`), `busy-poll-0` (`--busy-poll 0`: only while a
                request is in flight) and, with 8 cores or more, `spinner` (the plain proxy
                with a spinner on its core); the variants take turns, `--repeats` times

With 8 cores or more every process has a core of its own (engines, each proxy, the client);
with fewer nothing is pinned and the spinner variant is left out.

    python benchmarks/wakeups.py --rounds 60 --repeats 3 --out benchmarks/results/wakeups
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import gpu_phases as phases  # noqa: E402
from benchmarks.harness import Procs, provenance, provenance_lines  # noqa: E402
from pdsim.launch import free_port  # noqa: E402

SPIN = [sys.executable, "-c", "while True: pass"]


def spinner(cpu: int) -> subprocess.Popen[bytes]:
    """A busy loop at idle priority on `cpu`: the core never halts, and yields to any task."""
    return subprocess.Popen(["chrt", "-i", "0", "taskset", "-c", str(cpu), *SPIN])


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.kill()
    proc.wait()


def echo(port: int) -> None:
    """The echoing side of the ping-pong (a process of its own: `--echo PORT`)."""
    with socket.create_server(("127.0.0.1", port)) as server:
        conn, _ = server.accept()
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        while data := conn.recv(64):
            conn.sendall(data)


def pingpong(gap: float, n: int, echo_cpu: int, client_cpu: int, spin: bool) -> dict[str, float]:
    """Round trips of one byte after `gap` seconds idle: p50 and p90 in µs."""
    port = free_port()
    cmd = ["taskset", "-c", str(echo_cpu), sys.executable, __file__, "--echo", str(port)]
    server = subprocess.Popen(cmd)
    spun = spinner(echo_cpu) if spin else None
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {client_cpu})
    try:
        for _ in range(100):
            try:
                conn = socket.create_connection(("127.0.0.1", port))
                break
            except ConnectionRefusedError:
                time.sleep(0.05)
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        rtts = []
        for _ in range(n):
            time.sleep(gap)
            t0 = time.perf_counter()
            conn.sendall(b"x")
            conn.recv(64)
            rtts.append((time.perf_counter() - t0) * 1e6)
        conn.close()
    finally:
        os.sched_setaffinity(0, before)
        if spun:
            stop(spun)
        stop(server)
    rtts.sort()
    return {"p50": round(statistics.median(rtts), 1), "p90": round(rtts[int(0.9 * n)], 1)}


def plan_cores() -> dict[str, int] | None:
    """Each process's core (the last ones of the host), or None: too few to pin."""
    n = os.cpu_count() or 1
    if n < 8:
        return None
    names = ("prefill", "decode", "plain", "busy-poll", "busy-poll-0", "client")
    return {name: n - len(names) + i for i, name in enumerate(names)}


def start(procs: Procs, cores: dict[str, int] | None, profile: str) -> dict[str, str]:
    """The engines and the three proxies; their URLs by name."""

    def cpu(name: str) -> str | None:
        return None if cores is None else str(cores[name])

    sims = ("--model", "m", "--timing-profile", profile)
    pre = procs.sim("prefill", cpu("prefill"), "--role", "prefill", "--engine-id", "p", *sims)
    dec = procs.sim("decode", cpu("decode"), "--role", "decode", "--engine-id", "d", *sims)
    urls = {"prefill": pre.url, "decode": dec.url}
    flags = {"plain": [], "busy-poll": ["--busy-poll", "1"], "busy-poll-0": ["--busy-poll", "0"]}
    for name, more in flags.items():
        proxy = procs.pdproxy(name, cpu(name), [pre.url], [dec.url], "--connector", "nixl",
                              "--stats-interval", "0", *more)  # fmt: skip
        urls[name] = proxy.url
    return urls


def latency_runs(a: argparse.Namespace, logdir: Path) -> list[dict[str, Any]]:
    cores = plan_cores()
    procs = Procs(logdir)
    runs: list[dict[str, Any]] = []
    try:
        urls = start(procs, cores, a.timing_profile)
        if cores is not None:
            os.sched_setaffinity(0, {cores["client"]})
        variants = ["plain", "busy-poll", "busy-poll-0"] + (["spinner"] if cores else [])
        for k in range(a.repeats):
            for variant in variants:
                proxy = "plain" if variant == "spinner" else variant
                spun = spinner(cores["plain"]) if variant == "spinner" and cores else None
                t = phases.Target(name=variant, connector="nixl", proxy=urls[proxy],
                                  prefill=urls["prefill"], decode=urls["decode"], model="m",
                                  tokenizer="m", dtype="bfloat16", vocab=32000,
                                  log_dir=logdir)  # fmt: skip
                try:
                    time.sleep(0.5)
                    out = asyncio.run(phases.latency(t, a.rounds, a.prompt_tokens, a.max_tokens))
                finally:
                    if spun:
                        stop(spun)
                runs.append({"variant": variant, "repeat": k, "rounds": a.rounds,
                             "proxy_minus_floor_ttft_ms": out["proxy_minus_floor_ttft_ms"],
                             "floor_ttft_ms": out["floor"]["ttft_ms"],
                             "proxy_ttft_ms": out["proxy"]["ttft_ms"]})  # fmt: skip
    finally:
        procs.stop_all()
    return runs


def report(result: dict[str, Any]) -> str:
    lines = ["# What a halted core costs the proxy at concurrency 1", ""]
    lines += provenance_lines(result["provenance"])
    lines += [f"- cores: {result['cores'] or 'none pinned (fewer than 8)'}", ""]
    lines += ["## Ping-pong (µs, p50 / p90)", "",
              "| idle before | core left to halt | core kept busy |", "|---|---|---|"]  # fmt: skip
    for row in result["pingpong"]:
        lines.append(f"| {row['gap_ms']} ms | {row['halt']['p50']} / {row['halt']['p90']} | "
                     f"{row['spin']['p50']} / {row['spin']['p90']} |")  # fmt: skip
    lines += ["", "## Proxy minus floor TTFT (ms, p50 / mean), each run", "",
              "| variant | runs | median of the p50s |", "|---|---|---|"]  # fmt: skip
    by: dict[str, list[dict[str, float]]] = {}
    for run in result["latency"]:
        by.setdefault(run["variant"], []).append(run["proxy_minus_floor_ttft_ms"])
    for variant, xs in by.items():
        runs = ", ".join(f"{x['p50']:.2f} / {x['mean']:.2f}" for x in xs)
        lines.append(f"| `{variant}` | {runs} | {statistics.median(x['p50'] for x in xs):.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--echo", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--rounds", type=int, default=60, help="latency rounds per run")
    ap.add_argument("--repeats", type=int, default=2, help="runs of each variant, in turns")
    ap.add_argument("--pings", type=int, default=300, help="round trips per ping-pong setting")
    ap.add_argument("--prompt-tokens", type=int, default=2000)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--timing-profile", default="h200-llama-8b-bf16-xl")
    ap.add_argument("--out", type=Path, help="results: OUT.json and OUT.md")
    a = ap.parse_args()
    if a.echo:
        echo(a.echo)
        return
    n = os.cpu_count() or 1
    echo_cpu, client_cpu = n - 1, n - 2 if n > 1 else 0
    pings = []
    for gap in (0.0, 0.002, 0.02):
        pings.append({"gap_ms": gap * 1000,
                      "halt": pingpong(gap, a.pings, echo_cpu, client_cpu, spin=False),
                      "spin": pingpong(gap, a.pings, echo_cpu, client_cpu, spin=True)})  # fmt: skip
        print(json.dumps(pings[-1]), flush=True)
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-wakeups-"))
    result = {
        "provenance": provenance(["python", "benchmarks/wakeups.py", *sys.argv[1:]]),
        "cores": plan_cores(),
        "pingpong": pings,
        "latency": latency_runs(a, logdir),
    }
    text = report(result)
    print(text)
    if a.out:
        a.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
        a.out.with_suffix(".md").write_text(text)


if __name__ == "__main__":
    main()
