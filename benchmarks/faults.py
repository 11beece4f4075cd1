"""Fault injection under load: every request must end in a full answer or a clear error.

Runs each scenario against 2 simulated prefillers + 2 simulated decoders behind a fresh proxy (one
scenario replaces a decoder through the admin API while under load), and
classifies every request the client sent:
  succeeded     a 200 with a complete answer (non-stream: JSON with choices; stream: tokens and
                `data: [DONE]`, no error event)
  clear error   an OpenAI-shaped error: a 4xx/5xx JSON `{"error": {"message": ...}}`, or a stream
                that ends with a `data: {"error": ...}` event and `data: [DONE]`
  lost          anything else: a broken connection, a hang past the client's deadline, a cut or
                unparseable body, a stream without [DONE]. Must be 0.

    python benchmarks/faults.py            # full run, writes benchmarks/results/faults.{md,json}
    python benchmarks/faults.py --quick    # small and fast (what the test suite runs)

Half the requests stream 12 tokens; in the scenario `LONG`, every one streams 64, so a decoder
killed under load has many streams in flight: they migrate, and the gap each client saw at the
seam comes from the proxy's request timelines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.probes import admin_call, metric_total, post_json, rss_kib, seam_gaps
from pdsim.launch import Process, SimProcess, start_proxy, start_sim
from proxy import __version__

MODEL = "pdsim/llama-8b"
LONG = "kill -9 decoder, streams"
RESULTS = Path(__file__).parent / "results"


@dataclass
class Tally:
    scenario: str
    sent: int = 0
    succeeded: int = 0
    clear_errors: int = 0
    lost: int = 0
    retries: float = 0
    fallbacks: float = 0
    migrations: float = 0
    seconds: float = 0.0
    notes: str = ""
    lost_examples: list[str] = field(default_factory=list)


def classify(status: int, raw: bytes, stream: bool) -> tuple[str, str]:
    """('succeeded' | 'clear_error' | 'lost', why)."""
    if status != 200:
        try:
            message = orjson.loads(raw)["error"]["message"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return "lost", f"HTTP {status} without an OpenAI error body: {raw[:80]!r}"
        return ("clear_error", message) if message else ("lost", "empty error message")
    if not stream:
        try:
            text = orjson.loads(raw)["choices"][0]["text"]
        except (orjson.JSONDecodeError, KeyError, TypeError, IndexError):
            return "lost", f"200 with a broken body: {raw[:80]!r}"
        return ("succeeded", "") if isinstance(text, str) else ("lost", "no text")
    events = [e for e in raw.split(b"\n\n") if e]
    if not events or events[-1] != b"data: [DONE]":
        return "lost", f"stream without [DONE]: {raw[-80:]!r}"
    finished = False
    for event in events[:-1]:
        try:
            parsed = orjson.loads(event.removeprefix(b"data: "))
        except orjson.JSONDecodeError:
            return "lost", f"malformed event reached the client: {event[:80]!r}"
        if "error" in parsed:
            return "clear_error", str(parsed["error"].get("message"))
        finished = finished or any(c.get("finish_reason") for c in parsed.get("choices", []))
    # an answer may be empty (EOS first), but it must say why it ended
    return ("succeeded", "") if finished else ("lost", "stream without a finish_reason")


async def one(
    session: aiohttp.ClientSession, url: str, i: int, deadline: float, long: bool
) -> tuple[str, str]:
    stream = long or i % 2 == 0
    body = {"model": MODEL, "prompt": f"request {i}: " + "word " * (i % 40),
            "max_tokens": 64 if long else 12}  # fmt: skip
    body["stream"] = stream
    try:
        async with session.post(
            url + "/v1/completions", json=body, timeout=aiohttp.ClientTimeout(total=deadline)
        ) as resp:
            raw = await resp.read()
            return classify(resp.status, raw, stream)
    except (aiohttp.ClientError, TimeoutError) as exc:
        return "lost", f"{type(exc).__name__}: {exc}"


async def load(
    url: str, n: int, concurrency: int, hook: Callable[[int], None], long: bool = False
) -> list[tuple[str, str]]:
    """Send n requests, `concurrency` at a time; `hook(i)` runs as request i is sent."""
    results: list[tuple[str, str]] = []
    queue = iter(range(n))

    async def worker(session: aiohttp.ClientSession) -> None:
        for i in queue:
            hook(i)
            results.append(await one(session, url, i, 30.0, long))

    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
    return results


class Topology:
    """2 prefillers + 2 decoders (simulated), restarted as needed between scenarios, and a
    spare decoder that a scenario adds at run time."""

    def __init__(self, logs: Path, speed: float) -> None:
        self.logs = logs
        args = ("--model", MODEL, "--speed-factor", str(speed))
        self.prefill = [start_sim("prefill", *args, log=logs / f"p{i}.log") for i in range(2)]
        self.decode = [start_sim("decode", *args, log=logs / f"d{i}.log") for i in range(2)]
        self.spare = start_sim("decode", *args, log=logs / "d-spare.log")
        self.proxy_url = ""
        self.changes: list[threading.Thread] = []
        self.change_notes: list[str] = []

    @property
    def sims(self) -> list[SimProcess]:
        return [*self.prefill, *self.decode, self.spare]

    def replace_decoder(self) -> None:
        """Remove decoder 0 and add the spare through the admin API (in a thread: the probes
        take a moment and the load must go on)."""

        def change() -> None:
            base = self.proxy_url + "/admin/workers"
            removed = admin_call("DELETE", base + "/d0")
            added = admin_call("POST", base, {"url": self.spare.url, "role": "decode"})
            self.change_notes.append(f"DELETE d0: {removed}; POST spare decoder: {added}")

        thread = threading.Thread(target=change)
        thread.start()
        self.changes.append(thread)

    def heal(self) -> None:
        for sim in self.sims:
            if not sim.alive():
                sim.restart()
            post_json(sim.url + "/_sim/reset", {})

    def fault(self, sim: SimProcess, **faults: Any) -> None:
        post_json(sim.url + "/_sim/faults", faults)

    @contextmanager
    def proxy(self, name: str) -> Iterator[Process]:
        config = self.logs / f"{name}.yaml"
        config.write_text(
            "health: {interval: 0.5, timeout: 1, failure_threshold: 3, cooldown: 2}\n"
            "timeouts: {connect: 1, prefill: 2, decode_first_byte: 2, decode_idle: 2}\n"
            "stats: {interval: 0}\n"
        )
        proxy = start_proxy(
            [p.url for p in self.prefill],
            [d.url for d in self.decode],
            "--config",
            str(config),
            log=self.logs / f"proxy-{name}.log",
        )
        self.proxy_url = proxy.url
        try:
            yield proxy
        finally:
            for thread in self.changes:
                thread.join(60)
            self.changes.clear()
            proxy.stop()

    def close(self) -> None:
        for sim in self.sims:
            sim.stop()


def tally(name: str, results: list[tuple[str, str]], seconds: float, notes: str) -> Tally:
    t = Tally(name, sent=len(results), seconds=round(seconds, 2), notes=notes)
    for outcome, why in results:
        if outcome == "succeeded":
            t.succeeded += 1
        elif outcome == "clear_error":
            t.clear_errors += 1
        else:
            t.lost += 1
            if len(t.lost_examples) < 5:
                t.lost_examples.append(why)
    return t


def run_scenario(
    topo: Topology, name: str, n: int, concurrency: int, hook: Callable[[int], None], notes: str
) -> Tally:
    topo.heal()
    with topo.proxy(name) as proxy:
        retries0 = metric_total(proxy.url, "pdproxy_retries_total")
        spare0 = metric_total(topo.spare.url, "pdsim:kv_pulled_requests_total")
        fallbacks0 = metric_total(proxy.url, "pdproxy_prefill_fallbacks_total")
        t0 = time.monotonic()
        results = asyncio.run(load(proxy.url, n, concurrency, hook, name == LONG))
        t = tally(name, results, time.monotonic() - t0, notes)
        t.retries = metric_total(proxy.url, "pdproxy_retries_total") - retries0
        t.fallbacks = metric_total(proxy.url, "pdproxy_prefill_fallbacks_total") - fallbacks0
        t.migrations = metric_total(proxy.url, "pdproxy_migrations_total")
        t.notes += seam_gaps(proxy.url)
        for thread in topo.changes:
            thread.join(60)
        if topo.change_notes:
            served = metric_total(topo.spare.url, "pdsim:kv_pulled_requests_total") - spare0
            t.notes += f" ({'; '.join(topo.change_notes)}; the new decoder pulled the KV of "
            t.notes += f"{served:g} requests, its probe's included)"
            topo.change_notes.clear()
    return t


def scenarios(topo: Topology, n: int) -> Iterator[tuple[str, Callable[[int], None], str]]:
    at = n // 4
    p0, p1 = topo.prefill
    d0, d1 = topo.decode

    def nothing(i: int) -> None:
        return None

    def kill(sim: SimProcess) -> Callable[[int], None]:
        return lambda i: sim.kill() if i == at else None

    def fault(sim: SimProcess, **faults: Any) -> Callable[[int], None]:
        return lambda i: topo.fault(sim, **faults) if i == at else None

    def both(*hooks: Callable[[int], None]) -> Callable[[int], None]:
        return lambda i: [h(i) for h in hooks] and None

    yield "baseline", nothing, "no faults"
    yield "kill -9 prefiller", kill(p0), f"SIGKILL prefiller 0 at request {at}"
    yield "kill -9 decoder", kill(d0), f"SIGKILL decoder 0 at request {at}"
    yield LONG, kill(d0), f"every request streams 64 tokens; SIGKILL decoder 0 at request {at}"
    yield (
        "stalled decoder",
        fault(d0, stall_seconds=5),
        f"decoder 0 stalls 5 s on every request from request {at}; first-byte timeout 2 s",
    )
    yield (
        "truncated responses",
        fault(d0, truncate_body=True, count=n // 4),
        f"decoder 0 cuts {n // 4} answers mid-event",
    )
    yield (
        "garbage responses",
        both(
            fault(p0, garbage_body=True, count=n // 4), fault(d1, garbage_body=True, count=n // 4)
        ),
        f"prefiller 0 and decoder 1 send garbage for {n // 4} requests each",
    )
    yield (
        "decoder replaced",
        lambda i: topo.replace_decoder() if i == at else None,
        f"at request {at}: decoder 0 drained and removed, a new decoder probed and added",
    )
    yield (
        "bursts of 500s",
        both(fault(p1, error_status=500, count=n // 5), fault(d0, error_status=500, count=n // 5)),
        f"prefiller 1 and decoder 0 answer 500 to {n // 5} requests each",
    )


def soak(topo: Topology, n: int, concurrency: int) -> tuple[Tally, int, int]:
    topo.heal()
    with topo.proxy("soak") as proxy:
        asyncio.run(load(proxy.url, 200, concurrency, lambda i: None))  # warm-up
        before = rss_kib(proxy.pid)
        t0 = time.monotonic()
        results = asyncio.run(load(proxy.url, n, concurrency, lambda i: None))
        after = rss_kib(proxy.pid)
    return tally("soak", results, time.monotonic() - t0, f"{n} requests"), before, after


def run(quick: bool, logs: Path) -> tuple[list[Tally], dict[str, int]]:
    n, concurrency, soak_n = (60, 8, 400) if quick else (600, 16, 5000)
    topo = Topology(logs, speed=0.02)
    try:
        tallies = [run_scenario(topo, name, n, concurrency, hook, notes)
                   for name, hook, notes in scenarios(topo, n)]  # fmt: skip
        soaked, before, after = soak(topo, soak_n, concurrency)
        tallies.append(soaked)
    finally:
        topo.close()
    return tallies, {"rss_before_kib": before, "rss_after_kib": after}


def table(tallies: list[Tally], memory: dict[str, int]) -> str:
    rows = [
        "| scenario | sent | succeeded | clear errors | lost | retries | fallbacks | migrations "
        "| s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for t in tallies:
        rows.append(
            f"| {t.scenario} | {t.sent} | {t.succeeded} | {t.clear_errors} | {t.lost} | "
            f"{t.retries:g} | {t.fallbacks:g} | {t.migrations:g} | {t.seconds} |"
        )
    rows.append("")
    rows += [f"- {t.scenario}: {t.notes}" for t in tallies]
    rows.append("")
    rows.append(
        f"Proxy RSS around the soak: {memory['rss_before_kib'] / 1024:.1f} MiB before, "
        f"{memory['rss_after_kib'] / 1024:.1f} MiB after."
    )
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small run (about a minute)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="where results go")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pdproxy-faults-") as tmp:
        tallies, memory = run(args.quick, Path(tmp))
    report = table(tallies, memory)
    command = "python benchmarks/faults.py" + (" --quick" if args.quick else "")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    header = (
        f"# Fault injection\n\n`{command}` on {when}, pdproxy {__version__}, "
        f"Python {platform.python_version()}, {platform.machine()}, {os.cpu_count()} cores.\n\n"
    )
    print(header + report)
    for t in tallies:
        for example in t.lost_examples:
            print(f"lost in {t.scenario}: {example}", file=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "faults-quick" if args.quick else "faults"
    (args.out / f"{stem}.md").write_text(header + report + "\n")
    (args.out / f"{stem}.json").write_text(
        json.dumps(
            {"command": command, "memory": memory, "scenarios": [asdict(t) for t in tallies]},
            indent=2,
        )
    )
    return 1 if any(t.lost for t in tallies) else 0


if __name__ == "__main__":
    raise SystemExit(main())
