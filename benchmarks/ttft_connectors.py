"""TTFT through the proxy in the simulator, NIXL vs LMCache connector, in one run.

For each connector: start a simulated prefiller and decoder (realistic H100 timings unless
--speed-factor says otherwise) and a proxy, warm up, then send --requests streaming chat requests
one at a time and measure TTFT at the client (first SSE chunk with non-empty choices, as
`vllm bench serve` does). Prints the median, p90 and mean per connector and the proxy's own
TTFT median from /stats. Every process runs on 127.0.0.1 and is stopped by its PID.

    .venv/bin/python benchmarks/ttft_connectors.py --requests 200
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import orjson

from pdsim.launch import free_port

MODEL = "pdsim/llama-8b"


class Procs:
    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, name: str, args: list[str], url: str, health: str = "/health") -> str:
        with (self.logdir / f"{name}.log").open("wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "proxy", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited: see {self.logdir / name}.log")
            try:
                if httpx.get(url + health, timeout=1).status_code < 500:
                    return url
            except httpx.HTTPError:
                pass
            time.sleep(0.05)
        raise RuntimeError(f"{name} did not come up")

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(timeout=10)
        self.procs.clear()


def start_pair(procs: Procs, connector: str, speed: str) -> str:
    """Prefiller, decoder and proxy for `connector`; returns the proxy URL."""
    common = ["--model", MODEL, "--speed-factor", speed]
    p_port, d_port, x_port = free_port(), free_port(), free_port()
    p_args = ["sim", "--role", "prefill", "--port", str(p_port), *common]
    d_args = ["sim", "--role", "decode", "--port", str(d_port), *common]
    p_args += ["--side-channel-port", str(free_port())]
    d_args += ["--side-channel-port", str(free_port())]
    serve = ["serve", "--port", str(x_port), "--stats-interval", "0", "--log-level", "warning"]
    if connector == "lmcache":
        notify, init, alloc = free_port(), free_port(), free_port()
        p_args += ["--lmcache-role", "sender", "--pd-proxy-port", str(notify)]
        # skip_last_n_tokens 0: every pushed chunk is retrieved; with LMCache's launcher default
        # (1) the receive buffer leaks a chunk per request and the prefiller stalls after ~60
        d_args += ["--lmcache-role", "receiver", "--lmcache-skip-last-n-tokens", "0"]
        d_args += ["--pd-peer-init-port", str(init), "--pd-peer-alloc-port", str(alloc)]
        config = procs.logdir / "proxy-lmcache.yaml"
        config.write_text(
            f"connector: lmcache\nlmcache: {{notify_port: {notify}}}\n"
            f"prefill: ['http://127.0.0.1:{p_port}']\n"
            f"decode: [{{url: 'http://127.0.0.1:{d_port}', "
            f"lmcache: {{init_ports: [{init}], alloc_ports: [{alloc}]}}}}]\n"
        )
        serve += ["--config", str(config)]
    else:
        serve += [
            "--prefill",
            f"http://127.0.0.1:{p_port}",
            "--decode",
            f"http://127.0.0.1:{d_port}",
        ]
    procs.start(f"{connector}-prefill", p_args, f"http://127.0.0.1:{p_port}")
    procs.start(f"{connector}-decode", d_args, f"http://127.0.0.1:{d_port}")
    return procs.start(f"{connector}-proxy", serve, f"http://127.0.0.1:{x_port}", "/metrics")


def prompt(i: int, words: int) -> str:
    """A distinct prompt of about `words` tokens (distinct, so no cache helps across requests)."""
    base = ("the", "prefill", "of", "a", "long", "prompt", "goes", "to", "one", "engine")
    return f"request {i}: " + " ".join(base[j % len(base)] for j in range(words))


async def ttft(client: httpx.AsyncClient, url: str, body: dict[str, Any]) -> float:
    t0 = time.perf_counter()
    first = None
    async with client.stream("POST", url + "/v1/chat/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if first is None and line.startswith("data: {"):
                event = orjson.loads(line[6:])
                delta = event["choices"][0]["delta"] if event.get("choices") else {}
                if delta.get("content"):
                    first = time.perf_counter() - t0
    assert first is not None, "no content chunk"
    return first


async def measure(url: str, requests: int, words: int, tokens: int) -> list[float]:
    async with httpx.AsyncClient(timeout=60) as client:
        samples = []
        for i in range(requests + 5):
            body = {
                "model": MODEL,
                "messages": [{"role": "user", "content": prompt(i, words)}],
                "max_completion_tokens": tokens,
                "stream": True,
            }
            value = await ttft(client, url, body)
            if i >= 5:  # the first five warm up connections
                samples.append(value)
        return samples


def summary(samples: list[float]) -> str:
    ms = sorted(s * 1000 for s in samples)
    p90 = ms[int(0.9 * (len(ms) - 1))]
    return (
        f"n={len(ms)} median={statistics.median(ms):.2f} ms  p90={p90:.2f} ms  "
        f"mean={statistics.fmean(ms):.2f} ms"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--prompt-words", type=int, default=1000, help="about this many tokens")
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--speed-factor", default="1")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="ttft-") as tmp:
        procs = Procs(Path(tmp))
        try:
            results = {}
            for connector in ("nixl", "lmcache"):
                url = start_pair(procs, connector, args.speed_factor)
                samples = asyncio.run(
                    measure(url, args.requests, args.prompt_words, args.max_tokens)
                )
                stats = httpx.get(url + "/stats").json()["latency_seconds"]
                proxy_ttft = stats.get("ttft") or {}
                results[connector] = (samples, proxy_ttft)
                procs.stop()
            for connector, (samples, proxy_ttft) in results.items():
                print(f"{connector:8s} client TTFT {summary(samples)}")
                if proxy_ttft:
                    print(f"{'':8s} proxy /stats ttft: {proxy_ttft}")
        finally:
            procs.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
