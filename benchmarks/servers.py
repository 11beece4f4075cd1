"""The same ProxyApp under uvicorn (what `pdproxy serve` runs) and under granian's ASGI server,
same run, interleaved: proxy CPU per 64-token streamed request and req/s at concurrency 1 and 64.

Engines: zero-delay sims (`--speed-factor 0 --token-per-chunk`) on CPU 1 with this client; the
servers each on CPU 0 in turn. Needs `pip install granian` in the project venv.

    python benchmarks/servers.py     # ~1 min; writes benchmarks/results/servers.{md,json}
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import (
    RESULTS,
    Proc,
    Procs,
    chat_body,
    cpu_seconds,
    free_port,
    new_session,
    pin_self,
    provenance,
    stream_once,
)
from benchmarks.overhead import PROMPT

REPO = Path(__file__).resolve().parent.parent
FACTORY = """
import os
from proxy.app import build_app
from proxy.config import load_config

def make():
    return build_app(load_config(
        None, prefill=[os.environ["PDP_PREFILL"]], decode=[os.environ["PDP_DECODE"]],
        stats={"interval": 0}, log_level="warning"))
"""


async def measure(proxies: dict[str, Proc], rounds: int) -> dict[str, Any]:
    raw = orjson.dumps(chat_body(PROMPT, 64))
    out: dict[str, Any] = {}
    for conc, per in ((1, 200), (64, 8)):
        totals = {name: [0.0, 0, 0.0, 0] for name in proxies}
        for r in range(rounds):
            order = list(proxies.items())
            for name, proc in order if r % 2 == 0 else order[::-1]:
                async with new_session() as session:

                    async def worker(n: int, url: str = proc.url) -> int:
                        failed = 0
                        for _ in range(n):
                            sample = await stream_once(session, url + "/v1/chat/completions", raw)
                            failed += not sample.ok
                        return failed

                    await worker(3)
                    cpu0, t0 = cpu_seconds(proc.pid), time.perf_counter()
                    failed = await asyncio.gather(*(worker(per) for _ in range(conc)))
                    row = totals[name]
                    row[0] += cpu_seconds(proc.pid) - cpu0
                    row[1] += conc * per
                    row[2] += time.perf_counter() - t0
                    row[3] += sum(failed)
        out[str(conc)] = {
            name: {
                "requests": n,
                "failed": failed,
                "cpu_us_per_req": cpu / n * 1e6,
                "req_per_s": n / wall,
            }
            for name, (cpu, n, wall, failed) in totals.items()
        }
    return out


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    pin_self({1})
    logdir = Path(tempfile.mkdtemp(prefix="pdproxy-servers-"))
    procs = Procs(logdir)
    try:
        zero = ["--speed-factor", "0", "--token-per-chunk"]
        prefill = procs.sim("prefill", "1", "--role", "prefill", *zero)
        decode = procs.sim("decode", "1", "--role", "decode", *zero)
        log = ("--stats-interval", "0", "--log-level", "warning")
        proxies = {"uvicorn": procs.pdproxy("uvicorn", "0", [prefill.url], [decode.url], *log)}
        granian = shutil.which("granian", path=str(Path(sys.executable).parent))
        if granian:
            (logdir / "granian_app.py").write_text(FACTORY)
            os.environ.update(
                PDP_PREFILL=prefill.url,
                PDP_DECODE=decode.url,
                PYTHONPATH=f"{logdir}:{REPO}",
            )
            for mode in ("st", "mt"):
                port = free_port()
                argv = [granian, "--interface", "asgi", "--loop", "uvloop", "--http", "1"]
                argv += ["--no-ws", "--workers", "1", "--runtime-mode", mode]
                argv += ["--runtime-threads", "1", "--host", "127.0.0.1", "--port", str(port)]
                argv += ["--factory", "--log-level", "warning", "granian_app:make"]
                url = f"http://127.0.0.1:{port}"
                proxies[f"granian-{mode}"] = procs.start(
                    f"granian-{mode}", argv, url, "0", ready="/metrics"
                )
        return await measure(proxies, args.rounds)
    finally:
        procs.stop_all()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--out", default=str(RESULTS / "servers"))
    args = p.parse_args()
    rows = asyncio.run(main_async(args))
    result = {"provenance": provenance([Path(sys.executable).name, *sys.argv]), "rows": rows}
    lines = [
        "# ASGI server under the same ProxyApp (64-token streams, zero-delay sims)",
        "",
        f"- command: `{result['provenance']['command']}`; {result['provenance']['date']}",
        f"- machine: {result['provenance']['machine']}",
        "",
        "| concurrency | server | requests | failed | proxy CPU µs/req | req/s |",
        "|---|---|---|---|---|---|",
    ]
    for conc, by in rows.items():
        for name, r in by.items():
            lines.append(
                f"| {conc} | {name} | {r['requests']} | {r['failed']} | "
                f"{r['cpu_us_per_req']:.0f} | {r['req_per_s']:.0f} |"
            )
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps(result, indent=2) + "\n")
    stem.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
